"""Voxel-level accuracy of heat maps against ground truth: MONAI computes the Dice, scikit-learn the ranking
metrics (AUROC, average precision and the precision-recall curve, exact with tied scores, on the flat voxel
arrays pooled over a cohort).

All functions take in-mask voxels: what lies outside a subject's brain or body mask is not scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

__all__ = ["dice", "ranking_metrics", "best_dice", "subject_metrics", "voxel_metrics"]


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two binary arrays (MONAI's ``compute_dice``); 1.0 when both are empty."""
    as_batch = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=bool)).reshape(1, 1, -1)  # noqa: E731
    return float(compute_dice(as_batch(prediction), as_batch(truth), include_background=True, ignore_empty=False))


def ranking_metrics(scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Voxel AUROC and average precision; NaN when the voxels hold only one class (both are undefined)."""
    both = 0 < truth.sum() < truth.size
    return {
        "auroc": float(roc_auc_score(truth, scores)) if both else float("nan"),
        "average_precision": float(average_precision_score(truth, scores)) if both else float("nan"),
    }


def best_dice(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Highest Dice over all thresholds of ``scores`` (= the best F1 of the precision-recall curve) and where."""
    if not truth.any():
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(truth, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best]) if len(thresholds) else float("nan")


def subject_metrics(scores: np.ndarray, truth: np.ndarray, flagged: np.ndarray) -> dict[str, float]:
    """Metrics of one subject (or of pooled voxels): 1-D in-mask ``scores``, ``truth`` and ``flagged`` arrays."""
    top, at = best_dice(scores, truth)
    return {
        "lesion_voxels": int(truth.sum()),
        **ranking_metrics(scores, truth),
        "best_dice": top,
        "best_dice_threshold": at,
        "dice_at_threshold": dice(flagged, truth) if truth.any() else float("nan"),
        "flagged_fraction": float(flagged.mean()) if flagged.size else float("nan"),
        "lesion_fraction": float(truth.mean()) if truth.size else float("nan"),
    }


def voxel_metrics(
    heats: Sequence[np.ndarray], truths: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float
) -> dict[str, float]:
    """Pooled voxel AUROC and average precision inside the masks, and Dice at ``threshold``.

    AUROC and AP are undefined (NaN) when the pooled voxels hold only one class.
    """
    scores = np.concatenate([np.asarray(h, np.float32)[np.asarray(m, bool)] for h, m in zip(heats, masks)])
    labels = np.concatenate([np.asarray(t, bool)[np.asarray(m, bool)] for t, m in zip(truths, masks)])
    return {
        **ranking_metrics(scores, labels),
        "dice": dice(scores >= threshold, labels),
        "lesion_fraction": float(labels.mean()),
    }
