"""CS3F for MONAI Label: the cohort glue around the bundle's own pipeline.

The ``anomaly`` task (``lib/infers/anomaly.py``) is a MONAI Label ``BasicInferTask``: pre-transforms, inferer,
post-transforms and MONAI Label's writer, all of them the bundle's own components (``lib/bundle_config.py``). What a
cohort method adds to a per-image task lives here:

* the reference studies of a request, chosen by what they are (``lib/references.py``: the same modality and series
  description by default), with a minimum count;
* their reference bank (the bundle's ``scripts.bank.ReferenceBank``): a study is scored against the tokens of its
  references, and the operating threshold is theirs, so its result does not depend on the request order; banks
  are kept in memory and on disk by the identity of their members, and every study's tokens are in the bundle's
  token cache (``<studies>/.cs3f_cache``), so only new or changed studies are ever encoded;
* the identity of a request's answer, known before anything is encoded, for stored answers
  (``lib/stored_answers.py``);
* the ranking of studies by anomaly, for the "most anomalous first" strategy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from typing import Any

from lib.bundle_config import BundleConfig, parse_value
from lib.references import ReferenceChooser
from lib.request import DEFAULT_MIN_REFERENCE, CS3FError, Request, finite_or_none, min_reference, safe_name
from lib.stored_answers import StoredAnswers

logger = logging.getLogger(__name__)

# Classes of the label map (0 is background). Level 1 is exactly the bundle's anomaly mask.
LABELS = {"anomaly": 1, "strong_anomaly": 2}
BANKS_IN_MEMORY = 4


class Engine:
    """The bundle's components, built from its config, and the cohort glue of a request (see the module doc).

    Args:
        app_dir, studies, conf, local_datastore: as for ``lib.bundle_config.BundleConfig``.
        kinds: function from a datastore and its image ids to each study's kind (``lib/references.py``).
    """

    def __init__(
        self, app_dir: str, studies: str, conf: dict[str, str], local_datastore: bool = True, kinds: Any = None
    ) -> None:
        self.config = BundleConfig(app_dir, studies, conf, local_datastore)
        self.scripts = self.config.scripts
        self.cache_dir = self.config.cache_dir
        self.min_reference = min_reference(conf.get("min_reference", DEFAULT_MIN_REFERENCE))
        self.strong_factor = float(parse_value(conf.get("strong_factor", 2.0)))
        if not math.isfinite(self.strong_factor) or self.strong_factor < 1:
            raise ValueError(f"--conf strong_factor must be a finite number >= 1, got {conf.get('strong_factor')!r}")
        self.chooser = ReferenceChooser(
            str(conf.get("reference", "auto") or "auto"), kinds, float(parse_value(conf.get("refresh_s", 60)))
        )
        self.answers = StoredAnswers(self.cache_dir / "results" if self.cache_dir else None)
        self._evaluator = None
        self.lock = threading.RLock()  # one request at a time: the encoder engine and the banks are shared
        self._banks: OrderedDict[str, Any] = OrderedDict()

    def describe(self) -> str:
        return f"{self.config.describe()}; reference studies {self.chooser.default!r} (at least {self.min_reference})"

    # ------------------------------------------------------------------ the bundle's evaluator
    @property
    def evaluator(self):
        """The bundle's ``CohortEvaluator`` with its backbone's weights loaded, built at the first request."""
        with self.lock:
            if self._evaluator is None:
                try:
                    evaluator = self.config.parser.get_parsed_content("evaluator")
                    self.config.parser.get_parsed_content("weights_loader")(evaluator)
                except Exception as err:
                    cause = self.scripts.data.root_cause(err)
                    hint = (
                        "\nWith the MONAI Label app, pass these as --conf options (e.g. --conf weights_path /path/to/file.pth), "
                        "or restart with --conf backbone intensity to run without weights."
                    )
                    raise CS3FError(500, f"CS3F cannot build the bundle's network: {cause}{hint}") from err
                note = self.scripts.run_report.backbone_note(evaluator.network.encoder)
                if note:
                    logger.warning("\n%s", note)
                self._evaluator = evaluator
            return self._evaluator

    # ------------------------------------------------------------------ one request
    def request(self, datastore: Any, image_id: str, image_path: str, params: dict[str, Any]) -> Request:
        """Resolve a request without encoding anything: its options (400), its references (409) and the identity of
        its answer (``key``: the study's and the references' input files, the settings, the options)."""
        if not image_path or not os.path.exists(image_path):
            raise CS3FError(404, f"study {image_id!r} has no image on the server ({image_path or 'no path'})")
        request = Request.from_params(image_id, image_path, params, self.min_reference)
        ids = [i for i in datastore.list_images() if i != image_id]
        chosen, request.rule = self.chooser.choose(datastore, image_id, [image_id, *ids], params.get("reference"))
        if len(chosen) < request.min_reference:
            raise CS3FError(
                409,
                f"too few reference studies for {image_id!r}: {len(chosen)} chosen by {request.rule} "
                f"(ids: {', '.join(chosen) or 'none'}), at least {request.min_reference} are needed. Add studies "
                "of the same kind to the datastore, or choose them with the 'reference' parameter (or --conf reference).",
            )
        request.members = {safe_name(image_id): image_id}
        request.cohort = [{"subject": safe_name(image_id), "image": image_path}]
        for ref_id in chosen:
            try:
                uri = datastore.get_image_uri(ref_id) or ""
            except Exception as err:  # e.g. a DICOMweb series that cannot be fetched
                request.skipped.append(f"{ref_id}: {err}")
                continue
            if uri and os.path.realpath(uri) != os.path.realpath(image_path):
                request.members[safe_name(ref_id)] = ref_id
                request.cohort.append({"subject": safe_name(ref_id), "image": uri})
        request.key = self._answer_key(request)
        return request

    def prepare(self, request: Request) -> Request:
        """Encode the study and its references (only what the token cache lacks; 422 when the study cannot be used)
        and get their bank."""
        evaluator = self.evaluator
        tick = time.perf_counter()
        encoded = evaluator.encoder.encode(request.cohort)
        request.timings["encode"] = time.perf_counter() - tick
        problems, members, query = list(evaluator.encoder.problems), request.members, request.cohort[0]
        request.from_cache = sorted(members[e.subject["subject"]] for e in encoded if e.from_cache)
        request.encoded = sorted(members[e.subject["subject"]] for e in encoded if not e.from_cache)
        by_name = {e.subject["subject"]: e for e in encoded}
        if query["subject"] not in by_name:
            why = next((p for p in problems if p.startswith(f"{query['subject']} (")), "unreadable")
            why = why.replace(f"{query['subject']} ({request.image_path}): ", "")
            raise CS3FError(
                422,
                f"study {request.image_id!r} cannot be read or used ({os.path.basename(request.image_path)}): {why}",
            )
        request.skipped += [p for p in problems if not p.startswith(f"{query['subject']} (")]
        request.query = by_name[query["subject"]]
        references = [e for e in encoded if e.subject["subject"] != query["subject"]]
        request.references = [members[e.subject["subject"]] for e in references]
        if len(references) < request.min_reference:
            raise CS3FError(
                409,
                f"too few usable reference studies for {request.image_id!r}: {len(references)} could be used, at "
                f"least {request.min_reference} are needed. Skipped: " + "; ".join(request.skipped),
            )
        tick = time.perf_counter()
        request.bank, request.bank_source = self._bank(references)
        request.timings["bank"] = time.perf_counter() - tick
        return request

    def _bank(self, references: list[Any]) -> tuple[Any, str]:
        """The bank of these encoded references: from memory, from the cache folder, or built from their tokens."""
        bank_module = self.scripts.bank
        evaluator = self.evaluator
        description = self.scripts.token_cache.token_fingerprint(
            evaluator.settings, evaluator.network, evaluator.encoder.data_loader.dataset.transform
        )
        bank = bank_module.ReferenceBank([], [], [], description)
        bank.add(references)
        key = bank.identity
        if key in self._banks:
            self._banks.move_to_end(key)
            return self._banks[key], "memory"
        path = self.cache_dir / "banks" / f"bank-{key[:32]}.pt" if self.cache_dir else None
        source = "built"
        if path is not None and path.is_file():
            try:
                bank, source = bank_module.ReferenceBank.load(path), "disk"
            except bank_module.BankError as err:
                logger.warning("rebuilding a damaged bank: %s", err)
        statistics = self._statistics(bank)
        if path is not None and (source == "built" or statistics.get("new")):
            statistics.pop("new", None)
            bank.save(path)
            older = sorted(path.parent.glob("bank-*.pt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
            for stale in older[2 * BANKS_IN_MEMORY :]:  # the banks of older reference sets of a growing datastore
                stale.unlink(missing_ok=True)
        self._banks[key] = bank
        while len(self._banks) > BANKS_IN_MEMORY:
            self._banks.popitem(last=False)
        return bank, source

    def _statistics(self, bank: Any) -> dict[str, Any]:
        """The bank's reference statistics under the run's scoring settings (computed once, kept in the bank)."""
        evaluator = self.evaluator
        known = len(bank.statistics)
        statistics = bank.statistics_for(evaluator.inferer, evaluator.network, evaluator.threshold, self.top_fraction)
        return {**statistics, "new": len(bank.statistics) > known}

    @property
    def top_fraction(self) -> float:
        return float(self.config["top_fraction"])

    def _answer_key(self, request: Request) -> str:
        """Identity of a request's answer, known before anything is encoded: the input files of the study and of its
        references, the token-shaping settings (with the weights), the scoring settings and the output options."""
        evaluator = self.evaluator
        cache = evaluator.encoder.token_cache
        ident = {
            "members": [(s["subject"], cache.input_digests(s)) for s in request.cohort],
            "skipped": request.skipped,
            "tokens": cache.fingerprint,
            "settings": evaluator.settings,
            "threshold": evaluator.threshold,
            "strong_factor": self.strong_factor,
            "output": [request.heatmap, request.extension, request.dtype, request.compress],
            "bundle_version": self.scripts.token_cache.bundle_version(),
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()

    # ------------------------------------------------------------------ what a request answers
    def statistics(self, request: Request) -> dict[str, Any]:
        return self._statistics(request.bank)

    def levels(self, request: Request) -> dict[str, float]:
        """The classes' levels: the references' operating threshold, and the strong level as far again above their
        median token score (``strong_factor`` 2)."""
        statistics = self.statistics(request)
        threshold, median = statistics["threshold"], statistics["median"]
        strong = (
            max(threshold, median + self.strong_factor * (threshold - median)) if math.isfinite(median) else threshold
        )
        return {"anomaly": threshold, "strong_anomaly": strong}

    def token_scores(self, request: Request):
        evaluator = self.evaluator
        return request.bank.scores(evaluator.inferer, evaluator.network, request.query.entry)

    def token_score(self, scores) -> float:
        """A study's ranking statistic: the mean of its highest ``top_fraction`` token scores."""
        import torch

        return float(self.scripts.outputs.top_fraction_mean(scores[torch.isfinite(scores)].numpy(), self.top_fraction))

    def summary(self, request: Request, token_score: float, row: dict[str, Any]) -> dict[str, Any]:
        """The JSON answer of a request (MONAI Label adds its own latencies and label names)."""
        encoder = self.evaluator.network.encoder
        report = self.scripts.run_report
        statistics = self.statistics(request)
        reference_scores = statistics.get("token_scores", [])
        levels = self.levels(request)
        return {
            "subject": request.image_id,
            "result": "heatmap" if request.heatmap else "labels",
            "subject_score": finite_or_none(row["subject_score"]),
            "lesion_volume_ml": finite_or_none(row["lesion_volume_ml"]),
            "threshold": finite_or_none(levels["anomaly"]),
            "levels": {k: finite_or_none(v) for k, v in levels.items()},
            "token_score": finite_or_none(token_score),
            "rank": 1 + sum(1 for v in reference_scores if math.isfinite(v) and v > token_score),
            "cohort_size": 1 + len(request.references),
            "rank_by": f"token_score: mean of the top {self.top_fraction:g} fraction of token scores, against the "
            "references' own (each reference against the others)",
            "references": sorted(request.references),
            "reference_rule": request.rule,
            "skipped_references": request.skipped,
            "token_cache": {
                "dir": str(self.cache_dir or ""),
                "from_cache": request.from_cache,
                "encoded": request.encoded,
            },
            "reference_bank": request.bank_source,
            "backbone": {
                "name": encoder.name,
                "pretrained": bool(encoder.pretrained),
                "weights": report.weights_record(encoder),
                # the bundle's banner, as one line
                "warning": " ".join(
                    line.strip("! ") for line in report.backbone_note(encoder).splitlines() if line.strip("! ")
                ),
            },
            "cs3f_latencies": {k: round(v, 3) for k, v in request.timings.items()},
        }

    # ------------------------------------------------------------------ ranking, for the strategy
    def anomaly_ranking(self, datastore: Any, image_ids: list[str]) -> dict[str, float]:
        """The token score of each study against its references (encoding what is not cached yet)."""
        scores = {}
        for image_id in image_ids:
            try:
                request = self.prepare(self.request(datastore, image_id, datastore.get_image_uri(image_id), {}))
                scores[image_id] = self.token_score(self.token_scores(request))
            except CS3FError as err:
                logger.info("ranking: %s left out (%s)", image_id, err.message)
        return scores
