"""On-disk cache of subject tokens, so re-running a cohort (or adding subjects) only encodes what is new.

One file per subject, named by a key that hashes the subject's input files (content, not names or
dates) and everything that shaped the tokens (backbone and its weights, grid, preprocessing, projection
seed, the bundle version, ...). A changed image, mask, setting or bundle release gives another key, so a
stale entry is never used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .outputs import atomic_path

__all__ = [
    "TokenCache",
    "bundle_version",
    "describe",
    "entry_problem",
    "file_digest",
    "files_intact",
    "run_token_cache",
    "token_fingerprint",
]

logger = logging.getLogger(__name__)
FORMAT_VERSION = 2  # bump when the cached content changes meaning (2: entries keep the writing pass's geometry)
METADATA = Path(__file__).resolve().parents[1] / "configs" / "metadata.json"


@functools.cache
def bundle_version() -> str:
    """The bundle's release (``configs/metadata.json``): a release may change preprocessing, so cached tokens
    and kept results of another release are not reused."""
    return str(json.loads(METADATA.read_text())["version"])


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, or of all files below a folder (a DICOM series), in name order."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(f, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def files_intact(digests: Mapping[str, str], folder: str | os.PathLike) -> bool:
    """Whether every file named (relative to ``folder``) in ``digests`` is there with that SHA-256."""
    folder = Path(folder)
    return bool(digests) and all(
        (folder / name).is_file() and file_digest(folder / name) == d for name, d in digests.items()
    )


# run settings that act after tokenization: changing them must not invalidate cached tokens
SCORING_ONLY = frozenset(
    {
        "dataset_dir",
        "output_dir",
        "image_pattern",
        "mask_pattern",
        "matching",
        "window",
        "alpha",
        "device",
        "threshold_method",
        "threshold_value",
        "top_fraction",
        "weights_path",
        "fine_margin",
        "fusion",
        "reference_bank",  # what the tokens are scored against, not what shapes them (a bank may be moved)
    }
)


def token_fingerprint(
    settings: Mapping[str, Any], network: Any, preprocessing: Any = None, require_weights: bool = True
) -> dict[str, Any]:
    """What shapes the tokens: every run setting except the scoring-only ones, the encoder's identity, and the
    resolved ``preprocessing`` and ``network`` (the tokenizer) themselves.

    The settings alone are not enough: any value of the config can be overridden (``--preprocessing#transforms#11#upper
    60``), so the parameters of every preprocessing transform and of the tokenizer are described from the objects
    the run actually uses (see ``describe``). The weights are identified by their content (the SHA-256 computed when
    they were found), not their path; an encoder whose weights are not loaded yet has no fingerprint, unless
    ``require_weights`` is false (then ``weights`` and ``pretrained`` say nothing yet: for early checks).
    """
    encoder = network.encoder
    if require_weights and not encoder.ready:
        raise RuntimeError(
            f"backbone {encoder.name!r}: its weights are not loaded yet (the bundle's weights_loader "
            "loads them when the encoder starts)"
        )
    weights = encoder.weights
    kept = {k: v for k, v in settings.items() if k not in SCORING_ONLY}
    steps = getattr(preprocessing, "transforms", [preprocessing] if preprocessing is not None else [])
    return {
        **kept,
        "encoder": encoder.name,
        "pretrained": encoder.pretrained,
        "weights": weights.sha256 if weights else "",
        "bundle_version": bundle_version(),
        "preprocessing": [describe(t) for t in steps],
        "network": describe(network),
        "encoder_parameters": describe(encoder),
    }


PLAIN = (str, int, float, bool, type(None))


def describe(obj: Any, depth: int = 2) -> dict[str, Any]:
    """An object's class and its plain-valued attributes (numbers, strings, and lists, tuples or dicts of them),
    and, ``depth`` levels down, the same of the MONAI transforms it holds (``Spacingd`` keeps its ``pixdim`` in a
    ``Spacing``): for a transform or the tokenizer, the parameters it was built with."""
    from monai.transforms import Transform

    def plain(value: Any) -> bool:
        if isinstance(value, PLAIN):
            return True
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        return False

    attributes = {}
    for key, value in sorted(vars(obj).items()):
        if key.startswith("_"):  # private state (module hooks, caches), not parameters
            continue
        if plain(value):
            attributes[key] = value
        elif depth > 0 and isinstance(value, Transform):
            attributes[key] = describe(value, depth - 1)
    return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", **attributes}


class TokenCache:
    """What the encoding pass keeps of each subject (tokens, token validity, geometry), stored under ``cache_dir``.

    Args:
        cache_dir: folder of the cache; ``None`` or ``""`` disables caching.
        fingerprint: JSON-serialisable description of everything that shapes the tokens, or a function that
            returns it: it is computed at the first look-up, when the backbone's weights have been loaded.
        validate: what makes an entry of this run unusable (wrong shape, NaN tokens), or ``None``: such an entry,
            like an unreadable one, is a miss, so the subject is encoded again.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike | None = None,
        fingerprint: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        validate: Callable[[Mapping[str, Any]], str | None] | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._fingerprint = fingerprint if fingerprint is not None else {}
        self._key_of_settings = ""
        self.validate = validate
        self.failure = ""  # why the cache turned itself off during this run
        self._digests: dict[tuple[str, int, int], str] = {}

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the fingerprint (with the cache format), computed once."""
        if not self._key_of_settings:
            described = self._fingerprint() if callable(self._fingerprint) else self._fingerprint
            blob = json.dumps({"format": FORMAT_VERSION, **described}, sort_keys=True, default=str)
            self._key_of_settings = hashlib.sha256(blob.encode()).hexdigest()
        return self._key_of_settings

    @property
    def enabled(self) -> bool:
        return self.cache_dir is not None and not self.failure

    def _disable(self, err: OSError) -> None:
        """The cache is an optimisation: when its folder cannot be used the run goes on without it (one warning)."""
        self.failure = f"{self.cache_dir}: {err.strerror or err}"
        logger.warning("token cache off for the rest of this run: %s", self.failure)

    def input_digests(self, subject: Mapping[str, str]) -> dict[str, str]:
        """SHA-256 of the subject's image and mask; each file version is hashed once per run (the writing pass
        and the cache key both need them)."""
        digests = {}
        for k in ("image", "mask"):
            if subject.get(k):
                stat = os.stat(subject[k])
                version = (str(subject[k]), stat.st_size, stat.st_mtime_ns)
                if version not in self._digests:
                    self._digests[version] = file_digest(subject[k])
                digests[k] = self._digests[version]
        return digests

    def key(self, subject: Mapping[str, str]) -> str:
        parts = [self.fingerprint, *self.input_digests(subject).values()]
        return hashlib.sha256("/".join(parts).encode()).hexdigest()

    def path(self, subject: Mapping[str, str]) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{subject['subject']}-{self.key(subject)[:32]}.pt"

    def load(self, subject: Mapping[str, str]) -> dict[str, Any] | None:
        """The cached entry (``tokens``, ``valid``, ``geometry``, ...) of ``subject``, or ``None``."""
        if not self.enabled:
            return None
        path = self.path(subject)
        try:
            found = path.is_file()
        except OSError as err:
            self._disable(err)
            return None
        if not found:
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            problem = (
                "not a dictionary" if not isinstance(entry, dict) else self.validate(entry) if self.validate else None
            )
        except Exception as err:  # a damaged entry is a miss, not a failure
            problem = f"unreadable ({err})"
        if problem:
            logger.warning("ignoring token cache entry %s: %s", path, problem)
            return None
        return entry

    def save(self, subject: Mapping[str, str], entry: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with atomic_path(self.path(subject)) as tmp:
                torch.save(dict(entry), tmp)
        except OSError as err:
            self._disable(err)


def entry_problem(entry: Mapping[str, Any], network: Any) -> str | None:
    """What makes an entry (an encoded subject) unusable by ``network``'s run, or ``None``: tokens of another width
    or grid, NaN or infinite tokens, no geometry for the writing pass."""
    tokens, valid, geometry = entry.get("tokens"), entry.get("valid"), entry.get("geometry")
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 4 or tokens.shape[0] != network.out_channels:
        return f"tokens of shape {tuple(getattr(tokens, 'shape', ()))}, expected ({network.out_channels}, d, h, w)"
    if not isinstance(geometry, Mapping) or not {"image_meta", "image_operations", "mask", "foreground"} <= set(
        geometry
    ):
        return "no geometry for the writing pass"
    expected = network.token_grid([int(n) for n in geometry["mask"]["shape"][1:]])
    if tuple(tokens.shape[1:]) != expected:
        return f"a token grid of {tuple(tokens.shape[1:])}, expected {expected}"
    if not isinstance(valid, torch.Tensor) or tuple(valid.shape) != expected:
        return f"a validity grid of {tuple(getattr(valid, 'shape', ()))}, expected {expected}"
    if not bool(torch.isfinite(tokens).all()) or not all(bool(torch.isfinite(f).all()) for f in entry.get("fine", [])):
        return "NaN or infinite tokens"
    return None


def run_token_cache(
    cache_dir: str | os.PathLike | None, settings: Mapping[str, Any], network: Any, preprocessing: Any = None
) -> TokenCache:
    """The token cache of a bundle run: keyed by ``token_fingerprint`` (computed at the first look-up, once the
    backbone's weights are loaded), entries checked by ``entry_problem`` against the run's network."""
    return TokenCache(
        cache_dir,
        fingerprint=lambda: token_fingerprint(settings, network, preprocessing),
        validate=functools.partial(entry_problem, network=network),
    )
