"""find_subjects: flat folders, case folders, DICOM folders, masks, and the problems it reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.cohort import find_subjects, match_pattern


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x00")


def _ids(subjects):
    return [s["subject"] for s in subjects]


def test_flat_folder(tmp_path):
    _touch(tmp_path, "b.nii.gz", "a.nii.gz", "c.nii.gz", "notes.txt", "d.nii", ".hidden.nii.gz", ".cache/e.nii.gz")
    subjects, problems = find_subjects(tmp_path)
    assert problems == []
    assert subjects == [{"subject": s, "image": str(tmp_path / f"{s}.nii.gz")} for s in ("a", "b", "c")]


def test_flat_folder_with_masks_next_to_images(tmp_path):
    """``{id}.nii.gz`` also matches ``x_mask.nii.gz``: masks must not become subjects of their own."""
    _touch(tmp_path, "a.nii.gz", "a_mask.nii.gz", "b.nii.gz", "b_mask.nii.gz")
    subjects, problems = find_subjects(tmp_path, "{id}.nii.gz", "{id}_mask.nii.gz")
    assert problems == []
    assert subjects == [
        {"subject": "a", "image": str(tmp_path / "a.nii.gz"), "mask": str(tmp_path / "a_mask.nii.gz")},
        {"subject": "b", "image": str(tmp_path / "b.nii.gz"), "mask": str(tmp_path / "b_mask.nii.gz")},
    ]


def test_case_folders(tmp_path):
    _touch(
        tmp_path,
        "sub-01/sub-01_flair.nii.gz",
        "sub-01/sub-01_brainmask.nii.gz",
        "sub-01/sub-01_t1.nii.gz",
        "sub-02/sub-02_flair.nii.gz",
        "sub-02/sub-02_brainmask.nii.gz",
        "sub-03/sub-04_flair.nii.gz",  # folder and file disagree: not a subject of this pattern
    )
    subjects, problems = find_subjects(tmp_path, "{id}/{id}_flair.nii.gz", "{id}/{id}_brainmask.nii.gz")
    assert problems == []
    assert _ids(subjects) == ["sub-01", "sub-02"]
    assert subjects[1] == {
        "subject": "sub-02",
        "image": str(tmp_path / "sub-02/sub-02_flair.nii.gz"),
        "mask": str(tmp_path / "sub-02/sub-02_brainmask.nii.gz"),
    }


def test_brats_like_fixed_file_names(tmp_path):
    _touch(tmp_path, "case_7/Flair.nii.gz", "case_7/brainmask.nii.gz", "case_8/Flair.nii.gz", "case_8/brainmask.nii.gz")
    subjects, problems = find_subjects(tmp_path, "{id}/Flair.nii.gz", "{id}/brainmask.nii.gz")
    assert problems == []
    assert subjects == [
        {"subject": c, "image": str(tmp_path / c / "Flair.nii.gz"), "mask": str(tmp_path / c / "brainmask.nii.gz")}
        for c in ("case_7", "case_8")
    ]


def test_overlapping_patterns_in_case_folders(tmp_path):
    _touch(tmp_path, "p1/scan.nii.gz", "p1/scan_mask.nii.gz", "p2/img.nii.gz", "p2/img_mask.nii.gz")
    subjects, problems = find_subjects(tmp_path, "{id}/*.nii.gz", "{id}/*_mask.nii.gz")
    assert problems == []
    assert [(s["subject"], Path(s["image"]).name, Path(s["mask"]).name) for s in subjects] == [
        ("p1", "scan.nii.gz", "scan_mask.nii.gz"),
        ("p2", "img.nii.gz", "img_mask.nii.gz"),
    ]


def test_pattern_without_id_uses_the_file_name(tmp_path):
    _touch(tmp_path, "scans/x1.nii.gz", "scans/x2.NII.GZ", "scans/x3.nrrd", "scans/x4.mha", "other/x5.nii.gz")
    subjects, problems = find_subjects(tmp_path, "scans/*")
    assert problems == []
    assert _ids(subjects) == ["x1", "x2", "x3", "x4"]
    assert subjects[2]["image"] == str(tmp_path / "scans/x3.nrrd")


def test_dicom_folders(tmp_path):
    _touch(tmp_path, "pat1/IM0001.dcm", "pat1/IM0002.dcm", "pat2/IM0001.dcm")
    subjects, problems = find_subjects(tmp_path, "{id}")
    assert problems == []
    assert subjects == [{"subject": p, "image": str(tmp_path / p)} for p in ("pat1", "pat2")]
    assert all(Path(s["image"]).is_dir() for s in subjects)


def test_missing_mask_is_reported_and_others_remain(tmp_path):
    _touch(
        tmp_path,
        "a/a_flair.nii.gz",
        "a/a_brainmask.nii.gz",
        "b/b_flair.nii.gz",
        "c/c_flair.nii.gz",
        "c/c_brainmask.nii.gz",
    )
    subjects, problems = find_subjects(tmp_path, "{id}/{id}_flair.nii.gz", "{id}/{id}_brainmask.nii.gz")
    assert _ids(subjects) == ["a", "c"]
    assert len(problems) == 1
    assert problems[0].startswith("b ")
    assert str(tmp_path / "b/b_flair.nii.gz") in problems[0]
    assert "no mask" in problems[0] and "{id}/{id}_brainmask.nii.gz" in problems[0]


def test_two_masks_for_one_subject_are_reported(tmp_path):
    _touch(tmp_path, "a/img.nii.gz", "a/m1_mask.nii.gz", "a/m2_mask.nii.gz", "b/img.nii.gz", "b/m_mask.nii.gz")
    subjects, problems = find_subjects(tmp_path, "{id}/img.nii.gz", "{id}/*_mask.nii.gz")
    assert _ids(subjects) == ["b"]
    assert len(problems) == 1 and "2 masks" in problems[0]
    assert str(tmp_path / "a/m1_mask.nii.gz") in problems[0] and str(tmp_path / "a/m2_mask.nii.gz") in problems[0]


def test_id_with_glob_characters_finds_its_mask(tmp_path):
    """Subject ids are literal text: ``[`` in an id must not turn the mask lookup into a character class."""
    _touch(tmp_path, "case[1].nii.gz", "case[1]_mask.nii.gz", "b.nii.gz", "b_mask.nii.gz")
    subjects, problems = find_subjects(tmp_path, "{id}.nii.gz", "{id}_mask.nii.gz")
    assert problems == []
    assert _ids(subjects) == ["b", "case[1]"]
    assert subjects[1]["mask"] == str(tmp_path / "case[1]_mask.nii.gz")


def test_duplicate_ids(tmp_path):
    _touch(tmp_path, "a.nii", "a.nii.gz", "b.nii.gz")
    with pytest.raises(ValueError, match="'a' matches two images") as info:
        find_subjects(tmp_path, "{id}.nii*")
    assert str(tmp_path / "a.nii") in str(info.value) and str(tmp_path / "a.nii.gz") in str(info.value)
    _touch(tmp_path, "s1/t1.nii.gz", "s2/t1.nii.gz")
    with pytest.raises(ValueError, match="'t1' matches two images"):
        find_subjects(tmp_path, "*/t1.nii.gz")


def test_bad_arguments(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        find_subjects(missing)
    (tmp_path / "file.nii.gz").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        find_subjects(tmp_path / "file.nii.gz")
    with pytest.raises(ValueError, match="mask_pattern"):
        find_subjects(tmp_path, "{id}.nii.gz", "mask.nii.gz")
    with pytest.raises(ValueError, match="image_pattern"):
        find_subjects(tmp_path, "*.nii.gz", "{id}_mask.nii.gz")


def test_alternative_image_patterns_mix_files_and_dicom_folders(tmp_path):
    """A cohort of NRRD case folders and a DICOM series folder: the first pattern that finds a subject wins."""
    _touch(
        tmp_path,
        "lung1/image.nrrd",
        "lung1/label.nrrd",
        "lung2/image.nrrd",
        "thorax/slice000.dcm",
        "thorax/slice001.dcm",
    )
    subjects, problems = find_subjects(tmp_path, ["{id}/image.nrrd", "{id}"])
    assert problems == []
    assert subjects == [
        {"subject": "lung1", "image": str(tmp_path / "lung1/image.nrrd")},
        {"subject": "lung2", "image": str(tmp_path / "lung2/image.nrrd")},
        {"subject": "thorax", "image": str(tmp_path / "thorax")},
    ]
    with pytest.raises(ValueError, match="every pattern"):
        find_subjects(tmp_path, ["{id}/image.nrrd", "*"])
    with pytest.raises(ValueError, match="empty list"):
        find_subjects(tmp_path, [])


def test_a_subject_skipped_by_one_pattern_is_not_taken_by_the_next(tmp_path):
    """The mask problem is reported once; a later pattern does not bring the subject back without its mask."""
    _touch(tmp_path, "a/image.nrrd", "a/mask.nrrd", "b/image.nrrd", "c/x.dcm", "c/mask.nrrd")
    subjects, problems = find_subjects(tmp_path, ["{id}/image.nrrd", "{id}"], "{id}/mask.nrrd")
    assert _ids(subjects) == ["a", "c"]
    assert subjects[1] == {"subject": "c", "image": str(tmp_path / "c"), "mask": str(tmp_path / "c/mask.nrrd")}
    assert len(problems) == 1 and "b/image.nrrd" in problems[0]


def test_empty_folder_gives_no_subjects(tmp_path):
    assert find_subjects(tmp_path) == ([], [])


def test_match_pattern(tmp_path):
    _touch(tmp_path, "a/x.nii.gz", "b/x.nii.gz", ".git/x.nii.gz")
    assert match_pattern(tmp_path, "{id}/x.nii.gz") == [tmp_path / "a/x.nii.gz", tmp_path / "b/x.nii.gz"]
    assert match_pattern(tmp_path, "{id}/x.nii.gz", "b") == [tmp_path / "b/x.nii.gz"]


def test_optional_masks_keep_subjects_without_one(tmp_path):
    for name in ("a.nii.gz", "a_mask.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    subjects, problems = find_subjects(tmp_path, "{id}.nii.gz", "{id}_mask.nii.gz", require_mask=False)
    assert problems == []
    assert subjects == [
        {"subject": "a", "image": str(tmp_path / "a.nii.gz"), "mask": str(tmp_path / "a_mask.nii.gz")},
        {"subject": "b", "image": str(tmp_path / "b.nii.gz")},
    ]
    _, problems = find_subjects(tmp_path, "{id}.nii.gz", "{id}_mask.nii.gz")
    assert len(problems) == 1 and "b.nii.gz" in problems[0]


MSLUB_PRESET = Path(__file__).resolve().parents[1] / "configs" / "mslub_flair.json"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED_DATA / "mslub_mni").is_dir(), reason=f"real MSLUB data not present at {SHARED_DATA}")
def test_mslub_preset_gives_brats_references_their_brain_masks():
    """BraTS FLAIR is z-scored with no zero voxels, so a non-zero rule would call the whole field of view brain:
    the preset's BraTS references bring their masks, the skull-stripped MSLUB cases get theirs from intensity."""
    import json

    preset = json.loads(MSLUB_PRESET.read_text())
    subjects, problems = find_subjects(
        SHARED_DATA, preset["image_pattern"], preset["mask_pattern"], preset["require_mask"]
    )
    assert problems == []
    with_mask = {s["subject"] for s in subjects if "mask" in s}
    assert with_mask == {s["subject"] for s in subjects if s["subject"].startswith("brats")} and len(with_mask) == 4
    assert {"patient07", "patient19"} <= set(_ids(subjects)) - with_mask
    assert preset["foreground_threshold"] == "nonzero"
