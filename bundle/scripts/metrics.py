"""Voxel-level accuracy of heat maps against ground truth, with scikit-learn doing the ranking metrics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = ["dice", "voxel_metrics"]


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two binary arrays; 1.0 when both are empty."""
    p, t = np.asarray(prediction, bool), np.asarray(truth, bool)
    total = p.sum() + t.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(p, t).sum() / total)


def voxel_metrics(
    heats: Sequence[np.ndarray], truths: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float
) -> dict[str, float]:
    """Pooled voxel AUROC and average precision inside the masks, and Dice at ``threshold``.

    AUROC and AP are undefined (NaN) when the pooled voxels hold only one class.
    """
    scores = np.concatenate([np.asarray(h, np.float32)[np.asarray(m, bool)] for h, m in zip(heats, masks)])
    labels = np.concatenate([np.asarray(t, bool)[np.asarray(m, bool)] for t, m in zip(truths, masks)])
    both = 0 < labels.sum() < labels.size
    return {
        "auroc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "average_precision": float(average_precision_score(labels, scores)) if both else float("nan"),
        "dice": dice(scores >= threshold, labels),
        "lesion_fraction": float(labels.mean()),
    }
