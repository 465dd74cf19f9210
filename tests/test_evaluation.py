"""The evaluation workflow: evaluate.json end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from helpers import INFERENCE, PHANTOM, ROOT, TINY_VIT_SETTINGS
from scripts.phantoms import make_phantom_cohort


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
