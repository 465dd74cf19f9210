"""The built-in demo: how well the planted lesions of a procedural phantom cohort were found, in words.

The demo is the bundle's evaluation (``configs/evaluate.json``) of a phantom cohort (``phantoms.py``);
``DemoReport`` turns the evaluation's numbers into ``demo_report.md`` for a first-time reader: what was planted
and what was flagged, per subject, and what the subject-level AUROC means.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .evaluation import GroundTruthEvaluation
from .outputs import atomic_path
from .run_report import banner, weights_line

__all__ = ["DemoReport"]

logger = logging.getLogger(__name__)
SHOWN_SETTINGS = ("backbone", "grid_size", "feature_blocks", "matching", "window", "alpha", "tokenization", "device")


class DemoReport:
    """Writes and prints ``demo_report.md`` when the cohort is complete; a handler listed after the evaluation.

    Args:
        evaluation: the run's ``GroundTruthEvaluation`` (its ``summary`` holds the numbers).
        cohort: what ``phantoms.make_phantom_cohort`` returned (the lesions planted in each subject).
        output_dir: the run's output folder.
        settings: the run's settings; the ones that shape the result are printed with it.
    """

    def __init__(
        self,
        evaluation: GroundTruthEvaluation,
        cohort: Sequence[Mapping[str, Any]],
        output_dir: str,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.evaluation = evaluation
        self.cohort = list(cohort)
        self.output_dir = output_dir
        self.settings = dict(settings or {})
        self.text = ""

    def attach(self, engine: Any) -> None:
        from .engines import CohortEvents

        engine.add_event_handler(CohortEvents.COHORT_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        summary = self.evaluation.summary
        if summary is None:
            raise RuntimeError("the demo report needs the evaluation's summary: list the evaluation handler first")
        scores = {row["subject"]: row for row in engine.report.subjects}
        metrics = {row["subject"]: row for row in summary["subjects"]}
        rows = [
            self._row(subject, scores[subject["subject"]], metrics[subject["subject"]])
            for subject in self.cohort
            if subject["subject"] in scores
        ]
        self.text = _render(rows, summary, self.output_dir, engine.network.encoder, self.settings)
        with atomic_path(Path(self.output_dir) / "demo_report.md") as tmp:
            tmp.write_text(self.text)
        print(self.text)

    @staticmethod
    def _row(subject: Mapping[str, Any], scores: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
        voxel_ml = float(np.prod(nib.load(subject["label"]).header.get_zooms()[:3])) / 1000
        return {
            "subject": subject["subject"],
            "lesions": len(subject["lesions"]),
            "planted_ml": metrics["lesion_voxels"] * voxel_ml,
            "flagged_ml": scores["lesion_volume_ml"],
            "score": scores["subject_score"],
            "found": bool(metrics["lesion_voxels"] and metrics["dice_at_threshold"] > 0),
            "dice": metrics["dice_at_threshold"],
        }


def _subject_auroc_meaning(value: float, rows: Sequence[Mapping[str, Any]]) -> str:
    """Subject-level AUROC in words: what a reader needs to judge it (and a warning when it is below chance)."""
    sick, healthy = sum(r["lesions"] > 0 for r in rows), sum(r["lesions"] == 0 for r in rows)
    if not np.isfinite(value):
        return "Not defined: it needs both lesion and lesion-free subjects."
    what = (
        f"The probability that a subject with planted lesions scores above a lesion-free one ({sick} against "
        f"{healthy} subjects; 1.0 = every lesion subject ranks first, 0.5 = chance"
    )
    if value < 0.5:
        return (
            what + "). Below chance: the lesion-free subjects score higher, so subject scores here do not find lesions."
        )
    return what + ")."


def _render(rows, summary, output_dir, encoder, settings) -> str:
    pooled, subject_auroc = summary["pooled"], summary["subject_auroc"]
    lines = []
    if not encoder.pretrained:
        notice = [
            f"BACKBONE: {encoder.name!r} is NOT a pretrained foundation model.",
            "These numbers are NOT CS3F/DINOv2 results; they show the pipeline works end to end.",
        ]
        if encoder.warning:
            notice.insert(0, "Pretrained DINOv2 weights were not found (offline?); fell back to 'intensity'.")
        lines += ["```", banner(notice), "```", ""]
    lines += [
        "# CS3F demo: planted lesions in a procedural phantom cohort",
        "",
        f"Backbone: `{weights_line(encoder)}`",
        "",
        "Settings: " + ", ".join(f"`{k}` {settings[k]}" for k in SHOWN_SETTINGS if k in settings) + ".",
        "",
        f"Outputs: `{output_dir}` (the evaluation's tables and figures: `metrics.md`, `<id>_eval.png`)",
        "",
        f"Pooled inside the brain masks: voxel AUROC **{pooled['auroc']:.3f}**, average precision "
        f"**{pooled['average_precision']:.3f}**, Dice at the operating threshold **{pooled['dice_at_threshold']:.3f}** "
        f"(lesions are {100 * pooled['lesion_fraction']:.2f} % of brain voxels).",
        f"Subject-level AUROC: {subject_auroc:.3f}. {_subject_auroc_meaning(subject_auroc, rows)}",
        "",
        "Planted volume: the lesions the phantom generator drew. Flagged volume: what the run flagged at its "
        "threshold (`lesion_volume_ml` in `scores.csv`). Subject score: mean of the highest 1 % of the subject's "
        "voxel scores (`subject_score`). Found: some planted lesion voxel is flagged.",
        "",
        "| subject | planted lesions | planted volume (ml) | flagged volume (ml) | subject score | found at threshold | Dice |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['subject']} | {r['lesions']} | {r['planted_ml']:.2f} | {r['flagged_ml']:.2f} | {r['score']:.4f} | "
        f"{'yes' if r['found'] else ('-' if r['lesions'] == 0 else 'no')} | {r['dice']:.3f} |"
        for r in rows
    ]
    if encoder.warning:
        lines += ["", f"> {encoder.warning}"]
    return "\n".join(lines) + "\n"
