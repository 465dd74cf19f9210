"""The bundle under bad settings, bad inputs and crashes: nobody's results are lost or silently changed.

One test per problem found by probing the bundle (issue 11, "Bundle"): each of them failed before the fix.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import TINY_VIT_SETTINGS, run_bundle, run_in_process, write_nifti
from scripts.input_limits import CheckInputSized
from scripts.outputs import AtomicNibabelWriter, subject_files
from scripts.phantoms import make_phantom_cohort
from scripts.run_folder import INCOMPLETE, LOCK, OutputFolderError, RunFolder
from scripts.run_report import EXIT_SKIPPED
from scripts.transforms import CohortInputError
from scripts.values import as_bool

FLAT = {"image_pattern": "{id}.nii.gz", "mask_pattern": "masks/{id}.nii.gz", "require_mask": False}


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    return make_phantom_cohort(
        tmp_path_factory.mktemp("cohort"), n_subjects=4, shape=(40, 48, 40), spacing=3.5, n_lesion_free=1, seed=3
    )


def flat_cohort(records: list[dict], folder: Path) -> Path:
    """The phantoms as ``<id>.nii.gz`` with ``masks/<id>.nii.gz`` (links: inputs are never modified)."""
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for r in records:
        os.symlink(r["image"], folder / f"{r['subject']}.nii.gz")
        os.symlink(r["mask"], folder / "masks" / f"{r['subject']}.nii.gz")
    return folder


def run(data: Path, out: Path, **overrides) -> dict:
    run_in_process(
        **{
            "dataset_dir": str(data),
            "output_dir": str(out),
            **FLAT,
            **TINY_VIT_SETTINGS,
            "cache_dir": "",
            "overwrite": True,
            **overrides,
        }
    )
    return json.loads((out / "run.json").read_text())


def results(out: Path) -> dict[str, bytes]:
    """Every file of the output folder but the run lock (which records who last held it)."""
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != LOCK}


def rows(out: Path) -> dict[str, dict]:
    return {r["subject"]: r for r in csv.DictReader(open(out / "scores.csv"))}


def test_false_on_the_command_line_is_false(records, tmp_path):
    data, out = flat_cohort(records, tmp_path / "data"), tmp_path / "out"
    first = run_bundle(tmp_path, dataset_dir=data, output_dir=out, write_overview="false", **FLAT, **TINY_VIT_SETTINGS)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not list(out.glob("*_overview.png"))  # "false" was read as false, not as a non-empty string
    before = results(out)

    again = run_bundle(tmp_path, dataset_dir=data, output_dir=out, overwrite="false", **FLAT, **TINY_VIT_SETTINGS)
    assert again.returncode not in (0, EXIT_SKIPPED)
    assert "already holds results" in again.stderr
    assert results(out) == before

    assert as_bool("False", "x") is False and as_bool("yes", "x") is True and as_bool(0, "x") is False
    with pytest.raises(ValueError, match="overwrite must be true or false, got 'flase'"):
        as_bool("flase", "overwrite")


def test_a_second_run_into_the_same_folder_is_refused(records, tmp_path):
    data, out = flat_cohort(records, tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    with RunFolder(out), pytest.raises(OutputFolderError, match="in use by another CS3F run"):
        run(data, out)
    assert not (out / "scores.csv").exists() and not list(out.glob("sub-*"))


def test_output_dir_inside_the_dataset_or_unwritable_is_refused_up_front(records, tmp_path):
    data = flat_cohort(records, tmp_path / "data")
    for out in (data, data / "results"):
        with pytest.raises(OutputFolderError, match="dataset"):
            run(data, out)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OutputFolderError, match="cannot be written"):
        run(data, tmp_path / "a_file" / "out")
    assert sorted(p.name for p in data.iterdir()) == sorted(["masks", *(f"{r['subject']}.nii.gz" for r in records)])


def _huge_header(path: Path, shape=(10000, 10000, 10000)) -> Path:
    """A NIfTI header that claims ``shape`` float32 voxels, followed by almost no data (a decompression bomb's header)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_zooms((1.0, 1.0, 1.0))
    header["vox_offset"] = 352
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * 1024)
    return path


def test_degenerate_and_implausible_inputs_are_refused_and_change_nobody_elses_results(records, tmp_path):
    clean = run(flat_cohort(records, tmp_path / "clean"), tmp_path / "clean_out")
    data = flat_cohort(records, tmp_path / "data")
    image = nib.load(records[0]["image"])
    speck = np.zeros(image.shape, np.uint8)
    speck[20, 24, 20] = 1  # a one-voxel mask
    os.symlink(records[0]["image"], data / "speck.nii.gz")
    write_nifti(data / "masks" / "speck.nii.gz", speck, image.affine)
    write_nifti(data / "tiny.nii.gz", np.random.default_rng(0).random((3, 3, 3)).astype(np.float32), np.eye(4))
    write_nifti(
        data / "thick.nii.gz", np.random.default_rng(1).random((8, 8, 8)).astype(np.float32), np.diag([50.0, 50, 50, 1])
    )
    _huge_header(data / "huge.nii.gz")

    report = run(data, tmp_path / "out")
    problems = "\n".join(report["problems"])
    assert len(report["problems"]) == 4, problems
    assert "speck.nii.gz: the foreground spans only 3.5 x 3.5 x 3.5 mm" in problems
    assert "tiny.nii.gz (computed foreground): the foreground spans only" in problems
    assert "thick.nii.gz: implausible voxel size 50 x 50 x 50 mm" in problems
    assert "huge.nii.gz: the header declares 10000 x 10000 x 10000" in problems
    # the refused subjects did not move the cohort threshold nor anybody's flagged volume
    assert report["threshold"]["score"] == pytest.approx(clean["threshold"]["score"])
    assert {s: r["lesion_volume_ml"] for s, r in rows(tmp_path / "out").items()} == {
        s: r["lesion_volume_ml"] for s, r in rows(tmp_path / "clean_out").items()
    }


def test_input_limits_read_headers_only(tmp_path):
    check = CheckInputSized("image", max_voxels=64**3, max_voxel_size_mm=20, spacing=1.0)
    ok = write_nifti(tmp_path / "ok.nii.gz", np.zeros((40, 40, 40), np.float32), np.diag([1.5, 1.5, 1.5, 1]))
    assert check({"image": str(ok)})["image"] == str(ok)
    fine = write_nifti(tmp_path / "fine.nii.gz", np.zeros((40, 40, 40), np.float32), np.diag([2.0, 2.0, 2.0, 1]))
    with pytest.raises(CohortInputError, match=r"fine.nii.gz: resampled to 1 mm it would have 512,000 voxels"):
        check({"image": str(fine)})  # 80^3 once resampled, above the 64^3 limit
    with pytest.raises(CohortInputError, match="huge.nii.gz: the header declares"):
        check({"image": str(_huge_header(tmp_path / "huge.nii.gz", (2000, 2000, 2000)))})


def test_bad_cache_entries_are_misses_and_an_unusable_cache_turns_itself_off(records, tmp_path):
    data, cache = flat_cohort(records, tmp_path / "data"), tmp_path / "cache"
    first = run(data, tmp_path / "first", cache_dir=str(cache))
    entries = sorted(cache.glob("*.pt"))
    nan_entry = torch.load(entries[0], weights_only=True)
    nan_entry["tokens"][:, 0, 0, 0] = float("nan")
    torch.save(nan_entry, entries[0])
    wrong = torch.load(entries[1], weights_only=True)
    wrong["tokens"] = wrong["tokens"][:, :-1]
    torch.save(wrong, entries[1])

    second = run(data, tmp_path / "second", cache_dir=str(cache))
    assert (second["token_cache"]["hits"], second["token_cache"]["misses"]) == (2, 2)
    assert second["problems"] == [] and rows(tmp_path / "second").keys() == rows(tmp_path / "first").keys()
    assert second["threshold"]["score"] == pytest.approx(first["threshold"]["score"])

    (tmp_path / "a_file").write_text("")
    third = run(data, tmp_path / "third", cache_dir=str(tmp_path / "a_file" / "cache"))
    assert third["problems"] == [] and len(rows(tmp_path / "third")) == len(records)
    assert "a_file" in third["token_cache"]["failure"]


class Killed(BaseException):
    """Stands in for kill -9 in the middle of writing (not an Exception: nothing may catch it)."""


def test_a_killed_run_leaves_the_folder_marked_and_the_next_run_completes_it(records, tmp_path, monkeypatch):
    data, out = flat_cohort(records, tmp_path / "data"), tmp_path / "out"
    run(data, out)
    written = AtomicNibabelWriter.write
    calls = []

    def dies_on_second_subject(self, *args, **kwargs):  # two NIfTI files per subject
        calls.append(1)
        if len(calls) == 3:
            (out / ".sub-02_anomaly.nii.gz.abc123.tmp.nii.gz").write_bytes(b"half")  # what kill -9 leaves behind
            raise Killed()
        return written(self, *args, **kwargs)

    monkeypatch.setattr(AtomicNibabelWriter, "write", dies_on_second_subject)
    with pytest.raises(Killed):
        run(data, out, threshold_value=2.5)  # another threshold: every subject is written again
    assert (out / INCOMPLETE).is_file()  # masks of one threshold beside run.json of the other: said so
    monkeypatch.setattr(AtomicNibabelWriter, "write", written)

    report = run(data, out, threshold_value=2.5)
    assert not (out / INCOMPLETE).exists() and not list(out.glob(".*.tmp*"))
    assert report["subjects_written"] + report["subjects_kept"] == len(records)


def test_file_names_that_are_not_utf8(records, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    for i, r in enumerate(records):
        name = b"sub-\xff%d.nii.gz" % i if i == 0 else f"{r['subject']}.nii.gz".encode()
        os.symlink(r["image"], os.path.join(os.fsencode(data), name))
    report = run(data, out, mask_pattern=None, write_overview=True)
    assert report["problems"] == []
    assert len(rows(out)) == len(records)
    assert all(f.is_file() for f in subject_files(out, os.fsdecode(b"sub-\xff0")).values())
    assert "sub-\\xff0.nii.gz" in (out / "scores.csv").read_text(encoding="utf-8")  # still UTF-8, the byte escaped
