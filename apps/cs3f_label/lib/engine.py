"""CS3F for MONAI Label: one study scored against the other studies of the datastore, by the bundle's own code.

Nothing of the pipeline is re-implemented here. The engine reads ``bundle/configs/inference.json`` with MONAI's
``ConfigParser`` (plus any preset files and ``--conf`` overrides), instantiates the bundle's ``evaluator``
(``scripts.engines.CohortEvaluator``: its ``encoder`` pass with the preprocessing, tokenizer network and token
cache, the cohort inferer, the postprocessing) and calls its public ``encoder.encode`` and ``heat_maps``. What it
adds is MONAI Label glue:

* the cohort of a request: the requested study plus the *reference* studies of the datastore (all of them,
  or those whose id matches a pattern), with a minimum count;
* a token cache in a folder of its own (``<studies>/.cs3f_cache`` for a local datastore), keyed by image
  content and token-shaping settings (the bundle's ``TokenCache``), so that only new or changed studies are
  encoded;
* a memo of the cohort's token scores, keyed by the cached tokens of every member and the scoring settings,
  so that a second request on the same datastore (or a batch over it) does not score the cohort again;
* viewer outputs: a uint8 label map with named classes, or the float32 heat map, and a JSON summary with
  the study's score and its rank in the cohort.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from lib.http_policy import POLICY_KEYS

logger = logging.getLogger(__name__)

# Classes of the label map (0 is background). Level 1 is exactly the bundle's anomaly mask.
LABELS = {"anomaly": 1, "strong_anomaly": 2}
# --conf keys that belong to the app; every other key must be a key of the bundle config.
APP_KEYS = {
    "models": "which lib/configs to load (default: all, i.e. cs3f)",
    "preset": "comma-separated JSON/YAML files merged over bundle/configs/inference.json (e.g. configs/ct.json)",
    "bundle_dir": "the CS3F bundle folder (default: <repo>/bundle, found relative to this app)",
    "cache_dir": "token cache folder ('none' disables it; default <studies>/.cs3f_cache, or <app>/model/cs3f_cache)",
    "reference": "reference cohort: 'all' or comma-separated glob patterns over image ids (default: all)",
    "min_reference": "minimum number of usable reference studies (default 2, the least cross-subject scoring needs)",
    "strong_factor": "class 2 level = median + strong_factor x (threshold - median) of the cohort's token scores (default 2)",
    **POLICY_KEYS,
}
# MONAI Label's own conf keys that may reach the app; accepted silently.
MONAI_LABEL_KEYS = {"server_mode", "auth_token", "preload", "skip_scoring", "skip_strategies", "skip_trainers"}
# bundle keys the app owns: it runs requests, not a cohort folder, and answers over HTTP
FORCED = {"progress": False, "write_overview": False, "overwrite": True, "distributed": False}
DEFAULT_MIN_REFERENCE = 2
MEMO_ENTRIES = 2  # cohort score sets kept in memory (a coarse-to-fine set is ~5.6 MB per study)
MEMO_FILES = 4  # cohort score files kept in the cache folder (older cohorts of a growing datastore are dropped)
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "float32")


class CS3FError(Exception):
    """A request that cannot be answered, with the HTTP status it deserves."""

    def __str__(self) -> str:
        return self.message

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


def parse_value(text: Any) -> Any:
    """A ``--conf`` value: JSON when it parses (numbers, booleans, null, lists, objects), else the plain string."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def default_bundle_dir(app_dir: str | os.PathLike) -> Path:
    """``<repo>/bundle`` for an app at ``<repo>/apps/cs3f_label``."""
    return Path(app_dir).resolve().parents[1] / "bundle"


def import_bundle(bundle_dir: Path):
    """Make the bundle's ``scripts`` package importable (as ``monai.bundle run`` does) and import it."""
    config = bundle_dir / "configs" / "inference.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"CS3F bundle not found: {config} does not exist. Run the app from the CS3F repository "
            "(apps/cs3f_label next to bundle/) or pass --conf bundle_dir /path/to/bundle."
        )
    if str(bundle_dir) not in sys.path:
        sys.path.insert(0, str(bundle_dir))
    import scripts  # noqa: F401  (the bundle's own package)

    loaded = Path(scripts.__file__).resolve().parent
    if loaded != (bundle_dir / "scripts").resolve():
        raise ImportError(
            f"a different 'scripts' package is already imported ({loaded}); expected {bundle_dir / 'scripts'}"
        )
    return scripts


def safe_name(image_id: str) -> str:
    """A file-name-safe subject name for an image id (ids of DICOMweb or uploads may hold any character)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", image_id) or "study"
    return name if name == image_id else f"{name}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: report them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class Engine:
    """Builds the bundle's evaluator from its config and answers one study's request against a reference cohort.

    Args:
        app_dir: the MONAI Label app folder.
        studies: the datastore location given to ``monailabel start_server --studies``.
        conf: the ``--conf`` key/value strings.
        local_datastore: whether the datastore is a writable folder (then the cache lives in it).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str], local_datastore: bool = True) -> None:
        self.app_dir = Path(app_dir).resolve()
        self.bundle_dir = (
            Path(conf["bundle_dir"]).expanduser().resolve() if conf.get("bundle_dir") else default_bundle_dir(app_dir)
        )
        self.scripts = import_bundle(self.bundle_dir)
        self.config_files = [self.bundle_dir / "configs" / "inference.json", *self._presets(conf.get("preset", ""))]

        self.reference = str(conf.get("reference", "all") or "all")
        self.min_reference = self._min_reference(conf.get("min_reference", DEFAULT_MIN_REFERENCE))
        self.strong_factor = float(parse_value(conf.get("strong_factor", 2.0)))
        if not math.isfinite(self.strong_factor) or self.strong_factor < 1:
            raise ValueError(f"--conf strong_factor must be a finite number >= 1, got {conf.get('strong_factor')!r}")
        self.cache_dir = self._cache_dir(conf.get("cache_dir"), studies, local_datastore)
        # the bundle's dataset_dir: never searched by the app (it names the subjects itself), but relative paths in
        # bundle settings are best resolved in the studies folder
        self.dataset_dir = Path(studies).resolve() if local_datastore else self.app_dir
        self.overrides = {k: parse_value(v) for k, v in conf.items() if k not in APP_KEYS and k not in MONAI_LABEL_KEYS}
        self.parser = self._make_parser()  # bad presets or overrides fail here, at start-up

        self._evaluator = None
        self._lock = threading.RLock()
        self._memo: OrderedDict[str, dict[str, Any]] = OrderedDict()

    # ------------------------------------------------------------------ configuration
    def _presets(self, value: str) -> list[Path]:
        files = []
        for item in [p.strip() for p in str(value or "").split(",") if p.strip()]:
            path = Path(item).expanduser()
            candidates = (
                [path]
                if path.is_absolute()
                else [Path.cwd() / path, self.bundle_dir.parent / path, self.app_dir / path]
            )
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise FileNotFoundError(
                    f"--conf preset: {item} not found (looked at {', '.join(map(str, candidates))})"
                )
            files.append(found.resolve())
        return files

    @staticmethod
    def _min_reference(value: Any) -> int:
        count = int(parse_value(value))
        if count < DEFAULT_MIN_REFERENCE:
            raise ValueError(
                f"min_reference must be >= {DEFAULT_MIN_REFERENCE} (cross-subject scoring needs 3 studies), got {count}"
            )
        return count

    def _cache_dir(self, value: str | None, studies: str, local_datastore: bool) -> Path | None:
        if value is not None and str(value).strip().lower() in ("", "none", "null", "false", "off"):
            return None
        if value:
            return Path(value).expanduser().resolve()
        if local_datastore:
            return Path(studies).resolve() / ".cs3f_cache"
        return self.app_dir / "model" / "cs3f_cache"

    def _make_parser(self):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config([str(f) for f in self.config_files])
        unknown = sorted(k for k in self.overrides if k not in parser)
        if unknown:
            raise ValueError(
                f"unknown --conf key(s) {unknown}: not a key of {self.config_files[0]} nor of the app "
                f"({', '.join(sorted(APP_KEYS))})"
            )
        owned = sorted(k for k in self.overrides if k in FORCED or k in ("bundle_root", "dataset_dir", "output_dir"))
        if owned:
            logger.warning("CS3F: --conf %s ignored: the MONAI Label app sets these itself", owned)
        parser.update({k: v for k, v in self.overrides.items() if k not in owned})
        parser.update(
            {
                **FORCED,
                "bundle_root": str(self.bundle_dir),
                "dataset_dir": str(self.dataset_dir),
                "output_dir": str(self.app_dir / "model" / "outputs"),  # unused: results are answered from memory
                "cache_dir": str(self.cache_dir) if self.cache_dir else "",
            }
        )
        # evaluate what is cheap now so that a bad value stops the server at start-up, not at the first request
        for key in ("inferer", "settings"):
            parser.get_parsed_content(key, instantiate=True, lazy=True)
        return parser

    def setting(self, key: str) -> Any:
        return self.parser.get_parsed_content(key, instantiate=True, lazy=True)

    def describe(self) -> str:
        presets = ", ".join(str(p) for p in self.config_files[1:]) or "none"
        return (
            f"CS3F bundle {self.bundle_dir} (presets: {presets}); backbone {self.setting('backbone')!r}, grid "
            f"{self.setting('grid_size')}, matching {self.setting('matching')!r}, device {self.setting('device')}; "
            f"reference cohort {self.reference!r} (at least {self.min_reference}); token cache {self.cache_dir or 'off'}"
        )

    def startup_check(self) -> str | None:
        """A clear log line when the backbone's weights are not on this machine (no download is tried here)."""
        weights = self.scripts.weights
        name = self.setting("backbone")
        if name not in weights.SOURCES or self.setting("fallback_backbone"):
            return None
        try:
            found = weights.find_weights(name, self.setting("weights_path"), self.setting("models_dir"))
            logger.info("CS3F: backbone %s, weights %s", name, found.describe())
        except weights.WeightsNotFoundError as err:
            message = (
                f"CS3F: no weights for backbone {name!r} on this machine; every 'anomaly' request will fail with this "
                f"error until they are provided. To try the app offline, restart it with --conf backbone intensity.\n{err}"
            )
            logger.warning(message)
            return message
        return None

    # ------------------------------------------------------------------ the bundle's evaluator
    @property
    def evaluator(self):
        """The bundle's ``CohortEvaluator`` with its backbone's weights loaded, built at the first request."""
        with self._lock:
            if self._evaluator is None:
                try:
                    evaluator = self.parser.get_parsed_content("evaluator")
                    self.parser.get_parsed_content("weights_loader")(evaluator)
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
    def references(self, datastore, image_id: str, image_path: str, params: dict[str, Any]) -> list[dict[str, str]]:
        """The reference studies of a request: datastore images other than the query, filtered by pattern."""
        pattern = params.get("reference", self.reference) or "all"
        pattern = ",".join(map(str, pattern)) if isinstance(pattern, (list, tuple)) else str(pattern)
        patterns = [p.strip() for p in pattern.split(",") if p.strip()]
        match_all = not patterns or any(p.lower() == "all" for p in patterns)
        query = os.path.realpath(image_path)
        refs = []
        for ref_id in sorted(datastore.list_images()):
            if ref_id == image_id or not (match_all or any(fnmatch.fnmatchcase(ref_id, p) for p in patterns)):
                continue
            refs.append({"id": ref_id})
        for ref in refs:
            try:
                ref["image"] = datastore.get_image_uri(ref["id"]) or ""
            except Exception as err:  # e.g. a DICOMweb series that cannot be fetched
                ref["image"], ref["error"] = "", str(err)
        return [r for r in refs if not r["image"] or os.path.realpath(r["image"]) != query]

    def infer(self, datastore, image_id: str, image_path: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Score study ``image_id`` (at ``image_path``) against the references; returns (result file, JSON)."""
        with self._lock:
            return self._infer(datastore, image_id, image_path, params)

    def _infer(self, datastore, image_id, image_path, params):
        begin = time.perf_counter()
        if not image_path or not os.path.exists(image_path):
            raise CS3FError(404, f"study {image_id!r} has no image on the server ({image_path or 'no path'})")
        try:
            min_reference = self._min_reference(params.get("min_reference", self.min_reference))
            heatmap = parse_value(params.get("heatmap", False))
            if not isinstance(heatmap, bool):
                raise ValueError(f"heatmap must be true or false, got {params.get('heatmap')!r}")
            ext = str(params.get("result_extension") or ".nii.gz")
            ext = ext if ext.startswith(".") else f".{ext}"
            if ext.lower() not in RESULT_EXTENSIONS:
                raise ValueError(f"result_extension must be one of {RESULT_EXTENSIONS}, got {ext!r}")
            dtype_name = "float32" if heatmap else str(params.get("result_dtype") or "uint8")
            if dtype_name not in RESULT_DTYPES:
                raise ValueError(f"result_dtype must be one of {RESULT_DTYPES}, got {params.get('result_dtype')!r}")
            dtype = np.dtype(dtype_name).type
        except (TypeError, ValueError) as err:
            raise CS3FError(400, f"bad request parameter: {err}") from err
        evaluator = self.evaluator
        report = self.scripts.run_report
        top_fraction = float(self.setting("top_fraction"))

        refs = self.references(datastore, image_id, image_path, params)
        pattern = params.get("reference", self.reference)
        if len(refs) < min_reference:
            raise CS3FError(
                409,
                f"too few reference studies for {image_id!r}: {len(refs)} in the datastore match reference={pattern!r} "
                f"(ids: {', '.join(r['id'] for r in refs) or 'none'}), at least {min_reference} are needed. "
                "Add studies to the datastore or widen --conf reference.",
            )
        query = {"subject": safe_name(image_id), "image": image_path}
        members = {query["subject"]: image_id}
        cohort, problems = [query], []
        for ref in refs:
            if ref.get("error") or not ref["image"]:
                problems.append(f"{ref['id']}: {ref.get('error') or 'no image'}")
                continue
            name = safe_name(ref["id"])
            members[name] = ref["id"]
            cohort.append({"subject": name, "image": ref["image"]})
        cohort.sort(key=lambda s: s["subject"])
        cache = evaluator.encoder.token_cache
        from_cache = []
        for s in cohort:
            try:
                if cache.enabled and cache.path(s).is_file():
                    from_cache.append(members[s["subject"]])
            except OSError:
                pass  # unreadable: encoding reports it

        tick = time.perf_counter()
        encoded = evaluator.encoder.encode(cohort)
        problems += evaluator.encoder.problems
        encode_s = time.perf_counter() - tick
        names = [e.subject["subject"] for e in encoded]
        if query["subject"] not in names:
            why = next((p for p in problems if p.startswith(f"{query['subject']} (")), "unreadable")
            why = why.replace(f"{query['subject']} ({image_path}): ", "")
            raise CS3FError(422, f"study {image_id!r} cannot be read or used ({os.path.basename(image_path)}): {why}")
        ref_problems = [p for p in problems if not p.startswith(f"{query['subject']} (")]
        if len(encoded) - 1 < min_reference:
            raise CS3FError(
                409,
                f"too few usable reference studies for {image_id!r}: {len(encoded) - 1} of {len(refs)} could be used, "
                f"at least {min_reference} are needed. Skipped: " + "; ".join(ref_problems),
            )

        tick = time.perf_counter()
        cohort_scores = self._cohort_scores(evaluator, encoded, top_fraction)
        score_s = time.perf_counter() - tick
        qi = names.index(query["subject"])
        threshold, median = cohort_scores["threshold"], cohort_scores["median"]
        # class 2: as far again above the cohort's median token score as the threshold is (strong_factor 2)
        strong = (
            max(threshold, median + self.strong_factor * (threshold - median)) if math.isfinite(median) else threshold
        )
        rank_scores = cohort_scores["token_scores"]
        mine = rank_scores[qi]
        rank = 1 + sum(1 for j, v in enumerate(rank_scores) if j != qi and math.isfinite(v) and v > mine)

        tick = time.perf_counter()
        maps = evaluator.heat_maps(encoded[qi], cohort_scores["scores"][qi], threshold)
        row = {"subject_score": maps["subject_score"], "lesion_volume_ml": maps["lesion_volume_ml"]}
        result_file = self._result_file(
            maps["anomaly"],
            maps["anomaly_mask"],
            strong,
            heatmap,
            ext,
            dtype,
            bool(parse_value(params.get("result_compress", False))),
        )
        write_s = time.perf_counter() - tick

        encoder = evaluator.network.encoder
        result = {
            "subject": image_id,
            "result": "heatmap" if heatmap else "labels",
            "subject_score": finite_or_none(row["subject_score"]),
            "lesion_volume_ml": finite_or_none(row["lesion_volume_ml"]),
            "threshold": finite_or_none(threshold),
            "levels": {"anomaly": finite_or_none(threshold), "strong_anomaly": finite_or_none(strong)},
            "rank": rank,
            "cohort_size": len(encoded),
            "token_score": finite_or_none(mine),
            "rank_by": f"token_score: mean of the top {top_fraction:g} fraction of token scores, for every study of the cohort",
            "references": sorted(members[n] for n in names if n != query["subject"]),
            "reference_pattern": pattern,
            "skipped_references": ref_problems,
            "token_cache": {
                "dir": str(cache.cache_dir or ""),
                "from_cache": sorted(i for i in from_cache if i in {members[n] for n in names}),
                "encoded": sorted(members[n] for n in names if members[n] not in from_cache),
            },
            "cohort_scores": cohort_scores["source"],
            "backbone": {
                "name": encoder.name,
                "pretrained": bool(encoder.pretrained),
                "weights": report.weights_record(encoder),
                # the bundle's banner, as one line
                "warning": " ".join(
                    line.strip("! ") for line in report.backbone_note(encoder).splitlines() if line.strip("! ")
                ),
            },
            "latencies": {
                "encode": round(encode_s, 3),
                "score": round(score_s, 3),
                "write": round(write_s, 3),
                "total": round(time.perf_counter() - begin, 3),
            },
        }
        if not heatmap:
            result["label_names"] = dict(LABELS)
        logger.info(
            "CS3F %s: score %s, rank %d of %d, %d from cache, %d encoded, cohort scores %s, %.2f s",
            image_id,
            result["subject_score"],
            rank,
            len(encoded),
            len(result["token_cache"]["from_cache"]),
            len(result["token_cache"]["encoded"]),
            cohort_scores["source"],
            result["latencies"]["total"],
        )
        return result_file, result

    # ------------------------------------------------------------------ scoring with a memo
    def _cohort_scores(self, evaluator, encoded, top_fraction: float) -> dict[str, Any]:
        """Token scores of every cohort member against the others, the threshold, and a rank statistic.

        Keyed by the token-cache key of each member (image content + token settings) and the scoring
        settings, kept in memory and, with the cache on, on disk next to the tokens.
        """
        import torch

        ident = {
            "members": [(e.subject["subject"], evaluator.encoder.token_cache.key(e.subject)) for e in encoded],
            "settings": evaluator.settings,  # every public setting, the scoring ones included
            "threshold": evaluator.threshold,
        }
        key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
        if key in self._memo:
            self._memo.move_to_end(key)
            return {**self._memo[key], "source": "memory"}
        cache = evaluator.encoder.token_cache
        path = cache.cache_dir / f"cohort-{key[:32]}.pt" if cache.enabled else None
        entry = None
        if path is not None and path.is_file():
            try:
                entry = torch.load(path, map_location="cpu", weights_only=True)
                source = "disk"
            except Exception as err:
                logger.warning("ignoring unreadable cohort score memo %s: %s", path, err)
        if entry is None:
            # exactly what the bundle's evaluator does: every subject scored against all the others
            scores = evaluator.inferer.score_entries([e.entry for e in encoded], evaluator.network)
            threshold = self.scripts.scoring.robust_threshold(
                scores, evaluator.threshold["method"], evaluator.threshold["value"]
            )
            finite = scores[torch.isfinite(scores)]
            entry = {
                "scores": scores,
                "threshold": torch.tensor(threshold, dtype=torch.float64),
                "median": torch.tensor(float(finite.median()) if finite.numel() else math.nan, dtype=torch.float64),
            }
            source = "computed"
            if path is not None:
                with self.scripts.outputs.atomic_path(path) as tmp:
                    torch.save(entry, tmp)
                older = sorted(path.parent.glob("cohort-*.pt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
                for stale in older[MEMO_FILES:]:
                    stale.unlink(missing_ok=True)
        top = self.scripts.outputs.top_fraction_mean
        result = {
            "scores": entry["scores"],
            "threshold": float(entry["threshold"]),
            "median": float(entry["median"]),
            "token_scores": [top(s[torch.isfinite(s)].numpy(), top_fraction) for s in entry["scores"]],
        }
        self._memo[key] = result
        while len(self._memo) > MEMO_ENTRIES:
            self._memo.popitem(last=False)
        return {**result, "source": source}

    # ------------------------------------------------------------------ outputs for the viewers
    @staticmethod
    def _result_file(heat, flagged, strong: float, heatmap: bool, ext: str, dtype: type, compress: bool) -> str:
        """Write the label map (or the heat map) on the study's grid in the format the client asked for; returns its
        path."""
        import nibabel as nib

        affine = np.asarray(heat.affine, dtype=np.float64)
        values = heat.as_tensor()[0].numpy().astype(np.float32)
        if heatmap:
            data = values
        else:
            mask = flagged.as_tensor()[0].numpy() > 0  # the bundle's mask: class 1 and up
            data = mask.astype(np.uint8) + (mask & (values >= strong)).astype(np.uint8)
        handle, name = tempfile.mkstemp(suffix=ext, prefix="cs3f_")
        os.close(handle)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(name, 0o666 & ~umask)  # mkstemp makes 0600; a label saved into the datastore keeps this mode
        try:
            if ext.lower() in (".nii", ".nii.gz"):
                out = nib.Nifti1Image(data.astype(dtype), affine)
                out.set_qform(affine, code=1)
                out.set_sform(affine, code=1)
                nib.save(out, name)
            else:  # .nrrd for the OHIF and Slicer plugins, through MONAI Label's own writer
                from monailabel.transform.writer import write_itk

                write_itk(data, name, affine, dtype, compress)
        except BaseException:
            os.unlink(name)  # no empty result file left behind
            raise
        return name
