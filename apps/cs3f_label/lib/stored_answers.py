"""Stored answers: a request whose study, references, settings and output options have not changed is answered
from the result stored the first time (``results/`` in the cache folder), without running anything."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


class StoredAnswers:
    """The result file and JSON answer of each request key, in ``folder`` (``None``: nothing is stored)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def _paths(self, key: str, extension: str) -> tuple[Path, Path]:
        return self.folder / f"{key}{extension}", self.folder / f"{key}.json"

    def get(self, key: str, extension: str) -> tuple[str, dict[str, Any]] | None:
        """A copy of the stored result file (MONAI Label removes the file it sends) and the answer, or ``None``."""
        if self.folder is None:
            return None
        result, answer = self._paths(key, extension)
        if not (result.is_file() and answer.is_file()):
            return None
        try:
            params = json.loads(answer.read_text())
        except (OSError, ValueError):
            return None
        handle, copy = tempfile.mkstemp(suffix=extension, prefix="cs3f_")
        os.close(handle)
        shutil.copyfile(result, copy)
        return copy, {**params, "stored": True}

    def put(self, key: str, extension: str, result_file: str, params: dict[str, Any]) -> None:
        """Store a result, atomically: the answer (written last) marks it complete."""
        if self.folder is None or not result_file or not os.path.isfile(result_file):
            return
        from scripts.outputs import atomic_path, write_json  # the bundle's, importable once the app has loaded it

        result, answer = self._paths(key, extension)
        with atomic_path(result) as tmp:
            shutil.copyfile(result_file, tmp)
        write_json(params, answer)
