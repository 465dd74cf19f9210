"""Writing results: atomically, never over existing results unless asked, in the input's own space.

Every file is first written under a temporary name in the destination folder and then renamed, so a
crash or a full disk never leaves a half-written NIfTI or CSV that looks like a result.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from monai.data import NibabelWriter

__all__ = [
    "SUBJECT_META",
    "AtomicNibabelWriter",
    "OutputExistsError",
    "atomic_path",
    "name_after_subject",
    "write_csv",
    "write_json",
    "subject_files",
    "cohort_files",
    "refuse_existing",
    "top_fraction_mean",
    "readable",
    "volume_ml",
]

COHORT_FILES = ("scores.csv", "report.html", "run.json")
SUBJECT_SUFFIXES = ("_anomaly.nii.gz", "_anomaly_mask.nii.gz", "_overview.png")
SUBJECT_META = "cs3f_subject"  # the metadata key that carries the subject id to the writers


class OutputExistsError(FileExistsError):
    """Results are already in the output folder; the message says how to overwrite them."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffixes, so writers pick the same format); rename on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results get the mode of a normally created file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's NIfTI writer, writing through ``atomic_path``: give it to ``SaveImaged`` (``writer``)."""

    def write(self, filename: str | os.PathLike, verbose: bool = False, **obj_kwargs) -> None:
        with atomic_path(filename) as tmp:
            super().write(str(tmp), verbose=verbose, **obj_kwargs)


def name_after_subject(metadict: dict, saver: object) -> dict[str, str]:
    """``SaveImaged``'s ``output_name_formatter``: ``<subject>_<postfix>`` (the subject id, not the input file name).

    MONAI's folder layout drops what looks like a file extension from the name it is given, so the id is handed over
    with one (a subject ``patient.1`` stays ``patient.1``)."""
    return {"subject": f"{metadict[SUBJECT_META]}.nii.gz", "idx": None}


def write_csv(rows: Sequence[dict], path: str | os.PathLike, fieldnames: Sequence[str]) -> Path:
    rows = [{k: readable(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def readable(name: str) -> str:
    """A file-derived name as valid UTF-8 text: bytes that are not UTF-8 (which Python keeps as surrogates)
    become ``\\xNN`` escapes, so tables and figures stay readable and the name still says which file it was."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    return Path(path)


def subject_files(output_dir: str | os.PathLike, subject: str) -> dict[str, Path]:
    """The per-subject output files: heat map, binary mask, overview figure."""
    keys = ("anomaly", "anomaly_mask", "overview")
    return {k: Path(output_dir) / f"{subject}{s}" for k, s in zip(keys, SUBJECT_SUFFIXES)}


def cohort_files(output_dir: str | os.PathLike) -> dict[str, Path]:
    return {name.split(".")[0]: Path(output_dir) / name for name in COHORT_FILES}


def refuse_existing(output_dir: str | os.PathLike, subjects: Sequence[str], overwrite: bool) -> None:
    """Stop before any work if results of this cohort are already in ``output_dir`` and ``overwrite`` is off."""
    if overwrite:
        return
    existing = [p for p in cohort_files(output_dir).values() if p.exists()]
    existing += [p for s in subjects for p in subject_files(output_dir, s).values() if p.exists()]
    if existing:
        shown = ", ".join(str(p) for p in existing[:3]) + (
            f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        )
        raise OutputExistsError(
            f"output_dir already holds results ({shown}); choose another --output_dir or pass --overwrite true to replace them"
        )


def top_fraction_mean(values: np.ndarray, fraction: float) -> float:
    """Mean of the highest ``fraction`` of ``values`` (at least one value): a subject score robust to single hot voxels."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return float("nan")
    k = max(1, int(np.ceil(fraction * values.size)))
    return float(np.partition(values, values.size - k)[-k:].mean())


def volume_ml(binary: np.ndarray, affine: np.ndarray) -> float:
    """Volume of the voxels set in ``binary``, in millilitres, from the voxel size of ``affine``."""
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))
    return float(np.count_nonzero(binary)) * voxel_mm3 / 1000.0
