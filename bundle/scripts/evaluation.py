"""Evaluation of a run against ground-truth masks: per-subject and pooled metrics, tables and figures.

Everything is measured inside each subject's mask, in the subject's own space (where the outputs are):
voxel AUROC and average precision (scikit-learn), the best Dice over all thresholds, the Dice at the
run's operating threshold, and, when the cohort mixes healthy and lesion subjects, the subject-level AUROC
of the subject scores.

A re-run keeps a subject's ``<id>_eval.png`` when nothing it shows changed (the subject's results, ground truth and
mask, by content; ``metrics.json`` records the key), as the run keeps its other files: drawing is most of the time
of an evaluation whose metrics are computed again.

``GroundTruthEvaluation`` is a handler of the bundle's evaluator (``configs/evaluate.json`` lists it): when the
cohort's results are written (``CohortEvents.COHORT_COMPLETED``) it reads them back and evaluates them. The
demo is the same evaluation of a phantom cohort, with a report of its own (``demo.DemoReport``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.transforms import LoadImage
from sklearn.metrics import roc_auc_score

from .cohort import match_pattern
from .metrics import subject_metrics
from .outputs import atomic_path, subject_files, write_csv, write_json
from .overview import TRUTH_COLOUR, save_overview
from .run_report import RunReport, backbone_note
from .token_cache import file_digest, files_intact
from .values import as_bool

__all__ = ["GroundTruthEvaluation", "METRIC_FIELDS"]

logger = logging.getLogger(__name__)
METRIC_FIELDS = (
    "subject",
    "lesion_voxels",
    "auroc",
    "average_precision",
    "best_dice",
    "best_dice_threshold",
    "dice_at_threshold",
    "flagged_fraction",
    "lesion_fraction",
    "subject_score",
    "seconds",
)


def _load_with_affine(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Array and RAS affine of any file (or DICOM folder) MONAI reads: labels come as NIfTI, NRRD, DICOM..."""
    img = LoadImage(image_only=True)(str(path))
    return np.asarray(img), np.asarray(img.affine, dtype=np.float64)


def _load(path: str | Path) -> np.ndarray:
    return _load_with_affine(path)[0]


def _figure_key(result: Mapping[str, Any] | None, label: Path | None, mask: Path | None) -> str | None:
    """What a subject's evaluation figure shows: its written results (the run's key and file digests, which cover the
    input image and heat map), its ground truth and mask, by content; ``None`` when the run did not record them."""
    if not isinstance(result, Mapping) or "key" not in result:
        return None
    shown = {
        "result": result["key"],
        "files": result.get("files"),
        "truth": file_digest(label) if label is not None else None,
        "mask": file_digest(mask) if mask is not None else None,
    }
    return hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()


class GroundTruthEvaluation:
    """Compares the outputs of a run with ground-truth masks found by ``label_pattern``; a handler of the bundle's
    evaluator (it evaluates when the cohort is complete, and keeps what it found in ``summary``).

    Args:
        dataset_dir: the cohort folder; label_pattern: glob with ``{id}`` for the ground truth of a subject
            (any label > 0 is a lesion). A subject without a label file counts as healthy; ``None`` declares
            the whole cohort healthy (then the flagged fraction is the false-positive rate).
        output_dir: the run's output folder; metrics and figures are written there.
        mask_pattern: masks the run used; without them the evaluated region is where the heat map is non-zero.
        figures: write ``<id>_eval.png`` per subject and ``metrics_summary.png``.
        verbose: print ``metrics.md`` when done.
    """

    def __init__(
        self,
        dataset_dir: str,
        label_pattern: str | None,
        output_dir: str,
        mask_pattern: str | None = None,
        figures: bool = True,
        verbose: bool = True,
    ) -> None:
        if label_pattern is not None and "{id}" not in label_pattern:
            raise ValueError(f"label_pattern {label_pattern!r} needs an {{id}} placeholder")
        self.dataset_dir = Path(dataset_dir)
        self.label_pattern = label_pattern
        self.output_dir = Path(output_dir)
        self.mask_pattern = mask_pattern or None
        self.figures = as_bool(figures, "eval_figures")
        self.verbose = as_bool(verbose, "verbose")
        self.summary: dict[str, Any] | None = None

    def attach(self, engine: Any) -> None:
        from .engines import CohortEvents

        engine.add_event_handler(CohortEvents.COHORT_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        self.summary = self.evaluate(engine.report, engine.network.encoder)

    def _one(self, pattern: str, subject: str) -> Path | None:
        found = match_pattern(self.dataset_dir, pattern, subject)
        if len(found) > 1:
            raise ValueError(f"{subject}: {len(found)} files match {pattern!r}: {', '.join(map(str, found))}")
        return found[0] if found else None

    def evaluate(self, report: RunReport, encoder: Any = None) -> dict[str, Any]:
        """Metrics of every written subject and pooled; writes ``metrics.csv``, ``metrics.md``, ``metrics.json``."""
        rows, pooled_scores, pooled_truth, pooled_flagged, subject_scores, healthy = [], [], [], [], [], []
        seconds = (report.timings.get("total_s", float("nan"))) / max(1, len(report.subjects))
        drawn_before, figures = self._previous_figures(), {}
        for result in report.subjects:
            sid = result["subject"]
            files = subject_files(self.output_dir, sid)
            heat, flagged = _load(files["anomaly"]).astype(np.float32), _load(files["anomaly_mask"]) > 0
            label = self._one(self.label_pattern, sid) if self.label_pattern else None
            if label is None and self.label_pattern:
                logger.warning("%s: no ground truth matches %r; counted as a healthy subject", sid, self.label_pattern)
            truth = _load(label) > 0 if label is not None else np.zeros(heat.shape, bool)
            if truth.shape != heat.shape:
                raise ValueError(f"{label}: ground truth grid {truth.shape} differs from the image grid {heat.shape}")
            mask_file = self._one(self.mask_pattern, sid) if self.mask_pattern else None
            inside = _load(mask_file) > 0 if mask_file is not None else heat != 0
            row = {
                "subject": sid,
                **subject_metrics(heat[inside], truth[inside], flagged[inside]),
                "subject_score": result["subject_score"],
                "seconds": seconds,
            }
            rows.append(row)
            pooled_scores.append(heat[inside])
            pooled_truth.append(truth[inside])
            pooled_flagged.append(flagged[inside])
            subject_scores.append(result["subject_score"])
            healthy.append(not truth.any())
            if self.figures:
                path = files["overview"].with_name(f"{sid}_eval.png")
                name = path.relative_to(self.output_dir).as_posix()
                key = _figure_key(report.results.get(sid), label, mask_file)
                figures[sid] = self._up_to_date(drawn_before.get(sid), key, name)
                if figures[sid] is None:
                    self._figure(result["image"], heat, truth, path, row)
                    figures[sid] = {"key": key, "file": name, "sha256": file_digest(path)}
        if (
            self.label_pattern
            and rows
            and all(r["lesion_voxels"] == 0 for r in rows)
            and not any(self._one(self.label_pattern, r["subject"]) for r in rows)
        ):
            raise FileNotFoundError(
                f"no ground truth file matches label_pattern {self.label_pattern!r} under {self.dataset_dir} for any subject"
            )
        pooled = subject_metrics(
            np.concatenate(pooled_scores), np.concatenate(pooled_truth), np.concatenate(pooled_flagged)
        )
        mixed = 0 < sum(healthy) < len(healthy)
        summary = {
            "output_dir": str(self.output_dir),
            "healthy_subjects": sum(healthy),
            "pooled": pooled,
            "subject_auroc": float(roc_auc_score([not h for h in healthy], subject_scores)) if mixed else float("nan"),
            "subjects": rows,
            "figures": figures,  # per subject: what its <id>_eval.png shows (a key) and the file's SHA-256
            "operating_threshold": report.threshold,
            "timings_s": report.timings,
            "backbone": {
                "name": getattr(encoder, "name", ""),
                "pretrained": getattr(encoder, "pretrained", None),
                "note": backbone_note(encoder) if encoder is not None else "",
            },
        }
        write_csv(
            [*rows, {"subject": "POOLED", **pooled, "seconds": seconds}], self.output_dir / "metrics.csv", METRIC_FIELDS
        )
        write_json(summary, self.output_dir / "metrics.json")
        text = self._markdown(summary)
        with atomic_path(self.output_dir / "metrics.md") as tmp:
            tmp.write_text(text)
        if self.figures and rows:
            self._summary_plot(rows, self.output_dir / "metrics_summary.png")
        if self.verbose:
            print(text)
        return summary

    def _previous_figures(self) -> dict[str, Any]:
        """The figures the last evaluation into ``output_dir`` drew (``metrics.json``), ``{}`` if unreadable."""
        try:
            figures = json.loads((self.output_dir / "metrics.json").read_text()).get("figures", {})
        except (OSError, ValueError, AttributeError):
            return {}
        return figures if isinstance(figures, dict) else {}

    def _up_to_date(self, before: Any, key: str | None, name: str) -> dict[str, Any] | None:
        """The previous record of figure ``name`` (relative to ``output_dir``) when it shows the same (``key``) and the
        file is intact, else ``None``."""
        if key is None or not isinstance(before, Mapping) or before.get("key") != key:
            return None
        if before.get("file") != name or not files_intact({name: str(before.get("sha256"))}, self.output_dir):
            return None
        return dict(before)

    @staticmethod
    def _figure(image_path: str, heat: np.ndarray, truth: np.ndarray, path: Path, row: Mapping[str, Any]) -> None:
        image, affine = _load_with_affine(image_path)
        ornt = nib.orientations.io_orientation(affine)
        to_ras = lambda a: nib.orientations.apply_orientation(a, ornt)  # noqa: E731
        spacing = np.zeros(3)
        spacing[ornt[:, 0].astype(int)] = nib.affines.voxel_sizes(affine)  # input axis i becomes RAS axis ornt[i, 0]
        save_overview(
            to_ras(image.astype(np.float32)),
            to_ras(heat),
            path,
            spacing=spacing,
            truth=to_ras(truth),
            title=f"{row['subject']}: ground truth outlined, AUROC {row['auroc']:.3f}, "
            f"best Dice {row['best_dice']:.3f}",
        )

    @staticmethod
    def _summary_plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(max(6, 0.6 * len(rows) + 2), 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        x = np.arange(len(rows))
        for k, (key, label) in enumerate(
            (("auroc", "voxel AUROC"), ("average_precision", "AP"), ("best_dice", "best Dice"))
        ):
            ax.bar(x + (k - 1) * 0.27, [r[key] for r in rows], width=0.27, label=label)
        ax.set_xticks(x, [r["subject"] for r in rows], rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
        ax.set_title("per-subject accuracy inside the mask")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)

    @staticmethod
    def _markdown(summary: Mapping[str, Any]) -> str:
        p = summary["pooled"]
        note = summary["backbone"]["note"]
        lines = (["```", note, "```", ""] if note else []) + [
            "# Evaluation",
            "",
            f"Backbone `{summary['backbone']['name']}` (pretrained: {summary['backbone']['pretrained']}); operating "
            f"threshold {summary['operating_threshold']:.4g}.",
            "",
            f"**Pooled** inside the masks: voxel AUROC {p['auroc']:.3f}, AP {p['average_precision']:.3f}, best Dice "
            f"{p['best_dice']:.3f}, Dice at the operating threshold {p['dice_at_threshold']:.3f}, flagged fraction "
            f"{p['flagged_fraction']:.4f}. {_subject_auroc_line(summary)}",
            "",
            f"Files: `metrics.md`, `metrics.csv`, `metrics.json`, `metrics_summary.png` and `<id>_eval.png` (ground truth "
            f"outlined in {TRUTH_COLOUR}) in `{summary['output_dir']}`.",
            "",
            "| subject | lesion voxels | AUROC | AP | best Dice | Dice @ threshold | flagged fraction | subject score "
            "| s/subject |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['subject']} | {r['lesion_voxels']} | {r['auroc']:.3f} | {r['average_precision']:.3f} | "
            f"{r['best_dice']:.3f} | {r['dice_at_threshold']:.3f} | {r['flagged_fraction']:.4f} | {r['subject_score']:.4g} | "
            f"{r['seconds']:.1f} |"
            for r in summary["subjects"]
        ]
        return "\n".join(lines) + "\n"


def _subject_auroc_line(summary: Mapping[str, Any]) -> str:
    """The subject-level AUROC, or why there is none (it needs subjects with and without ground-truth findings)."""
    value, healthy, total = summary["subject_auroc"], summary["healthy_subjects"], len(summary["subjects"])
    if np.isfinite(value):
        return f"Subject-level AUROC (subjects with findings against {healthy} without, by subject score): {value:.3f}."
    return (
        f"Subject-level AUROC: not defined here, {healthy} of {total} subjects have no ground-truth finding "
        "(it needs subjects both with and without)."
    )
