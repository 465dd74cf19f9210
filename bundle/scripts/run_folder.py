"""The output folder of a run: checked before any work, held by one run at a time, marked until complete.

* ``check_output_dir``: refuses an output folder that is, or is inside, the dataset folder (a re-run would
  read its own heat maps as new subjects) and one that cannot be written (found out before hours of encoding,
  not after).
* ``RunFolder``: an exclusive ``flock`` on ``<output_dir>/.cs3f.lock`` for the whole run, so two runs into
  one folder cannot both pass the "no overwrite" check and interleave their files; while it writes, an
  ``INCOMPLETE`` file says that the folder may mix two runs, and it is removed only after ``run.json``, the
  last file, is written. Temporaries left by a killed run are removed when the next run takes the folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["OutputFolderError", "RunFolder", "check_output_dir", "INCOMPLETE", "LOCK"]

INCOMPLETE = "INCOMPLETE"
LOCK = ".cs3f.lock"


class OutputFolderError(RuntimeError):
    """The output folder cannot be used; the message names it and says why."""


def check_output_dir(output_dir: str | os.PathLike, dataset_dir: str | os.PathLike) -> bool:
    """Create ``output_dir`` if needed and make sure a run can use it; returns whether it had to be created."""
    out, data = Path(output_dir).resolve(), Path(dataset_dir).resolve()
    if out.is_relative_to(data):
        raise OutputFolderError(
            f"output_dir {out} is {'the dataset folder' if out == data else 'inside the dataset folder ' + str(data)}: "
            "a re-run would read its own results as subjects; choose an output_dir outside dataset_dir"
        )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise OutputFolderError(f"output_dir {out} cannot be written: {err.strerror or err}") from err
    return created


class RunFolder(contextlib.AbstractContextManager):
    """Hold ``output_dir`` for one run (see the module docstring); use as a context manager."""

    def __init__(self, output_dir: str | os.PathLike, created: bool = False) -> None:
        self.path = Path(output_dir)
        self.created = created  # the run made the folder: a run refused before writing removes it again
        self.wrote = False
        self._handle = None

    def __enter__(self) -> RunFolder:
        handle = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputFolderError(
                    f"output_dir {self.path} is in use by another CS3F run ({holder}); wait for it to finish or choose "
                    "another output_dir"
                ) from err
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle
        self.remove_stale_temporaries()
        return self

    def __exit__(self, kind, *exc) -> None:
        if self._handle is None:
            return
        if kind is not None and not self.wrote:  # refused or failed before any result: leave nothing behind
            (self.path / LOCK).unlink(missing_ok=True)
            if self.created:
                with contextlib.suppress(OSError):
                    self.path.rmdir()
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def mark_incomplete(self) -> None:
        """Say, before the first result file is touched, that the folder may now mix two runs."""
        self.wrote = True
        (self.path / INCOMPLETE).write_text(
            "A CS3F run started writing results here and has not finished (it is running, or it was stopped).\n"
            "Files in this folder may come from two different runs. Run the job again to complete them;\n"
            "this file is removed when run.json, the last file of a run, has been written.\n"
        )

    def mark_complete(self) -> None:
        (self.path / INCOMPLETE).unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> None:
        """Temporaries of ``outputs.atomic_path`` (``.<name>.<random>.tmp<suffix>``) left by a killed run."""
        for p in self.path.glob(".*.tmp*"):
            if p.is_file():
                p.unlink(missing_ok=True)
