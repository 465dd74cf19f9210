"""Voxel metrics: the pooled ranking metrics are scikit-learn's, computed inside the masks only."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from scripts.metrics import best_dice, dice, subject_metrics, voxel_metrics


def _cohort(seed: int):
    rng = np.random.default_rng(seed)
    heats, truths, masks = [], [], []
    for shape in [(6, 7, 5), (4, 8, 6), (5, 5, 5)]:
        truth = rng.random(shape) < 0.15
        heat = rng.random(shape) + 0.6 * truth  # informative but imperfect
        mask = rng.random(shape) < 0.8
        heats.append(heat.astype(np.float32))
        truths.append(truth)
        masks.append(mask)
    return heats, truths, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voxel_metrics_match_sklearn(seed):
    heats, truths, masks = _cohort(seed)
    scores = np.concatenate([h[m] for h, m in zip(heats, masks)])
    labels = np.concatenate([t[m] for t, m in zip(truths, masks)])
    threshold = 0.9
    out = voxel_metrics(heats, truths, masks, threshold)
    assert out["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["average_precision"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    pred = scores >= threshold
    expected_dice = 2 * np.sum(pred & labels) / (pred.sum() + labels.sum())
    assert out["dice"] == pytest.approx(expected_dice, abs=1e-6)  # MONAI's compute_dice sums in float32
    assert out["lesion_fraction"] == pytest.approx(labels.mean(), abs=1e-12)
    assert 0.5 < out["auroc"] < 1.0


def test_voxels_outside_masks_are_ignored():
    heats, truths, masks = _cohort(3)
    base = voxel_metrics(heats, truths, masks, 0.9)
    # make everything outside the masks maximally misleading: the metrics must not move
    spoiled = [np.where(m, h, np.where(t, -10.0, 10.0)).astype(np.float32) for h, t, m in zip(heats, truths, masks)]
    assert voxel_metrics(spoiled, truths, masks, 0.9) == base


def test_single_class_gives_nan_ranking_metrics():
    heats, _, masks = _cohort(4)
    empty = [np.zeros(h.shape, bool) for h in heats]
    out = voxel_metrics(heats, empty, masks, 0.5)
    assert math.isnan(out["auroc"]) and math.isnan(out["average_precision"])
    assert out["lesion_fraction"] == 0.0
    assert out["dice"] == 0.0  # predictions exist (heat >= 0.5), truth is empty
    full = [np.ones(h.shape, bool) for h in heats]
    out = voxel_metrics(heats, full, masks, 0.5)
    assert math.isnan(out["auroc"]) and out["lesion_fraction"] == 1.0


def test_perfect_separation():
    truth = np.zeros((4, 4, 4), bool)
    truth[1:3, 1:3, 1:3] = True
    heat = truth.astype(np.float32) * 0.7 + 0.1
    out = voxel_metrics([heat], [truth], [np.ones_like(truth)], 0.5)
    assert out["auroc"] == 1.0 and out["average_precision"] == 1.0 and out["dice"] == 1.0


def test_dice_edge_cases():
    empty = np.zeros((3, 3), bool)
    a = np.zeros((3, 3), bool)
    a[0, :] = True  # 3 voxels
    b = np.zeros((3, 3), bool)
    b[0, :2] = True  # 2 voxels, both in a
    b[2, 2] = True  # 1 voxel outside a
    assert dice(empty, empty) == 1.0
    assert dice(a, empty) == 0.0 and dice(empty, a) == 0.0
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(a, b) == pytest.approx(2 * 2 / (3 + 3))
    assert dice(a, b) == dice(b, a)
    assert isinstance(dice(a, b), float)
    # non-boolean inputs count as "non-zero"
    assert dice(a.astype(np.uint8) * 5, b.astype(np.float32)) == pytest.approx(2 / 3)


def test_best_dice_is_the_best_over_all_thresholds():
    rng = np.random.default_rng(0)
    truth = rng.random(400) < 0.2
    scores = rng.random(400) + truth * 0.4
    got, at = best_dice(scores, truth)
    brute = max(dice(scores >= t, truth) for t in np.unique(scores))
    assert abs(got - brute) < 1e-6  # MONAI's compute_dice sums in float32
    assert abs(dice(scores >= at, truth) - got) < 1e-6
    assert np.isnan(best_dice(scores, np.zeros(400, bool))[0])


def test_subject_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    truth = rng.random(1000) < 0.1
    scores = rng.normal(size=1000) + truth
    m = subject_metrics(scores, truth, scores > 1.0)
    assert m["auroc"] == roc_auc_score(truth, scores)
    assert m["dice_at_threshold"] == dice(scores > 1.0, truth)
    assert m["lesion_voxels"] == truth.sum()
