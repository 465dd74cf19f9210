"""The CS3F run on MONAI engines: an encoding pass, the cohort's cross-subject scoring, a writing pass.

``TokenEncoder`` (the bundle's ``encoder``) is a ``SupervisedEvaluator`` over the cohort's ``dataloader``: one
subject per iteration, preprocessed and turned into tokens by the network (``inferer.encode_subject``), or taken
from the token cache. The volume is dropped as soon as it is encoded; its tokens and what the writing pass needs
(``geometry.keep_geometry``) are kept, and cached.

``CohortEvaluator`` (the bundle's ``evaluator``) runs the encoder, has the inferer score every subject against all
the others, sets the cohort's operating threshold, and then iterates over the scored subjects like any MONAI
evaluator: per subject, the ``postprocessing`` (``Invertd`` back to the input's space, masks, ``SaveImaged``) and
the ``val_handlers``. Around that it keeps the output folder's contract: checked and locked before any work, marked
``INCOMPLETE`` while written, results that are already up to date kept, ``run.json`` written last.

A subject that fails in either pass is reported and skipped; the others still get their results. Under ``torchrun``
(see ``distributed.py``) every pass is sharded by subject across the processes, and the first one writes the
cohort's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils import IgniteInfo, min_version, optional_import
from torch.utils.data import DataLoader

from .allocator import keep_freed_memory
from .bank import ReferenceBank
from .cohort_report import write_cohort_report
from .data import CohortDataset, root_cause
from .distributed import all_gather, init_process_group, rank_and_world
from .geometry import keep_geometry, writing_input
from .outputs import cohort_files, refuse_existing, subject_files, write_csv, write_json
from .postprocessing import in_memory
from .run_folder import RunFolder, check_output_dir
from .run_report import RunReport, backbone_note, previous_results, versions, weights_line, weights_record
from .scoring import robust_threshold
from .token_cache import bundle_version, file_digest, files_intact, token_fingerprint
from .values import as_bool

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
EventEnum, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum")

__all__ = ["CohortError", "CohortEvaluator", "CohortEvents", "Encoded", "MIN_SUBJECTS", "SCORE_FIELDS", "TokenEncoder"]

logger = logging.getLogger(__name__)
MIN_SUBJECTS = 3
SCORE_FIELDS = ("subject", "subject_score", "lesion_volume_ml", "image")


class CohortError(RuntimeError):
    """The cohort as a whole cannot be scored (e.g. fewer than three readable subjects)."""


class CohortEvents(EventEnum):
    """``COHORT_COMPLETED``: the run's cohort files are written (fired by the process that writes them), and
    ``engine.report`` holds every subject's result: for handlers that need the whole cohort (reports, evaluation)."""

    COHORT_COMPLETED = "cohort_completed"


@dataclass
class Encoded:
    """One subject and what the encoding pass kept of it: tokens, validity and geometry (``entry``)."""

    subject: dict[str, str]
    entry: dict[str, Any]
    digests: dict[str, str] = field(default_factory=dict)  # SHA-256 of its input files
    from_cache: bool = False


class TokenEncoder(SupervisedEvaluator):
    """The encoding pass: every subject of ``val_data_loader`` (a ``CohortDataset``, one subject per item) becomes
    an :class:`Encoded` in ``encoded``; subjects that cannot be used are described in ``problems``.

    Args:
        device: where the network runs.
        val_data_loader: the cohort's data loader (``batch_size`` ``None``: one subject at a time).
        network: the tokenizer; a pretrained backbone's weights are loaded by a handler (``weights_loader``).
        inferer: the cohort inferer, whose ``encode_subject`` turns a preprocessed volume into tokens.
        token_cache: where new entries are saved (the dataset reads them).
        val_handlers: handlers of this pass (e.g. a progress bar).
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: DataLoader,
        network: torch.nn.Module,
        inferer: Any,
        token_cache: Any = None,
        val_handlers: Sequence | None = None,
    ) -> None:
        super().__init__(
            device=torch.device(device),
            val_data_loader=val_data_loader,
            network=network,
            inferer=inferer,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.token_cache = token_cache if token_cache is not None else val_data_loader.dataset.token_cache
        self.encoded: list[Encoded] = []
        self.problems: list[str] = []
        self._announced = False
        self.add_event_handler(Events.STARTED, self._start)

    def _start(self, engine: TokenEncoder) -> None:
        encoder = self.network.encoder
        if not encoder.ready:
            raise RuntimeError(
                f"backbone {encoder.name!r}: its weights are not loaded; list the bundle's weights_loader "
                "first among the encoder's handlers"
            )
        note = backbone_note(encoder)
        if note and rank_and_world()[0] == 0 and not self._announced:
            logger.warning("\n%s", note)  # once, now that the weights (or their absence) are known
            self._announced = True
        self.encoded, self.problems = [], []

    def encode(self, subjects: Sequence[Mapping[str, Any]]) -> list[Encoded]:
        """Encode ``subjects`` instead of the data loader's cohort (a label server's request); see ``problems``."""
        dataset: CohortDataset = self.data_loader.dataset
        loader, self.data_loader = self.data_loader, DataLoader(dataset.with_data(subjects), batch_size=None)
        self.state.epoch_length = len(subjects)
        try:
            if subjects:
                self.run()
            else:
                self.encoded, self.problems = [], []
        finally:
            self.data_loader, self.state.epoch_length = loader, len(loader)
        return list(self.encoded)

    def _iteration(self, engine: TokenEncoder, item: Mapping[str, Any]) -> Encoded | None:
        subject = item["source"]
        try:
            if "error" in item:
                raise ValueError(item["error"])
            if "entry" in item:
                encoded = Encoded(subject, item["entry"], item["digests"], from_cache=True)
            else:
                with keep_freed_memory():  # the ViT's batch temporaries are reused, not faulted in again
                    entry = self.inferer.encode_subject(item["image"], item["mask"], self.network)
                entry["geometry"] = keep_geometry(item)
                self.token_cache.save(subject, entry)
                encoded = Encoded(subject, entry, item["digests"])
            if not bool(encoded.entry["valid"].any()):
                raise ValueError("the mask covers no token of the common grid (mask too small or too thin)")
        except Exception as err:
            message = (
                str(err) if "error" in item else f"{subject['subject']} ({subject.get('image', '')}): {root_cause(err)}"
            )
            self.problems.append(message)
            logger.error("skipping subject %s", message)
            engine.state.output = None
            return None
        self.encoded.append(encoded)
        engine.state.output = encoded
        return encoded


class CohortEvaluator(SupervisedEvaluator):
    """The whole run: encoding pass, cohort scoring by the inferer, writing pass (see the module doc).

    Args:
        device: where scoring and postprocessing run.
        encoder: the encoding pass (a :class:`TokenEncoder`).
        network: the tokenizer (shared with the encoder).
        inferer: the cohort inferer: ``score_entries`` scores each subject against all the others.
        output_dir, dataset_dir: where results go, and the cohort folder (an ``output_dir`` inside it is refused).
        threshold: ``{"method": "mad" | "percentile" | "absolute", "value": float}``, see ``scoring.robust_threshold``.
        postprocessing: from ``anomaly`` (token scores), ``threshold`` and the subject's geometry to the heat map and
            mask in the input's space, and the files (``SaveImaged``, ``SaveOverviewd``).
        val_handlers: per-subject (``ITERATION_COMPLETED``) and whole-cohort (``CohortEvents.COHORT_COMPLETED``)
            handlers.
        overwrite: replace results already in ``output_dir``; otherwise the run refuses to start.
        settings: the public configuration, recorded in ``run.json`` and in each subject's result key.
        overview: whether the postprocessing writes ``<id>_overview.png`` (part of a subject's files).
        distributed: join the ``torchrun`` process group and shard the work across its processes.
        reference_bank: score each subject against this bank (``bank.ReferenceBank``) instead of against the other
            subjects: one subject is enough, and the operating threshold is the bank's.
    """

    def __init__(
        self,
        device: torch.device | str,
        encoder: TokenEncoder,
        network: torch.nn.Module,
        inferer: Any,
        output_dir: str,
        dataset_dir: str,
        threshold: Mapping[str, Any],
        postprocessing: Any = None,
        val_handlers: Sequence | None = None,
        overwrite: bool = False,
        settings: Mapping[str, Any] | None = None,
        overview: bool = True,
        distributed: bool = False,
        reference_bank: ReferenceBank | None = None,
    ) -> None:
        self.cohort: list[tuple[int, Encoded]] = []  # the writing pass's data: (index in the cohort, subject)
        super().__init__(
            device=torch.device(device),
            val_data_loader=self.cohort,
            network=network,
            inferer=inferer,
            postprocessing=postprocessing,
            val_handlers=val_handlers,
            decollate=False,
            event_names=[CohortEvents],
        )
        self.encoder = encoder
        self.postprocessing = postprocessing
        self.output_dir = Path(output_dir)
        self.dataset_dir = dataset_dir
        self.threshold = dict(threshold)
        self.overwrite = as_bool(overwrite, "overwrite")
        self.settings = dict(settings or {})
        self.overview = as_bool(overview, "write_overview")
        self.distributed = as_bool(distributed, "distributed")
        self.bank = reference_bank
        self.report: RunReport | None = None
        self.scores = torch.empty(0)
        self.cohort_threshold = float("nan")
        self.heat_scale: float | None = None  # top of the overview colour scale: the cohort's highest score
        self.cache_use = {"hits": 0, "misses": 0}
        self._failures: list[str] = []
        self._written: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------------------------------------- the run
    def run(self) -> RunReport | None:  # type: ignore[override]
        """Run the cohort with ``output_dir`` held (see ``run_folder.RunFolder``); returns what happened (``None`` in
        every process but the one that writes the cohort files)."""
        created = check_output_dir(self.output_dir, self.dataset_dir)
        if self.distributed:
            init_process_group()
        rank, world = rank_and_world()
        with RunFolder(self.output_dir, created) if rank == 0 else contextlib.nullcontext() as folder:
            report = self._run(folder, rank, world)
        self.report = report if rank == 0 else None
        if self.report is not None:
            self.fire_event(CohortEvents.COHORT_COMPLETED)
        return self.report

    def _run(self, folder: RunFolder | None, rank: int, world: int) -> RunReport:
        report = RunReport(output_dir=str(self.output_dir))
        start = time.perf_counter()
        datalist = self.encoder.data_loader.dataset.data
        refuse_existing(self.output_dir, [s["subject"] for s in datalist], self.overwrite)
        usable = [s for s in datalist if "error" not in s]
        if len(usable) < self.min_subjects:  # before hours of encoding
            raise CohortError(
                f"{len(usable)} subject(s) found in {self.dataset_dir} with image_pattern "
                f"{self.settings.get('image_pattern')!r}"
                + (f" and mask_pattern {self.settings['mask_pattern']!r}" if self.settings.get("mask_pattern") else "")
                + f"; {self.needs}."
                + "".join(f" {s['error']}." for s in datalist if "error" in s)
            )
        self._check_bank(weights_known=False)

        tick = time.perf_counter()
        self.encoder.run()  # each process encodes its shard (the data loader's sampler); all then hold every token
        report.backbone = weights_line(self.network.encoder)  # the weights are loaded when the encoder starts
        self._check_bank(weights_known=True)
        shards = all_gather((self.encoder.encoded, self.encoder.problems))
        order = {s["subject"]: i for i, s in enumerate(datalist)}
        encoded = sorted((e for shard, _ in shards for e in shard), key=lambda e: order.get(e.subject["subject"], -1))
        self.cache_use = {"hits": sum(e.from_cache for e in encoded), "misses": sum(not e.from_cache for e in encoded)}
        report.problems += [p for _, problems in shards for p in problems]
        report.timings["encode_s"] = time.perf_counter() - tick
        if len(encoded) < self.min_subjects:
            raise CohortError(
                f"{len(encoded)} usable subject(s) in {self.dataset_dir}; {self.needs}."
                + "".join(f"\n  - {p}" for p in report.problems)
            )

        tick = time.perf_counter()
        if folder is not None:
            folder.mark_incomplete()  # before any process can write: the gather of the scores waits for this one
        mine = list(range(rank, len(encoded), world))
        self.scores = self._gather_scores(encoded, mine)
        if self.bank is not None:  # the reference statistics: independent of the other subjects of this run
            statistics = self.bank.statistics_for(
                self.inferer, self.network, self.threshold, self.settings.get("top_fraction", 0.01)
            )
            self.cohort_threshold, self.heat_scale = statistics["threshold"], statistics["max"]
        else:
            self.cohort_threshold = robust_threshold(self.scores, self.threshold["method"], self.threshold["value"])
            finite = self.scores[torch.isfinite(self.scores)]
            self.heat_scale = float(finite.max()) if finite.numel() else None
        report.threshold = self.cohort_threshold
        report.timings["score_s"] = time.perf_counter() - tick

        tick = time.perf_counter()
        kept = self._select_for_writing(encoded, mine)
        self._failures, self._written = [], {}
        self.state.epoch_length = len(self.cohort)
        if self.cohort:
            super().run()
        for written, kept_records, failures in all_gather((self._written, kept, self._failures)):
            report.results.update(written)
            report.results.update(kept_records)
            report.kept += list(kept_records)
            report.problems += failures
        report.subjects = [record["row"] for record in report.results.values()]
        if report.kept:
            logger.info(
                "%d subject(s) had up-to-date results in %s and were not written again",
                len(report.kept),
                self.output_dir,
            )
        report.timings["write_s"] = time.perf_counter() - tick
        report.timings["total_s"] = time.perf_counter() - start
        report.timings["processes"] = world
        if folder is not None:
            self._write_cohort_files(report)
            folder.mark_complete()
        return report

    @property
    def min_subjects(self) -> int:
        return 1 if self.bank is not None else MIN_SUBJECTS

    @property
    def needs(self) -> str:
        """What the run needs, in words, for messages."""
        if self.bank is not None:
            return "scoring against the reference bank needs at least one study"
        return f"cross-subject scoring needs at least {MIN_SUBJECTS}"

    def _check_bank(self, weights_known: bool) -> None:
        """Refuse a reference bank built with other settings: before encoding on all but the weights (not loaded
        yet), after it on everything."""
        if self.bank is not None:
            preprocessing = self.encoder.data_loader.dataset.transform
            run = token_fingerprint(self.settings, self.network, preprocessing, require_weights=weights_known)
            self.bank.check(run, ignore=() if weights_known else ("weights", "pretrained"))

    def _gather_scores(self, encoded: list[Encoded], mine: list[int]) -> torch.Tensor:
        """Token scores of every subject (each process scores its share against the whole cohort, or the bank)."""
        scores = torch.empty(0)
        if self.bank is not None:
            one = [self.bank.scores(self.inferer, self.network, encoded[i].entry) for i in mine]
            part = torch.stack(one) if one else self.inferer.score_entries([e.entry for e in encoded], self.network, [])
        else:
            part = self.inferer.score_entries([e.entry for e in encoded], self.network, mine)
        for indices, shard in all_gather((mine, part)):
            scores = shard.new_full((len(encoded), *shard.shape[1:]), torch.nan) if not scores.numel() else scores
            scores[indices] = shard
        return scores

    def _select_for_writing(self, encoded: list[Encoded], mine: list[int]) -> dict[str, dict[str, Any]]:
        """Fill the writing pass's data with this process's subjects whose results are not already up to date in
        ``output_dir``; returns the records of those that are (kept, not written again)."""
        previous = previous_results(self.output_dir)
        kept: dict[str, dict[str, Any]] = {}
        self.cohort.clear()
        for i in mine:
            record = previous.get(encoded[i].subject["subject"])
            if (
                isinstance(record, Mapping)
                and record.get("key") == self._result_key(encoded[i], self.scores[i])
                and files_intact(record.get("files", {}), self.output_dir)
            ):
                kept[encoded[i].subject["subject"]] = dict(record)
            else:
                self.cohort.append((i, encoded[i]))
        return kept

    def _result_key(self, encoded: Encoded, token_scores: torch.Tensor) -> str:
        """Identity of everything a subject's written results depend on."""
        digest = hashlib.sha256(
            json.dumps(
                {
                    "settings": self.settings,
                    "reference_bank": self.bank.identity if self.bank is not None else None,
                    "overview": self.overview,
                    "heat_scale": self.heat_scale if self.overview else None,
                    "threshold": self.cohort_threshold,
                    "inputs": encoded.digests,
                    "bundle_version": bundle_version(),
                },
                sort_keys=True,
                default=str,
            ).encode()
        )
        digest.update(token_scores.contiguous().numpy().tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------------------------------------- one subject
    def writing_data(self, encoded: Encoded, token_scores: torch.Tensor, threshold: float) -> tuple[dict, dict]:
        """The batch and output a subject's postprocessing starts from: its geometry, id, input path and the cohort's
        values (``batch``), its token scores under ``anomaly`` (``output``)."""
        batch = {
            **writing_input(encoded.entry["geometry"]),
            "subject": encoded.subject["subject"],
            "source": encoded.subject["image"],
            "threshold": threshold,
            "heat_scale": self.heat_scale,
        }
        return batch, {"anomaly": token_scores[None]}

    def heat_maps(self, encoded: Encoded, token_scores: torch.Tensor, threshold: float) -> dict[str, Any]:
        """One subject's postprocessing without the steps that write files: its heat map (``anomaly``), mask
        (``anomaly_mask``), ``subject_score`` and ``lesion_volume_ml`` in memory, on the input's grid (for a server
        that answers with them)."""
        batch, output = self.writing_data(encoded, token_scores, threshold)
        return in_memory(self.postprocessing)({**batch, **output})

    def _iteration(self, engine: CohortEvaluator, item: tuple[int, Encoded]) -> dict[str, Any] | None:
        index, encoded = item
        subject = encoded.subject
        engine.state.batch, engine.state.output = self.writing_data(encoded, self.scores[index], self.cohort_threshold)
        try:
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI runs the postprocessing here: files are written
            output = engine.state.output
            row = {
                "subject": subject["subject"],
                "subject_score": output["subject_score"],
                "lesion_volume_ml": output["lesion_volume_ml"],
                "image": subject["image"],
            }
            files = [
                path
                for name, path in subject_files(self.output_dir, subject["subject"]).items()
                if name != "overview" or self.overview
            ]
            self._written[subject["subject"]] = {
                "key": self._result_key(encoded, self.scores[index]),
                "files": {p.name: file_digest(p) for p in files},
                "row": row,
            }
        except Exception as err:  # one subject's failure must not lose the others' results
            self._failures.append(f"{subject['subject']} ({subject['image']}): writing failed: {root_cause(err)}")
            logger.error(self._failures[-1])
            engine.state.output = None
        return engine.state.output

    # ------------------------------------------------------------------------------------------------- the cohort
    def _write_cohort_files(self, report: RunReport) -> None:
        files = cohort_files(self.output_dir)
        write_csv(sorted(report.subjects, key=lambda r: r["subject"]), files["scores"], SCORE_FIELDS)
        encoder = self.network.encoder
        if self.overview:
            write_cohort_report(
                files["report"],
                report.subjects,
                report.threshold,
                self.heat_scale,
                report.backbone,
                backbone_note(encoder),
                self.settings,
                report.problems,
            )
        cache = self.encoder.token_cache
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
                "reference_bank": self.bank.record() if self.bank is not None else None,
                "subjects_written": len(report.subjects),
                "subjects_kept": len(report.kept),
                "token_cache": {"dir": str(cache.cache_dir or ""), **self.cache_use, "failure": cache.failure},
                "problems": report.problems,
                "timings_s": report.timings,
                "versions": versions(),
                "results": report.results,
            },
            files["run"],
        )
