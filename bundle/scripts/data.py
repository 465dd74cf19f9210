"""The cohort as MONAI data: a datalist of subjects, and a dataset that preprocesses each one (or finds its tokens).

``cohort_datalist`` lists every subject that ``cohort.find_subjects`` finds, including those that cannot be used
(a missing mask, ...), which carry an ``error`` instead of being dropped silently: the encoding pass reports them.

``CohortDataset`` is MONAI's ``Dataset`` with two differences that a cohort run needs. A subject whose tokens are
in the token cache is not preprocessed at all (its cached entry is returned), and a subject whose preprocessing
fails is returned as an ``error`` record naming the file and the problem, so one bad subject never stops the
data loader (or a worker process) and the others still get their results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monai.data import Dataset

from .cohort import find_subjects
from .token_cache import TokenCache

__all__ = ["SUBJECT_KEYS", "CohortDataset", "cohort_datalist", "root_cause", "subject_of"]

SUBJECT_KEYS = ("subject", "image", "mask")  # what identifies a subject's inputs in every record


def cohort_datalist(
    dataset_dir: str,
    image_pattern: str | Sequence[str] = "{id}.nii.gz",
    mask_pattern: str | None = None,
    require_mask: bool = True,
) -> list[dict[str, str]]:
    """Every subject of ``dataset_dir``, sorted by id: ``{"subject", "image"[, "mask"]}``, or with ``error`` for a
    subject that cannot be used (see ``cohort.find_subjects``)."""
    subjects, problems = find_subjects(dataset_dir, image_pattern, mask_pattern, require_mask)
    skipped = [_problem_record(p) for p in problems]
    return sorted([*subjects, *skipped], key=lambda s: s["subject"])


def _problem_record(problem: str) -> dict[str, str]:
    """``"<id> (<image>): <why>"`` (``find_subjects``' wording) as a record."""
    subject, _, rest = problem.partition(" (")
    image, _, _ = rest.partition("): ")
    return {"subject": subject, "image": image, "error": problem}


def subject_of(record: Mapping[str, Any]) -> dict[str, str]:
    """The subject part of a record: its id and input paths."""
    return {k: record[k] for k in SUBJECT_KEYS if isinstance(record.get(k), str)}


def root_cause(err: BaseException) -> str:
    """The innermost error of a chain, as one line: MONAI wraps transform errors in "applying transform ..."."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}" if not isinstance(err, (ValueError, OSError)) else str(err)


class CohortDataset(Dataset):
    """The subjects of a cohort, each preprocessed by ``transform``, or its cached tokens when ``token_cache`` has them.

    Args:
        data: subject records (``cohort_datalist``); a record with an ``error`` is returned as it is.
        transform: the preprocessing (a dictionary transform giving ``image`` and ``mask`` on the common grid).
        token_cache: where encoded subjects are kept; a hit is returned as ``{..., "entry": cached entry}``.

    Every returned record holds ``source`` (the subject's ``SUBJECT_KEYS``: id and input paths) and either
    ``digests`` (SHA-256 of its input files, computed once here, where the files are read) with the preprocessed data
    or the cached ``entry``, or an ``error`` naming the file and the problem.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Callable | None = None,
        token_cache: TokenCache | None = None,
    ) -> None:
        super().__init__(data=list(data), transform=transform)
        self.token_cache = token_cache if token_cache is not None else TokenCache(None)

    def with_data(self, data: Sequence[Mapping[str, Any]]) -> CohortDataset:
        """The same preprocessing and cache over other subjects."""
        return CohortDataset(data, self.transform, self.token_cache)

    def _transform(self, index: int) -> dict[str, Any]:
        record = self.data[index]
        source = subject_of(record)
        if "error" in record:
            return {"source": source, "error": record["error"]}
        try:
            digests = self.token_cache.input_digests(source)
            entry = self.token_cache.load(source)
            if entry is not None:
                return {"source": source, "digests": digests, "entry": entry}
            return {**super()._transform(index), "source": source, "digests": digests}
        except Exception as err:  # one subject's failure must not lose the others' results
            return {"source": source, "error": f"{source['subject']} ({source['image']}): {root_cause(err)}"}
