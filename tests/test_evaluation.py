"""The evaluation workflow: metric functions against brute force / scikit-learn, and evaluate.json end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
from sklearn.metrics import roc_auc_score

from scripts.evaluation import best_dice, subject_metrics
from scripts.metrics import dice
from scripts.phantoms import make_phantom_cohort
from test_bundle import INFERENCE, PHANTOM, ROOT, TINY_VIT


def test_best_dice_is_the_best_over_all_thresholds():
    rng = np.random.default_rng(0)
    truth = rng.random(400) < 0.2
    scores = rng.random(400) + truth * 0.4
    got, at = best_dice(scores, truth)
    brute = max(dice(scores >= t, truth) for t in np.unique(scores))
    assert abs(got - brute) < 1e-12
    assert abs(dice(scores >= at, truth) - got) < 1e-12
    assert np.isnan(best_dice(scores, np.zeros(400, bool))[0])


def test_subject_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    truth = rng.random(1000) < 0.1
    scores = rng.normal(size=1000) + truth
    m = subject_metrics(scores, truth, scores > 1.0)
    assert m["auroc"] == roc_auc_score(truth, scores)
    assert m["dice_at_threshold"] == dice(scores > 1.0, truth)
    assert m["lesion_voxels"] == truth.sum()


def test_evaluate_workflow_end_to_end(tmp_path):
    make_phantom_cohort(tmp_path / "c", n_subjects=4, shape=(40, 48, 40), spacing=3.5, n_lesion_free=1, seed=3)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
            repr([str(INFERENCE), str(ROOT / "bundle" / "configs" / "evaluate.json")]),
            "--dataset_dir", str(tmp_path / "c"), "--output_dir", str(out), "--progress", "false"]
    for key, value in {**PHANTOM, **TINY_VIT, "label_pattern": "{id}/{id}_lesion.nii.gz"}.items():
        args += [f"--{key}", repr(value) if isinstance(value, dict) else str(value)]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["subject"] for r in rows] == ["sub-01", "sub-02", "sub-03", "sub-04", "POOLED"]
    assert rows[-1]["lesion_voxels"] == str(sum(int(r["lesion_voxels"]) for r in rows[:-1]))
    assert rows[3]["lesion_voxels"] == "0" and rows[3]["auroc"] == "nan"  # the lesion-free subject
    summary = json.loads((out / "metrics.json").read_text())
    assert 0 <= summary["subject_auroc"] <= 1  # healthy and lesion subjects are mixed
    assert "is NOT DINOv2" in (out / "metrics.md").read_text()
    for name in ("metrics_summary.png", "sub-01_eval.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
