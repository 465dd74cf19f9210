"""Which studies of the datastore a request is scored against: chosen by what they are, not by their ids.

With a PACS, study ids are SeriesInstanceUIDs, so id patterns cannot choose a reference cohort, and scoring a FLAIR
series against T1 series ruins it. By default (``reference`` ``auto``) the references of a study are the other
studies of the same *kind*: the same modality and series description, from the DICOM metadata of a DICOMweb
datastore (one QIDO-RS search for all series) or, for a local datastore, from a JSON sidecar next to the image
(``<id>.json``, BIDS-style keys ``Modality`` and ``SeriesDescription``). A study whose kind is unknown (no sidecar)
is compared with the other studies of unknown kind. Explicit choices still work: ``all``, or comma-separated glob
patterns over image ids.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["KIND_FIELDS", "ReferenceChooser", "kinds_of_local", "kinds_of_dicomweb"]

KIND_FIELDS = ("Modality", "SeriesDescription")  # what makes two series the same kind of image


def _kind(meta: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(meta.get(field, "")).strip().lower() for field in KIND_FIELDS)


def kinds_of_local(studies: Path, image_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The kind of each study of a local datastore, from ``<id>.json`` sidecars (an empty kind without one)."""
    kinds = {}
    for image_id in image_ids:
        sidecar = studies / f"{image_id}.json"
        try:
            meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        except (OSError, ValueError) as err:
            logger.warning("ignoring the sidecar %s: %s", sidecar, err)
            meta = {}
        kinds[image_id] = _kind(meta if isinstance(meta, dict) else {})
    return kinds


def kinds_of_dicomweb(client: Any, search_filter: dict[str, Any] | None = None) -> dict[str, tuple[str, ...]]:
    """The kind of every series a DICOMweb server lists (one QIDO-RS search), by SeriesInstanceUID."""
    found = client.search_for_series(search_filters=dict(search_filter or {}), fields=list(KIND_FIELDS))
    kinds = {}
    for series in found:
        values = {
            tag_name: series.get(tag, {}).get("Value", [""])[0]
            for tag_name, tag in (
                ("Modality", "00080060"),
                ("SeriesDescription", "0008103E"),
                ("SeriesInstanceUID", "0020000E"),
            )
        }
        if values["SeriesInstanceUID"]:
            kinds[str(values["SeriesInstanceUID"])] = _kind(values)
    return kinds


class ReferenceChooser:
    """Chooses the reference studies of a request (see the module doc).

    Args:
        default: ``auto`` (same kind), ``all``, or comma-separated glob patterns over image ids.
        kinds: function from the datastore and its image ids to each study's kind.
        refresh_s: how long the kinds of a datastore are kept before they are read again.
    """

    def __init__(self, default: str = "auto", kinds: Any = None, refresh_s: float = 60.0) -> None:
        self.default = str(default or "auto")
        self.kinds = kinds
        self.refresh_s = refresh_s
        self._kinds: dict[str, tuple[str, ...]] = {}
        self._read_at = -float("inf")

    def choose(
        self, datastore: Any, image_id: str, image_ids: Sequence[str], choice: Any = None
    ) -> tuple[list[str], str]:
        """The reference ids for ``image_id`` among ``image_ids``, and the rule that chose them, in words."""
        choice = self.default if choice in (None, "") else choice
        text = ",".join(map(str, choice)) if isinstance(choice, (list, tuple)) else str(choice)
        patterns = [p.strip() for p in text.split(",") if p.strip()]
        others = sorted(i for i in image_ids if i != image_id)
        if not patterns or any(p.lower() == "all" for p in patterns):
            return others, "all studies"
        if any(p.lower() == "auto" for p in patterns):
            kinds = self._kinds_of(datastore, image_ids)
            kind = kinds.get(image_id, ())
            same = [i for i in others if kinds.get(i, ()) == kind]
            described = " / ".join(k for k in kind if k) or "no recorded modality or series description"
            return same, f"same kind ({described})"
        return [i for i in others if any(fnmatch.fnmatchcase(i, p) for p in patterns)], f"ids matching {text}"

    def _kinds_of(self, datastore: Any, image_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
        stale = time.monotonic() - self._read_at > self.refresh_s or any(i not in self._kinds for i in image_ids)
        if stale and self.kinds is not None:
            self._kinds = dict(self.kinds(datastore, image_ids))
            self._read_at = time.monotonic()
        return self._kinds
