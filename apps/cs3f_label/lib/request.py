"""One ``anomaly`` request, as the app resolves it: the client's output options checked (400 otherwise), the
study's references, their bank and the study's tokens, and the identity of its answer. Errors carry the HTTP
status they deserve, so that every failure's reason reaches the viewer."""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from lib.bundle_config import parse_value

DEFAULT_MIN_REFERENCE = 2  # with the study itself, the 3 subjects cross-subject scoring needs
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


def safe_name(image_id: str) -> str:
    """A file-name-safe subject name for an image id (ids of DICOMweb or uploads may hold any character)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", image_id) or "study"
    return name if name == image_id else f"{name}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: report them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def min_reference(value: Any) -> int:
    """The fewest usable reference studies a request accepts, from ``--conf`` or a request parameter."""
    count = int(parse_value(value))
    if count < DEFAULT_MIN_REFERENCE:
        raise ValueError(
            f"min_reference must be >= {DEFAULT_MIN_REFERENCE} (cross-subject scoring needs 3 studies), got {count}"
        )
    return count


@dataclass
class Request:
    """One study's request, resolved: validated output options, its references and their bank, the study encoded."""

    image_id: str
    image_path: str
    heatmap: bool
    extension: str
    dtype: str
    compress: bool
    rule: str = ""  # how the references were chosen, in words
    references: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    query: Any = None  # the study, encoded (``scripts.engines.Encoded``)
    bank: Any = None  # ``scripts.bank.ReferenceBank`` of the references
    bank_source: str = ""  # "memory", "disk" or "built"
    from_cache: list[str] = field(default_factory=list)
    encoded: list[str] = field(default_factory=list)
    min_reference: int = DEFAULT_MIN_REFERENCE
    members: dict[str, str] = field(default_factory=dict)  # subject name -> image id
    cohort: list[dict[str, str]] = field(default_factory=list)  # the study, then its references: subject and image
    key: str = ""  # identity of the answer: study, references, settings, output options
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_params(cls, image_id: str, image_path: str, params: dict[str, Any], default_min_reference: int) -> Request:
        """The request of ``image_id`` with the client's output options and ``min_reference`` checked."""
        try:
            heatmap = parse_value(params.get("heatmap", False))
            if not isinstance(heatmap, bool):
                raise ValueError(f"heatmap must be true or false, got {params.get('heatmap')!r}")
            ext = str(params.get("result_extension") or ".nii.gz")
            ext = ext if ext.startswith(".") else f".{ext}"
            if ext.lower() not in RESULT_EXTENSIONS:
                raise ValueError(f"result_extension must be one of {RESULT_EXTENSIONS}, got {ext!r}")
            dtype = "float32" if heatmap else str(params.get("result_dtype") or "uint8")
            if dtype not in RESULT_DTYPES:
                raise ValueError(f"result_dtype must be one of {RESULT_DTYPES}, got {params.get('result_dtype')!r}")
            compress = parse_value(params.get("result_compress", False))
            fewest = min_reference(params.get("min_reference", default_min_reference))
        except (TypeError, ValueError) as err:
            raise CS3FError(400, f"bad request parameter: {err}") from err
        return cls(image_id, image_path, heatmap, ext, dtype, bool(compress), min_reference=fewest)
