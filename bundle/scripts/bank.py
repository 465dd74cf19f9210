"""A reference bank: the tokens of a reference cohort, kept, so that one new study is scored at once.

Trained normal-reference detectors score a study against what they learned; CS3F does the same without training
by keeping the tokens of a reference cohort (ideally healthy, or simply "the cohort so far") in one file. With a
bank, a study is scored against the bank's subjects only: one study is enough, and its results do not depend on
the other studies scored with it.

The file holds, per reference subject, what scoring needs (tokens and their validity, fine tokens too), the
subject ids and the digests of their input files, the description of everything that shaped the tokens
(``token_cache.token_fingerprint``: backbone and weights, grid, the resolved preprocessing and tokenizer), and the
reference statistics that set the operating threshold: the bank's own token scores, each reference subject
against the others, under the scoring settings they were computed with. A bank built with other settings is
refused with the settings that differ. Banks grow: building into an existing bank adds the new subjects and
encodes only those.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .outputs import atomic_path, top_fraction_mean
from .scoring import robust_threshold
from .token_cache import bundle_version, token_fingerprint

__all__ = ["BankError", "BankMismatchError", "ReferenceBank", "BankBuilder", "differences", "load_bank"]

FORMAT = 1
ENTRY_KEYS = ("tokens", "valid", "fine", "fine_valid")  # what scoring needs of a reference subject
MIN_REFERENCES = 2  # a study scored against one subject only would have no "closest fraction" to average


class BankError(ValueError):
    """A reference bank that cannot be used (missing, unreadable, too small); the message names the file."""


class BankMismatchError(BankError):
    """A reference bank built with other settings than the run's; the message lists the settings that differ."""


def differences(bank: Any, run: Any, path: str = "") -> list[str]:
    """Where two fingerprint descriptions differ, as ``"<setting>: bank <value>, this run <value>"`` lines."""
    if isinstance(bank, Mapping) and isinstance(run, Mapping):
        return [
            d
            for key in sorted(set(bank) | set(run), key=str)
            for d in differences(bank.get(key), run.get(key), f"{path}.{key}" if path else str(key))
        ]
    if isinstance(bank, list) and isinstance(run, list) and len(bank) == len(run):
        return [d for i, (a, b) in enumerate(zip(bank, run)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if bank == run else [f"{path}: bank {bank!r}, this run {run!r}"]


def _comparable(description: Mapping[str, Any]) -> Any:
    """A fingerprint description as JSON would store it (tuples become lists), for comparing."""
    return json.loads(json.dumps(description, sort_keys=True, default=str))


class ReferenceBank:
    """The reference subjects' entries, who they are, and what shaped them (see the module doc).

    Args:
        subjects: reference subject ids, in order.
        entries: per subject, ``tokens`` and ``valid`` (and ``fine``, ``fine_valid`` with fine tokens).
        digests: per subject, the SHA-256 of its input files.
        description: ``token_cache.token_fingerprint`` of the settings that shaped the tokens.
        statistics: reference score statistics per scoring setting (see :meth:`statistics_for`).
        path: where the bank was read from or is written to, for messages.
    """

    def __init__(
        self,
        subjects: Sequence[str],
        entries: Sequence[Mapping[str, Any]],
        digests: Sequence[Mapping[str, str]],
        description: Mapping[str, Any],
        statistics: Mapping[str, Any] | None = None,
        path: str = "",
    ) -> None:
        if not len(subjects) == len(entries) == len(digests):
            raise BankError(f"{path or 'reference bank'}: {len(subjects)} subjects for {len(entries)} entries")
        self.subjects = list(subjects)
        self.entries = [{k: e[k] for k in ENTRY_KEYS if k in e} for e in entries]
        self.digests = [dict(d) for d in digests]
        self.description = _comparable(description)
        self.statistics = dict(statistics or {})
        self.path = path

    def __len__(self) -> int:
        return len(self.subjects)

    @property
    def identity(self) -> str:
        """SHA-256 of who the references are (ids, input files, settings): what a result scored against the bank
        depends on."""
        blob = json.dumps([self.subjects, self.digests, self.description], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        """What ``run.json`` keeps of the bank."""
        return {"path": self.path, "subjects": self.subjects, "sha256": self.identity, "statistics": self.statistics}

    # ----------------------------------------------------------------------------------------------- file
    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceBank:
        path = Path(path)
        if not path.is_file():
            raise BankError(f"reference bank {path} does not exist; build one with configs/build_bank.json")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a reference bank of format {FORMAT}")
            bank = cls(
                data["subjects"],
                data["entries"],
                data["digests"],
                json.loads(data["description"]),
                json.loads(data["statistics"]),
                str(path),
            )
        except BankError:
            raise
        except Exception as err:
            raise BankError(f"reference bank {path} cannot be read: {err}") from err
        return bank

    def save(self, path: str | os.PathLike | None = None) -> Path:
        path = Path(path or self.path)
        with atomic_path(path) as tmp:
            torch.save(
                {
                    "format": FORMAT,
                    "bundle_version": bundle_version(),
                    "subjects": self.subjects,
                    "entries": self.entries,
                    "digests": self.digests,
                    "description": json.dumps(self.description, sort_keys=True),
                    "statistics": json.dumps(self.statistics, sort_keys=True),
                },
                tmp,
            )
        self.path = str(path)
        return path

    # ----------------------------------------------------------------------------------------------- checks
    def check(self, description: Mapping[str, Any], ignore: Sequence[str] = ()) -> None:
        """Refuse the bank when the run's token-shaping settings differ from those the bank was built with.

        ``ignore``: top-level settings not compared (those not known yet, e.g. the weights before they are loaded).
        """
        run = {k: v for k, v in _comparable(description).items() if k not in ignore}
        bank = {k: v for k, v in self.description.items() if k not in ignore}
        found = differences(bank, run)
        if found:
            shown = "; ".join(found[:6]) + (f"; and {len(found) - 6} more" if len(found) > 6 else "")
            raise BankMismatchError(
                f"reference bank {self.path} was built with other settings than this run ({shown}): build a bank with "
                "these settings, or run with the bank's"
            )
        if len(self) < MIN_REFERENCES:
            raise BankError(
                f"reference bank {self.path} holds {len(self)} subject(s); at least {MIN_REFERENCES} are needed"
            )

    # ----------------------------------------------------------------------------------------------- scoring
    def add(self, encoded: Sequence[Any]) -> tuple[list[str], list[str]]:
        """Add encoded subjects (``engines.Encoded``); a subject already in the bank is replaced. Returns the ids
        added and replaced."""
        added, replaced = [], []
        for e in encoded:
            record = {k: e.entry[k] for k in ENTRY_KEYS if k in e.entry}
            sid = e.subject["subject"]
            if sid in self.subjects:
                i = self.subjects.index(sid)
                self.entries[i], self.digests[i] = record, dict(e.digests)
                replaced.append(sid)
            else:
                self.subjects.append(sid)
                self.entries.append(record)
                self.digests.append(dict(e.digests))
                added.append(sid)
        return added, replaced

    def scores(self, inferer: Any, network: Any, entry: Mapping[str, Any]) -> torch.Tensor:
        """Token scores of one study (an encoded entry) against the bank's subjects."""
        return inferer.score_entries([entry, *self.entries], network, [0])[0]

    def statistics_for(
        self, inferer: Any, network: Any, threshold: Mapping[str, Any], top_fraction: float = 0.01
    ) -> dict[str, Any]:
        """The reference statistics of the scoring settings of ``inferer`` and ``threshold``, from the bank's own token
        scores (each reference subject against the others): the operating threshold, their median and highest, and
        each subject's ranking statistic (the mean of its highest ``top_fraction`` token scores). Computed once per
        scoring setting and kept in the bank."""
        key = json.dumps(
            {"scoring": _scoring_settings(inferer), "threshold": dict(threshold), "top_fraction": top_fraction},
            sort_keys=True,
        )
        if key not in self.statistics:
            scores = inferer.score_entries(self.entries, network)
            finite = scores[torch.isfinite(scores)]
            self.statistics[key] = {
                "threshold": robust_threshold(scores, threshold["method"], threshold["value"]),
                "median": float(finite.median()) if finite.numel() else math.nan,
                "max": float(finite.max()) if finite.numel() else math.nan,
                "token_scores": [top_fraction_mean(s[torch.isfinite(s)].numpy(), top_fraction) for s in scores],
            }
        return self.statistics[key]


def _scoring_settings(inferer: Any) -> dict[str, Any]:
    """What of the inferer changes scores (and so the reference statistics)."""
    return {
        k: getattr(inferer, k) for k in ("matching", "window", "alpha", "min_token_coverage", "fine_margin", "fusion")
    }


def load_bank(path: str | os.PathLike | None) -> ReferenceBank | None:
    """The bank at ``path`` (the bundle's ``reference_bank``), or ``None`` when there is none (cohort mode)."""
    if path is None or (isinstance(path, str) and path.strip().lower() in ("", "none", "null")):
        return None
    return ReferenceBank.load(Path(path).expanduser())


class BankBuilder:
    """Encodes the cohort of ``dataset_dir`` into a reference bank at ``path`` (``configs/build_bank.json``).

    An existing bank at ``path`` built with the same settings grows: its subjects are kept, a subject of the folder
    with the same id and input files is not encoded again, one with other files replaces it, and new subjects are
    added. The token cache applies as in any run.

    Args:
        encoder: the bundle's encoding pass (``engines.TokenEncoder``).
        inferer, network: the cohort inferer and the tokenizer (the bank's statistics are computed with them).
        path: the bank file (under the bundle's ``models/`` by default).
        settings: the run's settings (the token fingerprint is built from them).
        preprocessing: the run's preprocessing (part of the fingerprint).
        threshold: ``{"method", "value"}``, for the reference statistics stored with the bank.
    """

    def __init__(
        self,
        encoder: Any,
        inferer: Any,
        network: Any,
        path: str | os.PathLike,
        settings: Mapping[str, Any],
        preprocessing: Any,
        threshold: Mapping[str, Any],
    ) -> None:
        self.encoder = encoder
        self.inferer = inferer
        self.network = network
        self.path = Path(path)
        self.settings = dict(settings)
        self.preprocessing = preprocessing
        self.threshold = dict(threshold)

    def run(self) -> ReferenceBank:
        dataset = self.encoder.data_loader.dataset
        bank = ReferenceBank.load(self.path) if self.path.is_file() else None
        if bank is not None:  # before any encoding, on all but the weights (loaded when the encoder starts)
            early = token_fingerprint(self.settings, self.network, self.preprocessing, require_weights=False)
            bank.check(early, ignore=("weights", "pretrained"))
        found = [s for s in dataset.data if "error" not in s]
        if len(found) + (len(bank) if bank is not None else 0) < MIN_REFERENCES:  # before any encoding
            raise BankError(
                f"{len(found)} subject(s) found in {self.settings.get('dataset_dir')} with image_pattern "
                f"{self.settings.get('image_pattern')!r}"
                + (f" and mask_pattern {self.settings['mask_pattern']!r}" if self.settings.get("mask_pattern") else "")
                + f"; a reference bank needs at least {MIN_REFERENCES} subjects"
                + "".join(f". {s['error']}" for s in dataset.data if "error" in s)
            )
        todo = [s for s in dataset.data if "error" in s or not self._in_bank(bank, s, dataset.token_cache)]
        encoded = self.encoder.encode(todo)  # only what the bank does not hold yet
        problems = list(self.encoder.problems)  # unusable subjects are among them
        description = token_fingerprint(self.settings, self.network, self.preprocessing)
        if bank is None:
            bank = ReferenceBank([], [], [], description, path=str(self.path))
        else:
            bank.check(description)
        added, replaced = bank.add(encoded)
        bank.statistics = {}  # the references changed, or the bank is new: computed again below
        if len(bank) < MIN_REFERENCES:
            raise BankError(
                f"{len(bank)} usable reference subject(s) for {self.path}; at least {MIN_REFERENCES} are needed"
                + "".join(f"; {p}" for p in problems)
            )
        statistics = bank.statistics_for(
            self.inferer, self.network, self.threshold, self.settings.get("top_fraction", 0.01)
        )
        bank.save(self.path)
        print(
            f"CS3F reference bank {self.path}: {len(bank)} subject(s), {len(added)} added, {len(replaced)} replaced, "
            f"{len(problems)} skipped; operating threshold {statistics['threshold']:.4g}"
            + "".join(f"\n  skipped: {p}" for p in problems),
            flush=True,
        )
        return bank

    @staticmethod
    def _in_bank(bank: ReferenceBank | None, subject: Mapping[str, str], cache: Any) -> bool:
        """Whether the bank holds this subject with these very input files (then it is not encoded again)."""
        if bank is None or subject["subject"] not in bank.subjects:
            return False
        return bank.digests[bank.subjects.index(subject["subject"])] == cache.input_digests(subject)
