"""Find the subjects of a cohort folder: one image per subject, optionally a mask matched by pattern.

Patterns are globs relative to ``dataset_dir`` in which ``{id}`` stands for the subject id, e.g.
``{id}.nii.gz``, or BraTS-style case folders ``{id}/{id}_flair.nii.gz`` with ``{id}/{id}_brainmask.nii.gz``.
A match may be a file (NIfTI, NRRD, MHA, ...) or a folder holding one DICOM series.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import re
from pathlib import Path

__all__ = ["find_subjects", "match_pattern", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
_ID = "{id}"


def _strip_suffix(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _id_regex(pattern: str) -> re.Pattern[str]:
    """Regex that matches a relative path against ``pattern`` and captures the ``{id}`` part."""
    parts = pattern.split(_ID)
    body = "(?P<id>[^/]+)".join(fnmatch.translate(p).removeprefix("(?s:").removesuffix(")\\Z") for p in parts)
    # every later {id} must repeat the first one
    body = body.replace("(?P<id>[^/]+)", "(?P=id)").replace("(?P=id)", "(?P<id>[^/]+)", 1)
    return re.compile(f"(?s:{body})\\Z")


def match_pattern(dataset_dir: Path, pattern: str, subject: str | None = None) -> list[Path]:
    """Paths under ``dataset_dir`` matching ``pattern`` (``{id}`` replaced by ``subject``, or any id)."""
    glob = pattern.replace(_ID, globlib.escape(subject) if subject is not None else "*")
    return sorted(p for p in dataset_dir.glob(glob) if not any(part.startswith(".") for part in p.relative_to(dataset_dir).parts))


def find_subjects(
    dataset_dir: str | Path, image_pattern: str = "{id}.nii.gz", mask_pattern: str | None = None,
    require_mask: bool = True,
) -> tuple[list[dict[str, str]], list[str]]:
    """List the subjects of a cohort.

    Returns:
        ``(subjects, problems)``: dicts ``{"subject", "image"[, "mask"]}`` sorted by subject id, and one
        message per subject that had to be left out (e.g. its mask is missing), naming the file. With
        ``require_mask=False`` a subject without a mask is kept, and its mask is computed from intensity.

    Raises:
        FileNotFoundError: ``dataset_dir`` does not exist.
        ValueError: the patterns are unusable or two images map to the same subject id.
    """
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_dir {str(root)!r} is not a folder")
    if mask_pattern and _ID not in image_pattern:
        raise ValueError(f"image_pattern {image_pattern!r} needs an {_ID} placeholder so masks can be matched to images")
    if mask_pattern and _ID not in mask_pattern:
        raise ValueError(f"mask_pattern {mask_pattern!r} needs an {_ID} placeholder")
    masks = set(match_pattern(root, mask_pattern)) if mask_pattern else set()
    regex = _id_regex(image_pattern) if _ID in image_pattern else None
    subjects: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    for path in match_pattern(root, image_pattern):
        if path in masks:
            continue
        rel = path.relative_to(root).as_posix()
        if regex is not None:
            found = regex.match(rel)
            if found is None:
                continue
            subject = found.group("id")
        else:
            subject = _strip_suffix(path.name)
        if subject in subjects:
            raise ValueError(f"subject id {subject!r} matches two images: {subjects[subject]['image']} and {path}")
        entry = {"subject": subject, "image": str(path)}
        if mask_pattern:
            candidates = match_pattern(root, mask_pattern, subject)
            if not candidates and not require_mask:
                subjects[subject] = entry
                continue
            if len(candidates) != 1:
                what = "no mask" if not candidates else f"{len(candidates)} masks ({', '.join(map(str, candidates))})"
                problems.append(f"{subject} ({path}): {what} matching {mask_pattern!r}; subject skipped")
                continue
            entry["mask"] = str(candidates[0])
        subjects[subject] = entry
    return [subjects[s] for s in sorted(subjects)], problems
