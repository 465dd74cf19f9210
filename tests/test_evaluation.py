"""The evaluation workflow: evaluate.json end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np

from helpers import INFERENCE, PHANTOM, ROOT, TINY_VIT_SETTINGS
from scripts.evaluation import GroundTruthEvaluation
from scripts.outputs import subject_files
from scripts.phantoms import make_phantom_cohort
from scripts.run_report import RunReport
from scripts.token_cache import file_digest


def test_evaluate_workflow_end_to_end(tmp_path):
    make_phantom_cohort(tmp_path / "c", n_subjects=4, shape=(40, 48, 40), spacing=3.5, n_lesion_free=1, seed=3)
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        repr([str(INFERENCE), str(ROOT / "bundle" / "configs" / "evaluate.json")]),
        "--dataset_dir",
        str(tmp_path / "c"),
        "--output_dir",
        str(out),
        "--progress",
        "false",
    ]
    for key, value in {**PHANTOM, **TINY_VIT_SETTINGS, "label_pattern": "{id}/{id}_lesion.nii.gz"}.items():
        args += [f"--{key}", repr(value) if isinstance(value, dict) else str(value)]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["subject"] for r in rows] == ["sub-01", "sub-02", "sub-03", "sub-04", "POOLED"]
    assert rows[-1]["lesion_voxels"] == str(sum(int(r["lesion_voxels"]) for r in rows[:-1]))
    assert rows[3]["lesion_voxels"] == "0" and rows[3]["auroc"] == "nan"  # the lesion-free subject
    summary = json.loads((out / "metrics.json").read_text())
    assert 0 <= summary["subject_auroc"] <= 1  # healthy and lesion subjects are mixed
    assert "is NOT a pretrained network" in (out / "metrics.md").read_text()
    for name in ("metrics_summary.png", "sub-01_eval.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def _evaluated_run(tmp_path):
    """Two subjects' written results, ground truth and the run's record of them, as a finished run leaves them."""
    data, out = tmp_path / "data", tmp_path / "out"
    out.mkdir()
    rng = np.random.default_rng(0)
    report = RunReport(threshold=1.0, output_dir=str(out))
    for sid in ("sub-01", "sub-02"):
        (data / sid).mkdir(parents=True)
        image = rng.random((10, 12, 8)).astype(np.float32)
        truth = np.zeros(image.shape, np.uint8)
        truth[3:6, 4:7, 2:5] = 1
        nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 3.0, 1.0])), data / sid / f"{sid}.nii.gz")
        nib.save(nib.Nifti1Image(truth, np.eye(4)), data / sid / f"{sid}_lesion.nii.gz")
        files = subject_files(out, sid)
        heat = image + truth
        nib.save(nib.Nifti1Image(heat, np.eye(4)), files["anomaly"])
        nib.save(nib.Nifti1Image((heat >= 1).astype(np.uint8), np.eye(4)), files["anomaly_mask"])
        row = {"subject": sid, "subject_score": float(heat.max()), "lesion_volume_ml": 0.0}
        report.subjects.append({**row, "image": str(data / sid / f"{sid}.nii.gz")})
        written = {p.name: file_digest(p) for p in (files["anomaly"], files["anomaly_mask"])}
        report.results[sid] = {"key": f"results of {sid}", "files": written, "row": row}
    return data, out, report


def test_a_re_evaluation_draws_only_the_figures_whose_content_changed(tmp_path, monkeypatch):
    """Like the run's own files: a figure is kept when the subject's results, ground truth and mask are the same and
    the file is intact, and drawn again when any of them changed."""
    data, out, report = _evaluated_run(tmp_path)
    drawn = []
    draw = GroundTruthEvaluation._figure

    def counted(image_path, heat, truth, path, row):
        drawn.append(path.name)
        draw(image_path, heat, truth, path, row)

    monkeypatch.setattr(GroundTruthEvaluation, "_figure", staticmethod(counted))
    evaluation = GroundTruthEvaluation(str(data), "{id}/{id}_lesion.nii.gz", str(out), verbose=False)

    def evaluate() -> list[str]:
        drawn.clear()
        summary = evaluation.evaluate(report)
        assert sorted(summary["figures"]) == ["sub-01", "sub-02"]
        assert json.loads((out / "metrics.json").read_text())["figures"] == summary["figures"]
        return sorted(drawn)

    assert evaluate() == ["sub-01_eval.png", "sub-02_eval.png"]
    first = (out / "sub-01_eval.png").read_bytes()
    assert evaluate() == []  # nothing changed: metrics computed again, nothing drawn
    assert (out / "sub-01_eval.png").read_bytes() == first
    truth = nib.load(data / "sub-02" / "sub-02_lesion.nii.gz").get_fdata().astype(np.uint8)
    truth[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(truth, np.eye(4)), data / "sub-02" / "sub-02_lesion.nii.gz")
    assert evaluate() == ["sub-02_eval.png"]  # its ground truth changed
    report.results["sub-01"]["key"] = "results of sub-01, scored again"
    assert evaluate() == ["sub-01_eval.png"]  # its results changed
    (out / "sub-02_eval.png").write_bytes(b"not the figure")
    assert evaluate() == ["sub-02_eval.png"]  # the file was damaged
    (out / "metrics.json").write_text("{")
    assert evaluate() == ["sub-01_eval.png", "sub-02_eval.png"]  # no readable record of what was drawn
