"""What a run records and says: ``RunReport``, the closing summary and exit status, and which weights were used.

The notices here are what a person must not miss: a backbone that is not a pretrained network, or weights that are
not a recorded checkpoint, is announced in a banner in the log, in ``report.html``, in the demo and evaluation
reports and in the label server's answers.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .outputs import cohort_files, readable
from .token_cache import bundle_version

__all__ = [
    "EXIT_SKIPPED",
    "RunReport",
    "backbone_note",
    "banner",
    "exit_with_status",
    "previous_results",
    "versions",
    "weights_line",
    "weights_record",
]

logger = logging.getLogger(__name__)
EXIT_SKIPPED = 3  # exit status of a run that finished but skipped some subjects (0: every subject has results)


@dataclass
class RunReport:
    """What happened, for ``run.json``, the reports and the caller."""

    subjects: list[dict[str, Any]] = field(default_factory=list)  # scores.csv rows
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # per subject: key, file digests, row
    kept: list[str] = field(default_factory=list)  # subjects whose results were up to date, not written again
    problems: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    threshold: float = float("nan")
    output_dir: str = ""
    backbone: str = ""  # network and weights, one line

    @property
    def exit_status(self) -> int:
        return EXIT_SKIPPED if self.problems else 0

    def summary(self, top: int = 5) -> str:
        """The closing summary of a run, for the person who started it."""
        ranked = sorted(
            self.subjects, key=lambda r: -r["subject_score"] if math.isfinite(r["subject_score"]) else math.inf
        )
        lines = [
            f"CS3F: {len(self.subjects)} subject(s) scored, {len(self.problems)} skipped, in "
            f"{self.timings.get('total_s', 0):.0f} s; results in {self.output_dir}",
            f"  backbone: {self.backbone}",
            f"  threshold (heat at or above it is flagged): {self.threshold:.4g}",
            "  most anomalous (subject score, flagged volume):",
            *(
                f"    {readable(r['subject'])}: {r['subject_score']:.4g}, {r['lesion_volume_ml']:.2f} ml"
                for r in ranked[:top]
            ),
            *(["  skipped:"] + [f"    {readable(p)}" for p in self.problems] if self.problems else []),
        ]
        return "\n".join(lines)


def exit_with_status(report: RunReport | None) -> RunReport | None:
    """Print the closing summary; end the process with ``EXIT_SKIPPED`` when some subjects got no results, so
    scripts and schedulers see it. (Only the process that wrote the results has a report.)"""
    if report is None:
        return None
    print(report.summary(), flush=True)
    if report.exit_status:
        logger.error(
            "%d subject(s) skipped, see 'problems' in run.json; exit status %d",
            len(report.problems),
            report.exit_status,
        )
        raise SystemExit(report.exit_status)
    return report


def previous_results(output_dir: str | Path) -> dict[str, Any]:
    """The per-subject result records of the run that last wrote ``output_dir`` (empty if none or unreadable)."""
    try:
        results = json.loads(cohort_files(output_dir)["run"].read_text()).get("results", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return results if isinstance(results, dict) else {}


def weights_record(encoder: Any) -> dict[str, Any] | None:
    """What ``run.json``, server answers and benchmark rows keep of the weights (``None`` when there are none)."""
    weights = getattr(encoder, "weights", None)
    return weights.record() if weights is not None else None


def weights_line(encoder: Any) -> str:
    """Which network and weights produced a result, in one line for logs and reports."""
    weights = getattr(encoder, "weights", None)
    if weights is None:
        return f"{encoder.name} (no pretrained weights)"
    return f"{encoder.name}, weights {weights.describe()}"


def banner(lines: Sequence[str], char: str = "!") -> str:
    """A block nobody scrolls past: used for backbone warnings in runs, the demo and the accuracy checks."""
    width = max(len(line) for line in lines) + 4
    rule = char * width
    return "\n".join([rule, *(f"{char} {line.ljust(width - 4)} {char}" for line in lines), rule])


def backbone_note(encoder: Any) -> str:
    """A loud notice whenever the backbone is not a pretrained foundation model (empty when it is)."""
    if encoder.pretrained:
        return ""
    weights = getattr(encoder, "weights", None)
    if weights is not None:
        return banner(
            [
                f"BACKBONE {encoder.name!r}: its weights are NOT a recorded pretrained checkpoint.",
                f"{weights.path} (sha256 {weights.sha256[:16]}...) fits the network, but could be anything of that shape.",
                f"Results are not {encoder.name} results unless you know where that file came from.",
            ]
        )
    what = {
        "intensity": "the raw-intensity baseline (no learned features)",
        "random": "a RANDOMLY INITIALISED ViT, for testing the mechanics only; it scores real lesions below normal tissue",
    }.get(encoder.name, "not pretrained")
    # the fallback's reason (what was looked for, how to provide the weights) is said here, once per run
    reason = textwrap.wrap(encoder.warning, 110) if encoder.warning else ["Results are not CS3F/DINOv2 results."]
    return banner([f"BACKBONE {encoder.name!r} is NOT a pretrained network: {what}.", *reason])


def versions() -> dict[str, str]:
    """Versions of what produced a result, for run records and benchmark tables."""
    import monai
    import timm

    return {
        "bundle": bundle_version(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda or "none",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
