"""The cohort run: find subjects, encode each, score all against each other, write results per subject.

Under ``torchrun`` (see ``distributed.py``) every pass is sharded by subject across the processes.

Three passes keep memory bounded by one preprocessed volume plus the (small) tokens of the cohort:
encoding (preprocess, tokenize, drop the volume), scoring (tokens only), writing (preprocess again,
invert to the original space, write). A subject that fails in any pass is reported and skipped; the
others still get their results.

Re-runs do only what changed: tokens come from the token cache, and a subject whose results in
``output_dir`` were written from the same inputs, settings, token scores and threshold (recorded in
``run.json`` with the digests of its files, which are checked) keeps them instead of being written again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, InvertibleTransform, Orientation
from tqdm.auto import tqdm

from .cohort import find_subjects
from .cohort_report import write_cohort_report
from .distributed import all_gather, init_process_group, rank_and_world
from .inferer import CohortInferer
from .outputs import (
    cohort_files,
    readable,
    refuse_existing,
    subject_files,
    top_fraction_mean,
    volume_ml,
    write_csv,
    write_json,
    write_nifti,
)
from .overview import save_overview
from .reporting import banner
from .run_folder import RunFolder, check_output_dir
from .scoring import robust_threshold
from .token_cache import TokenCache, bundle_version, file_digest, files_intact
from .tokenizer import MultiAxisTokenizer
from .values import as_bool

__all__ = ["CohortError", "CohortRunner", "Encoded", "RunReport", "SCORE_FIELDS", "EXIT_SKIPPED", "exit_with_status"]

logger = logging.getLogger(__name__)
SCORE_FIELDS = ("subject", "subject_score", "lesion_volume_ml", "image")
MIN_SUBJECTS = 3
EXIT_SKIPPED = 3  # exit status of a run that finished but skipped some subjects (0: every subject has results)


class CohortError(RuntimeError):
    """The cohort as a whole cannot be scored (e.g. fewer than three readable subjects)."""


@dataclass
class Encoded:
    """One subject and what the inferer made of it (``CohortInferer.encode_subject``)."""

    subject: dict[str, str]
    entry: dict[str, Any]


@dataclass
class RunReport:
    """What happened, for ``run.json`` and the caller."""

    subjects: list[dict[str, Any]] = field(default_factory=list)
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
        ranked = sorted(self.subjects, key=lambda r: -r["subject_score"] if math.isfinite(r["subject_score"]) else math.inf)
        lines = [
            f"CS3F: {len(self.subjects)} subject(s) scored, {len(self.problems)} skipped, in {self.timings.get('total_s', 0):.0f} s; "
            f"results in {self.output_dir}",
            f"  backbone: {self.backbone}",
            f"  threshold (heat at or above it is flagged): {self.threshold:.4g}",
            f"  most anomalous (subject score, flagged volume):",
            *(f"    {readable(r['subject'])}: {r['subject_score']:.4g}, {r['lesion_volume_ml']:.2f} ml" for r in ranked[:top]),
            *(["  skipped:"] + [f"    {readable(p)}" for p in self.problems] if self.problems else []),
        ]
        return "\n".join(lines)


def exit_with_status(report: RunReport) -> RunReport:
    """Print the closing summary; end the process with ``EXIT_SKIPPED`` when some subjects got no results, so
    scripts and schedulers see it."""
    print(report.summary(), flush=True)
    if report.exit_status:
        logger.error("%d subject(s) skipped, see 'problems' in run.json; exit status %d", len(report.problems), report.exit_status)
        raise SystemExit(report.exit_status)
    return report


class CohortRunner:
    """Runs CS3F over the cohort in ``dataset_dir`` and writes the results to ``output_dir``.

    Args:
        dataset_dir, image_pattern, mask_pattern: where the subjects are, see ``cohort.find_subjects``.
        output_dir: where results go (created if needed).
        preprocessing: dictionary transform giving ``image`` and ``mask`` on the common grid, plus the
            original-space copies ``original`` and ``foreground``.
        postprocessing: dictionary transform from token scores under ``anomaly`` (and the cohort
            ``threshold``) to ``anomaly`` / ``anomaly_mask`` in the original space.
        network: the tokenizer; inferer: the cohort inferer.
        threshold: ``{"method": "mad" | "percentile" | "absolute", "value": float}``, see
            ``scoring.robust_threshold``.
        top_fraction: subject score = mean of this top fraction of voxel scores inside the mask.
        overwrite: replace existing results in ``output_dir``; otherwise the run refuses to start.
        settings: the public configuration, recorded in ``run.json``.
        overview: write the ``<id>_overview.png`` figures.
        progress: show progress bars (rank 0 only in multi-process runs).
        cache: token cache; subjects found there are not preprocessed or encoded again.
        distributed: join the ``torchrun`` process group and shard the work across its processes.
        require_mask: with a ``mask_pattern``, skip subjects that have no mask (default) or compute theirs.
    """

    def __init__(
        self,
        dataset_dir: str,
        output_dir: str,
        preprocessing: Callable,
        postprocessing: Callable,
        network: MultiAxisTokenizer,
        inferer: CohortInferer,
        threshold: Mapping[str, Any],
        image_pattern: str = "{id}.nii.gz",
        mask_pattern: str | None = None,
        top_fraction: float = 0.01,
        overwrite: bool = False,
        settings: Mapping[str, Any] | None = None,
        overview: bool = True,
        progress: bool = True,
        cache: TokenCache | None = None,
        distributed: bool = False,
        require_mask: bool = True,
    ) -> None:
        self.dataset_dir = dataset_dir
        self.output_dir = Path(output_dir)
        self.image_pattern = image_pattern
        self.mask_pattern = mask_pattern or None
        self.preprocessing = preprocessing
        self.postprocessing = postprocessing
        self.network = network
        self.inferer = inferer
        self.threshold = dict(threshold)
        self.top_fraction = top_fraction
        self.overwrite = as_bool(overwrite, "overwrite")
        self.settings = dict(settings or {})
        self.overview = as_bool(overview, "write_overview")
        self.distributed = as_bool(distributed, "distributed")
        self.require_mask = as_bool(require_mask, "require_mask")
        self.progress = as_bool(progress, "progress") and int(os.environ.get("RANK", "0")) == 0
        self.cache = cache or TokenCache(None, {})
        self.heat_scale: float | None = None  # top of the overview colour scale: the cohort's highest score

    def run(self) -> RunReport:
        """Run the cohort with ``output_dir`` held (see ``run_folder.RunFolder``) and return what happened."""
        created = check_output_dir(self.output_dir, self.dataset_dir)
        if self.distributed:
            init_process_group()
        rank, world = rank_and_world()
        with RunFolder(self.output_dir, created) if rank == 0 else contextlib.nullcontext() as folder:
            return self._run(folder, rank, world)

    def _run(self, folder: RunFolder | None, rank: int, world: int) -> RunReport:
        report = RunReport(output_dir=str(self.output_dir), backbone=weights_line(self.network.encoder))
        start = time.perf_counter()
        note = backbone_note(self.network.encoder)
        if note:
            logger.warning("\n%s", note)
        subjects, report.problems = find_subjects(self.dataset_dir, self.image_pattern, self.mask_pattern, self.require_mask)
        refuse_existing(self.output_dir, [s["subject"] for s in subjects], self.overwrite)
        self._log_problems(report.problems)
        if len(subjects) < MIN_SUBJECTS:  # before hours of encoding
            raise CohortError(
                f"{len(subjects)} subject(s) found in {self.dataset_dir} with image_pattern {self.image_pattern!r}"
                + (f" and mask_pattern {self.mask_pattern!r}" if self.mask_pattern else "")
                + f"; cross-subject scoring needs at least {MIN_SUBJECTS}." + "".join(f" {p}." for p in report.problems)
            )

        tick = time.perf_counter()
        # each rank encodes its shard; all ranks then hold the tokens of the whole cohort, in subject order
        problems: list[str] = []
        shards = all_gather((self.encode(subjects[rank::world], problems), problems))
        encoded = sorted((e for shard, _ in shards for e in shard), key=lambda e: subjects.index(e.subject))
        report.problems += [p for _, shard_problems in shards for p in shard_problems]
        report.timings["encode_s"] = time.perf_counter() - tick
        if len(encoded) < MIN_SUBJECTS:
            raise CohortError(
                f"{len(encoded)} usable subject(s) in {self.dataset_dir} (pattern {self.image_pattern!r}); cross-subject "
                f"scoring needs at least {MIN_SUBJECTS}." + "".join(f"\n  - {p}" for p in report.problems)
            )

        tick = time.perf_counter()
        if folder is not None:
            folder.mark_incomplete()  # before any rank can write: the gather of the scores waits for rank 0
        mine = list(range(rank, len(encoded), world))
        scores = torch.empty(0)
        for indices, part in all_gather((mine, self.inferer.score_entries([e.entry for e in encoded], self.network, mine))):
            scores = part.new_full((len(encoded), *part.shape[1:]), torch.nan) if not scores.numel() else scores
            scores[indices] = part
        report.threshold = robust_threshold(scores, self.threshold["method"], self.threshold["value"])
        finite = scores[torch.isfinite(scores)]
        self.heat_scale = float(finite.max()) if finite.numel() else None
        report.timings["score_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        previous = previous_results(self.output_dir)
        records, kept, failures = {}, [], []
        for i in tqdm(mine, desc="writing", disable=not self.progress, leave=False):
            subject = encoded[i].subject
            try:
                records[subject["subject"]], was_kept = self._write_or_keep(subject, scores[i], report.threshold, previous)
                kept += [subject["subject"]] if was_kept else []
            except Exception as err:  # one subject's failure must not lose the others' results
                failures.append(f"{subject['subject']} ({subject['image']}): writing failed: {root_cause(err)}")
                logger.error(failures[-1])
        for shard_records, shard_kept, shard_failures in all_gather((records, kept, failures)):
            report.results.update(shard_records)
            report.kept += shard_kept
            report.problems += shard_failures
        report.subjects = [record["row"] for record in report.results.values()]
        if report.kept:
            logger.info("%d subject(s) had up-to-date results in %s and were not written again", len(report.kept), self.output_dir)
        report.timings["write_s"] = time.perf_counter() - tick
        report.timings["total_s"] = time.perf_counter() - start
        report.timings["processes"] = world
        if folder is not None:
            self._write_cohort_files(report)
            folder.mark_complete()
        return report

    def encode(self, subjects: list[dict[str, str]], problems: list[str]) -> list[Encoded]:
        """Tokens of each subject, from the cache or freshly encoded; failures go to ``problems`` and are skipped."""
        encoded = []
        for subject in tqdm(subjects, desc="encoding", disable=not self.progress):
            try:
                entry = self.cache.load(subject, check=self._entry_problem) or self._encode_subject(subject)
                if not bool(entry["valid"].any()):
                    raise ValueError("the mask covers no token of the common grid (mask too small or too thin)")
            except Exception as err:
                problems.append(f"{subject['subject']} ({subject['image']}): {root_cause(err)}")
                logger.error("skipping subject %s", problems[-1])
                continue
            encoded.append(Encoded(subject, entry))
        return encoded

    def _entry_problem(self, entry: Mapping[str, Any]) -> str | None:
        """What makes a (cached) entry unusable for this run, or ``None``: wrong shape, NaN or infinite tokens."""
        tokens, valid = entry.get("tokens"), entry.get("valid")
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 4 or tokens.shape[0] != self.network.out_channels:
            return f"tokens of shape {tuple(getattr(tokens, 'shape', ()))}, expected ({self.network.out_channels}, d, h, w)"
        grid = self.settings.get("grid_size")
        expected = self.network.token_grid([int(grid)] * 3) if isinstance(grid, int) else tuple(tokens.shape[1:])
        if tuple(tokens.shape[1:]) != expected:
            return f"a token grid of {tuple(tokens.shape[1:])}, expected {expected}"
        if not isinstance(valid, torch.Tensor) or tuple(valid.shape) != expected:
            return f"a validity grid of {tuple(getattr(valid, 'shape', ()))}, expected {expected}"
        if not bool(torch.isfinite(tokens).all()) or not all(bool(torch.isfinite(f).all()) for f in entry.get("fine", [])):
            return "NaN or infinite tokens"
        return None

    def _encode_subject(self, subject: dict[str, str]) -> dict[str, torch.Tensor]:
        data = self.preprocessing(dict(subject))
        entry = self.inferer.encode_subject(data["image"], data["mask"], self.network)
        self.cache.save(subject, entry)
        return entry

    def _write_or_keep(
        self, subject: dict[str, str], token_scores: torch.Tensor, threshold: float, previous: Mapping[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """Write one subject's results unless ``output_dir`` already holds them intact; return its record and
        whether the existing results were kept."""
        key = self._result_key(subject, token_scores, threshold)
        record = previous.get(subject["subject"])
        if isinstance(record, Mapping) and record.get("key") == key and files_intact(record.get("files", {}), self.output_dir):
            return dict(record), True
        row = self.write_subject(subject, token_scores, threshold)
        written = [path for name, path in subject_files(self.output_dir, subject["subject"]).items()
                   if name != "overview" or self.overview]
        return {"key": key, "files": {p.name: file_digest(p) for p in written}, "row": row}, False

    def _result_key(self, subject: Mapping[str, str], token_scores: torch.Tensor, threshold: float) -> str:
        """Identity of everything a subject's written results depend on."""
        digest = hashlib.sha256(json.dumps(
            {"settings": self.settings, "top_fraction": self.top_fraction, "overview": self.overview,
             "heat_scale": self.heat_scale if self.overview else None,
             "threshold": threshold, "inputs": self.cache.input_digests(subject), "bundle_version": bundle_version()},
            sort_keys=True, default=str).encode())
        digest.update(token_scores.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def write_subject(
        self, subject: dict[str, str], token_scores: torch.Tensor, threshold: float, output_dir: str | Path | None = None
    ) -> dict[str, Any]:
        """Map one subject's token scores to its original space, write its files, return its ``scores.csv`` row."""
        data = self._preprocess_geometry(subject)
        data["anomaly"] = token_scores[None]
        data["threshold"] = threshold
        data = self.postprocessing(data)
        files = subject_files(output_dir or self.output_dir, subject["subject"])
        heat, binary = data["anomaly"], data["anomaly_mask"]
        write_nifti(heat, files["anomaly"], np.float32)
        write_nifti(binary, files["anomaly_mask"], np.uint8)
        inside = data["foreground"].as_tensor()[0].numpy() > 0.5
        heat_np = heat.as_tensor()[0].numpy()
        row = {
            "subject": subject["subject"],
            "subject_score": top_fraction_mean(heat_np[inside], self.top_fraction),
            "lesion_volume_ml": volume_ml(binary.as_tensor()[0].numpy(), heat.affine.numpy()),
            "image": subject["image"],
        }
        if self.overview:
            self._save_overview(data, files["overview"], row, threshold)
        return row

    def _preprocess_geometry(self, subject: Mapping[str, str]) -> dict[str, Any]:
        """The preprocessing up to its last invertible (spatial) step: all that mapping scores back needs.

        Intensity steps after it (normalisation) change no geometry, so the writing pass skips them, using
        ``Compose``'s own ``end`` (as MONAI's ``CacheDataset`` does to stop before random transforms).
        """
        steps = getattr(self.preprocessing, "transforms", None)
        if isinstance(self.preprocessing, Compose) and steps:
            last = max((i for i, t in enumerate(steps) if isinstance(t, InvertibleTransform)), default=len(steps) - 1)
            return self.preprocessing(dict(subject), end=last + 1)
        return self.preprocessing(dict(subject))

    def _save_overview(self, data: Mapping[str, Any], path: Path, row: Mapping[str, Any], threshold: float) -> None:
        to_ras = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
        image, heat, mask = (to_ras(data[k]) for k in ("original", "anomaly", "anomaly_mask"))
        save_overview(
            image.as_tensor()[0].numpy(), heat.as_tensor()[0].numpy(), path,
            spacing=[float(s) for s in image.pixdim[:3]], flagged=mask.as_tensor()[0].numpy() > 0,
            scale=self.heat_scale, threshold=threshold,
            title=f"{readable(row['subject'])}: score {row['subject_score']:.4g}, flagged {row['lesion_volume_ml']:.2f} ml",
        )

    def _write_cohort_files(self, report: RunReport) -> None:
        files = cohort_files(self.output_dir)
        write_csv(sorted(report.subjects, key=lambda r: r["subject"]), files["scores"], SCORE_FIELDS)
        encoder = self.network.encoder
        if self.overview:
            write_cohort_report(files["report"], report.subjects, report.threshold, self.heat_scale, report.backbone,
                                backbone_note(encoder), self.settings, report.problems)
        write_json(
            {
                "settings": self.settings,
                "backbone": {
                    "requested": self.settings.get("backbone", encoder.name),
                    "used": encoder.name,
                    "pretrained": encoder.pretrained,
                    "weights": weights_record(encoder),
                    "warning": encoder.warning,
                    "note": backbone_note(encoder),
                },
                "threshold": {**self.threshold, "score": report.threshold},
                "subjects_written": len(report.subjects),
                "subjects_kept": len(report.kept),
                "token_cache": {"dir": str(self.cache.cache_dir or ""), "hits": self.cache.hits, "misses": self.cache.misses,
                                "failure": self.cache.failure},
                "problems": report.problems,
                "timings_s": report.timings,
                "versions": versions(),
                "results": report.results,
            },
            files["run"],
        )

    @staticmethod
    def _log_problems(problems: list[str]) -> None:
        for p in problems:
            logger.error("skipping subject %s", p)


def previous_results(output_dir: Path) -> dict[str, Any]:
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


def backbone_note(encoder: Any) -> str:
    """A loud notice whenever the backbone is not a pretrained foundation model (empty when it is)."""
    if encoder.pretrained:
        return ""
    weights = getattr(encoder, "weights", None)
    if weights is not None:
        return banner([
            f"BACKBONE {encoder.name!r}: its weights are NOT a recorded pretrained checkpoint.",
            f"{weights.path} (sha256 {weights.sha256[:16]}...) fits the network, but could be anything of that shape.",
            f"Results are not {encoder.name} results unless you know where that file came from.",
        ])
    what = {
        "intensity": "the raw-intensity baseline (no learned features)",
        "random": "a RANDOMLY INITIALISED ViT, for testing the mechanics only; it scores real lesions below normal tissue",
    }.get(encoder.name, "not pretrained")
    # the fallback's reason (what was looked for, how to provide the weights) is said here, once per run
    reason = textwrap.wrap(encoder.warning, 110) if encoder.warning else ["Results are not CS3F/DINOv2 results."]
    return banner([f"BACKBONE {encoder.name!r} is NOT a pretrained network: {what}.", *reason])


def root_cause(err: BaseException) -> str:
    """The innermost error of a chain: MONAI wraps transform errors in "applying transform ..." messages."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}" if not isinstance(err, (ValueError, OSError)) else str(err)


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
