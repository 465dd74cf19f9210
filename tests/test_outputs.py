"""Writing results: atomic, never over existing results unless asked, in the input's own space."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import SaveImaged

from helpers import LPS_AFFINE
from scripts.outputs import (
    SUBJECT_META,
    AtomicNibabelWriter,
    OutputExistsError,
    atomic_path,
    cohort_files,
    name_after_subject,
    refuse_existing,
    subject_files,
    top_fraction_mean,
    volume_ml,
    write_csv,
    write_json,
)


def test_atomic_path_success(tmp_path):
    dest = tmp_path / "sub" / "result.nii.gz"
    with atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and tmp != dest
        assert tmp.name.endswith(".nii.gz")  # same suffixes: writers pick the same format
        assert not dest.exists()
        tmp.write_text("new")
    assert dest.read_text() == "new"
    assert [p.name for p in dest.parent.iterdir()] == ["result.nii.gz"]


def test_atomic_path_exception_leaves_destination_untouched(tmp_path):
    dest = tmp_path / "scores.csv"
    dest.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(dest) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("disk full")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]


def test_atomic_path_exception_without_existing_file(tmp_path):
    dest = tmp_path / "run.json"
    with pytest.raises(KeyError):
        with atomic_path(dest):
            raise KeyError("x")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_existing(tmp_path):
    dest = tmp_path / "a.txt"
    dest.write_text("old")
    with atomic_path(dest) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_refuse_existing(tmp_path):
    refuse_existing(tmp_path / "nothing_yet", ["a", "b"], overwrite=False)  # no error
    subject_files(tmp_path, "b")["anomaly"].write_bytes(b"x")
    refuse_existing(tmp_path, ["a"], overwrite=False)  # only other subjects' files: fine
    with pytest.raises(OutputExistsError, match="--overwrite") as info:
        refuse_existing(tmp_path, ["a", "b"], overwrite=False)
    assert "b_anomaly.nii.gz" in str(info.value)
    assert isinstance(info.value, FileExistsError)
    refuse_existing(tmp_path, ["a", "b"], overwrite=True)
    cohort_files(tmp_path)["scores"].write_text("x")
    with pytest.raises(OutputExistsError, match="scores.csv"):
        refuse_existing(tmp_path, [], overwrite=False)


def test_refuse_existing_lists_at_most_three(tmp_path):
    for s in ("a", "b", "c"):
        for path in subject_files(tmp_path, s).values():
            path.write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="and 6 more"):
        refuse_existing(tmp_path, ["a", "b", "c"], overwrite=False)


def test_file_names():
    assert {k: p.name for k, p in subject_files("/out", "s1").items()} == {
        "anomaly": "s1_anomaly.nii.gz",
        "anomaly_mask": "s1_anomaly_mask.nii.gz",
        "overview": "s1_overview.png",
    }
    assert {k: p.name for k, p in cohort_files("/out").items()} == {
        "scores": "scores.csv",
        "report": "report.html",
        "run": "run.json",
    }


def test_top_fraction_mean():
    values = np.arange(1, 101, dtype=np.float64)  # 1..100
    assert top_fraction_mean(values, 0.1) == pytest.approx(np.mean(np.arange(91, 101)))
    assert top_fraction_mean(values, 0.01) == 100.0
    assert top_fraction_mean(values, 0.0) == 100.0  # at least one value
    assert top_fraction_mean(values, 1.0) == pytest.approx(50.5)
    assert top_fraction_mean(values, 0.015) == pytest.approx(99.5)  # ceil(1.5) = 2 values
    shuffled = np.random.default_rng(0).permutation(values).reshape(4, 5, 5)
    assert top_fraction_mean(shuffled, 0.1) == pytest.approx(95.5)
    assert np.isnan(top_fraction_mean(np.array([]), 0.1))


def test_volume_ml():
    binary = np.zeros((10, 10, 10), bool)
    binary[:5, :4, :2] = True  # 40 voxels
    assert volume_ml(binary, LPS_AFFINE) == pytest.approx(40 * 1.2 * 1.0 * 2.0 / 1000)  # sign of the axes ignored
    assert volume_ml(binary.astype(np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])) == pytest.approx(40 * 8 / 1000)
    rotated = np.eye(4)
    rotated[:3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]) * 1.5
    assert volume_ml(binary, rotated) == pytest.approx(40 * 1.5**3 / 1000)
    assert volume_ml(np.zeros((3, 3, 3)), LPS_AFFINE) == 0.0


def _save(key: str, postfix: str, dtype: type, output_dir) -> SaveImaged:
    """A writer as the bundle's postprocessing configures it: named after the subject, written atomically."""
    return SaveImaged(
        key,
        output_dir=output_dir,
        output_postfix=postfix,
        output_dtype=dtype,
        resample=False,
        separate_folder=False,
        print_log=False,
        writer=AtomicNibabelWriter,
        output_name_formatter=name_after_subject,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
@pytest.mark.parametrize("subject", ["sub-01", "patient.1"])
def test_saved_results_round_trip(tmp_path, dtype, subject):
    """SaveImaged with the bundle's writer: ``<subject>_<postfix>.nii.gz`` on the image's affine, nothing else left."""
    rng = np.random.default_rng(0)
    data = rng.random((1, 6, 7, 5)).astype(np.float32)
    if dtype == np.uint8:
        data = (data > 0.5).astype(np.float32)
    image = MetaTensor(torch.from_numpy(data), affine=torch.tensor(LPS_AFFINE), meta={SUBJECT_META: subject})
    _save("anomaly", "anomaly", dtype, tmp_path / "out")({"anomaly": image})
    path = tmp_path / "out" / f"{subject}_anomaly.nii.gz"
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    loaded = nib.load(str(path))
    np.testing.assert_allclose(loaded.affine, LPS_AFFINE, atol=1e-6)
    assert loaded.get_data_dtype() == dtype
    np.testing.assert_allclose(np.asarray(loaded.dataobj), data[0], atol=1e-6)


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    from monai.data import NibabelWriter

    def full_disk(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(NibabelWriter, "write", full_disk)
    image = MetaTensor(torch.zeros(1, 2, 2, 2), affine=torch.eye(4), meta={SUBJECT_META: "s"})
    with pytest.raises(Exception, match="No space left"):
        AtomicNibabelWriter().write(tmp_path / "s_anomaly.nii.gz")
    with pytest.raises(RuntimeError):
        _save("anomaly", "anomaly", np.float32, tmp_path)({"anomaly": image})
    assert list(tmp_path.iterdir()) == []


def test_write_csv_and_json(tmp_path):
    rows = [{"subject": "a", "score": 1.5}, {"subject": "b", "score": 2.0}]
    path = write_csv(rows, tmp_path / "scores.csv", ["subject", "score"])
    assert path.read_text().splitlines() == ["subject,score", "a,1.5", "b,2.0"]
    path = write_json({"x": 1, "p": tmp_path}, tmp_path / "run.json")
    assert json.loads(path.read_text()) == {"x": 1, "p": str(tmp_path)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "scores.csv"]


def test_results_get_the_permissions_of_a_normally_created_file(tmp_path):
    """Results must be readable like any file the user creates (umask), not private to the owner (0600).

    ``tempfile.mkstemp`` creates its file with mode 0600 and the rename keeps it, so without a chmod every
    result in a shared output folder would be unreadable for the group.
    """
    previous = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        expected = stat.S_IMODE(plain.stat().st_mode)  # 0o644 under umask 022
        csv_path = write_csv([{"a": 1}], tmp_path / "scores.csv", ["a"])
        _save("anomaly", "anomaly", np.float32, tmp_path)(
            {"anomaly": MetaTensor(torch.zeros(1, 2, 2, 2), affine=torch.eye(4), meta={SUBJECT_META: "x"})}
        )
        nii_path = tmp_path / "x_anomaly.nii.gz"
    finally:
        os.umask(previous)
    assert oct(stat.S_IMODE(csv_path.stat().st_mode)) == oct(expected)
    assert oct(stat.S_IMODE(nii_path.stat().st_mode)) == oct(expected)
