"""The demo cohort must be deterministic, correctly oriented in world space and hold the lesions it reports."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.phantoms import make_phantom_cohort

SHAPE = (48, 56, 48)
SPACING = 3.0  # with SHAPE this is the default field of view, so sizes match the default cohort
N_SUBJECTS = 4  # one subject per on-disk orientation


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[dict]:
    return make_phantom_cohort(
        tmp_path_factory.mktemp("cohort"), n_subjects=N_SUBJECTS, shape=SHAPE, spacing=SPACING, n_lesion_free=1, seed=3
    )


def _canonical(path: str) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.load(path))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_same_seed_writes_identical_files(cohort, tmp_path):
    again = make_phantom_cohort(tmp_path, n_subjects=N_SUBJECTS, shape=SHAPE, spacing=SPACING, n_lesion_free=1, seed=3)
    for first, second in zip(cohort, again):
        assert first["lesions"] == second["lesions"]
        for key in ("image", "mask", "label"):
            a, b = nib.load(first[key]), nib.load(second[key])
            np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
            np.testing.assert_array_equal(a.affine, b.affine)
            assert Path(first[key]).read_bytes() == Path(second[key]).read_bytes()


def test_an_intact_cohort_is_reused_and_a_damaged_one_rewritten(tmp_path):
    kwargs = {"n_subjects": 2, "shape": SHAPE, "spacing": SPACING, "n_lesion_free": 1, "seed": 3}
    first = make_phantom_cohort(tmp_path, **kwargs)
    stamps = {r["image"]: Path(r["image"]).stat().st_mtime_ns for r in first}
    assert make_phantom_cohort(tmp_path, **kwargs) == first
    assert {r["image"]: Path(r["image"]).stat().st_mtime_ns for r in first} == stamps, "files were rewritten"

    Path(first[0]["mask"]).write_bytes(b"damaged")
    again = make_phantom_cohort(tmp_path, **kwargs)
    assert again == first
    assert nib.load(again[0]["mask"]).shape == SHAPE  # regenerated, not trusted
    other = make_phantom_cohort(tmp_path, **{**kwargs, "seed": 4})  # other parameters: a new cohort
    assert other[0]["lesions"] != first[0]["lesions"]


def test_other_seed_and_other_subjects_differ(cohort, tmp_path):
    other = make_phantom_cohort(tmp_path, n_subjects=1, shape=SHAPE, spacing=SPACING, n_lesion_free=0, seed=4)
    first = _canonical(cohort[0]["image"]).get_fdata()
    assert np.abs(first - _canonical(other[0]["image"]).get_fdata()).mean() > 0.02
    for a, b in combinations(cohort, 2):
        assert np.abs(_canonical(a["image"]).get_fdata() - _canonical(b["image"]).get_fdata()).mean() > 0.02
        assert not np.array_equal(_canonical(a["mask"]).get_fdata(), _canonical(b["mask"]).get_fdata())


def test_files_share_grid_and_cycle_orientations(cohort):
    expected_codes = [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("P", "S", "R")]
    for index, record in enumerate(cohort):
        sid = f"sub-{index + 1:02d}"
        assert record["subject"] == sid
        images = {key: nib.load(record[key]) for key in ("image", "mask", "label")}
        for key, suffix in (("image", "flair"), ("mask", "brainmask"), ("label", "lesion")):
            assert Path(record[key]).name == f"{sid}_{suffix}.nii.gz"
            assert Path(record[key]).parent.name == sid
            assert images[key].shape == images["image"].shape
            np.testing.assert_allclose(images[key].affine, images["image"].affine)
        assert nib.aff2axcodes(images["image"].affine) == expected_codes[index]
        assert sorted(images["image"].shape) == sorted(SHAPE)
        np.testing.assert_allclose(images["image"].header.get_zooms(), (SPACING,) * 3)
        assert images["image"].get_data_dtype() == np.float32
        for key in ("mask", "label"):
            assert images[key].get_data_dtype() == np.uint8
            assert set(np.unique(np.asarray(images[key].dataobj))) <= {0, 1}
        assert not any(p.name.startswith(".tmp") for p in Path(record["image"]).parent.iterdir())


def test_lesions_are_bright_and_inside_the_brain(cohort):
    for record in cohort[:-1]:
        label = np.asarray(nib.load(record["label"]).dataobj).astype(bool)
        mask = np.asarray(nib.load(record["mask"]).dataobj).astype(bool)
        image = nib.load(record["image"]).get_fdata()
        assert 1 <= len(record["lesions"]) <= 3
        assert label.any()
        assert not (label & ~mask).any()
        brain_median = np.median(image[mask])
        assert image[label].mean() > 1.2 * brain_median
        assert (image[label] > brain_median).mean() > 0.9


def test_lesion_free_subject_is_empty(cohort):
    assert cohort[-1]["lesions"] == []
    assert not np.asarray(nib.load(cohort[-1]["label"]).dataobj).any()


def test_reported_lesion_centres_hit_the_stored_label(cohort):
    for record in cohort:
        stored = nib.load(record["label"])
        label = np.asarray(stored.dataobj)
        for lesion in record["lesions"]:
            voxel = np.linalg.inv(stored.affine) @ np.append(lesion["center_ras_mm"], 1.0)
            assert label[tuple(np.round(voxel[:3]).astype(int))] == 1


def test_lesions_vary_in_size_contrast_and_place(tmp_path):
    records = make_phantom_cohort(tmp_path, n_subjects=6, shape=SHAPE, spacing=SPACING, seed=1)
    lesions = [(i, lesion) for i, record in enumerate(records) for lesion in record["lesions"]]
    radii = [lesion["radius_mm"] for _, lesion in lesions]
    assert min(radii) <= 4.0 and max(radii) >= 10.0
    assert all(1.4 <= lesion["contrast"] <= 2.2 for _, lesion in lesions)
    for (i, a), (j, b) in combinations(lesions, 2):
        if i != j:  # a lesion at the same place in every subject would look normal to the detector
            gap = np.linalg.norm(np.subtract(a["center_ras_mm"], b["center_ras_mm"]))
            assert gap > max(a["radius_mm"], b["radius_mm"])


def test_anatomy_agrees_in_world_space_across_orientations(cohort):
    reference = _canonical(cohort[0]["mask"])
    for record in cohort[1:]:
        other = _canonical(record["mask"])
        np.testing.assert_allclose(other.affine, reference.affine, atol=1e-4)
        assert _dice(reference.get_fdata() > 0, other.get_fdata() > 0) > 0.8


@pytest.mark.parametrize("n_subjects, n_lesion_free", [(0, 0), (2, 3), (2, -1)])
def test_rejects_bad_counts(tmp_path, n_subjects, n_lesion_free):
    with pytest.raises(ValueError):
        make_phantom_cohort(tmp_path, n_subjects=n_subjects, shape=SHAPE, n_lesion_free=n_lesion_free)
