"""Find the subjects of a cohort folder: one image per subject, optionally a mask matched by pattern.

Patterns are globs relative to ``dataset_dir`` in which ``{id}`` stands for the subject id, e.g.
``{id}.nii.gz``, or BraTS-style case folders ``{id}/{id}_flair.nii.gz`` with ``{id}/{id}_brainmask.nii.gz``.
A match may be a file (NIfTI, NRRD, MHA, ...) or a folder holding one DICOM series. A cohort stored in more
than one layout (NRRD files for some subjects, DICOM series folders for others) takes a list of image
patterns: each subject's image is found by the first pattern that matches it.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import re
from collections.abc import Iterator, Sequence
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
    return sorted(
        p for p in dataset_dir.glob(glob) if not any(part.startswith(".") for part in p.relative_to(dataset_dir).parts)
    )


def find_subjects(
    dataset_dir: str | Path,
    image_pattern: str | Sequence[str] = "{id}.nii.gz",
    mask_pattern: str | None = None,
    require_mask: bool = True,
) -> tuple[list[dict[str, str]], list[str]]:
    """List the subjects of a cohort.

    ``image_pattern`` may be a list of alternatives, tried in order: a subject already found by an earlier
    pattern is not looked for by a later one (e.g. ``["{id}/image.nrrd", "{id}"]``: a case folder holding
    ``image.nrrd`` gives that file, any other case folder is read as a DICOM series).

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
    patterns = [image_pattern] if isinstance(image_pattern, str) else list(image_pattern)
    if not patterns:
        raise ValueError("image_pattern is an empty list")
    if (mask_pattern or len(patterns) > 1) and any(_ID not in p for p in patterns):
        raise ValueError(
            f"image_pattern {image_pattern!r} needs an {_ID} placeholder in every pattern so masks "
            "and alternative patterns can be matched to subjects"
        )
    if mask_pattern and _ID not in mask_pattern:
        raise ValueError(f"mask_pattern {mask_pattern!r} needs an {_ID} placeholder")
    masks = set(match_pattern(root, mask_pattern)) if mask_pattern else set()
    subjects: dict[str, dict[str, str]] = {}
    found_by: dict[str, tuple[str, Path]] = {}  # subject -> (pattern, image), kept or skipped
    problems: list[str] = []
    for pattern, path, subject in _images(root, patterns, masks):
        if subject in found_by:
            if found_by[subject][0] != pattern:
                continue  # found by an earlier alternative
            raise ValueError(f"subject id {subject!r} matches two images: {found_by[subject][1]} and {path}")
        found_by[subject] = (pattern, path)
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


def _images(root: Path, patterns: list[str], masks: set[Path]) -> Iterator[tuple[str, Path, str]]:
    """``(pattern, path, subject id)`` of every image the patterns match, pattern by pattern; masks excluded."""
    for pattern in patterns:
        regex = _id_regex(pattern) if _ID in pattern else None
        for path in match_pattern(root, pattern):
            if path in masks:
                continue
            if regex is None:
                yield pattern, path, _strip_suffix(path.name)
            elif (found := regex.match(path.relative_to(root).as_posix())) is not None:
                yield pattern, path, found.group("id")
