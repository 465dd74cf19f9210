"""What the writing pass needs of a preprocessed subject, kept from the encoding pass.

A subject is preprocessed once. As soon as it is encoded its volume is dropped, and what mapping the token scores
back needs is kept instead (and stored with the tokens in the token cache): the preprocessed image's metadata and
transform history (what ``Invertd`` reads), the mask on the common grid, and the foreground in the input's own
space. So the writing pass never loads, preprocesses or registers a subject again.

Metadata and transform records hold numpy arrays and MONAI's string enums, which a cache file loaded with
``torch.load(weights_only=True)`` may not contain: ``storable`` writes them as plain values and ``restored`` turns
them back. Transform ids are reset (``reset_ops_id``): they name objects of the process that made them.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import reset_ops_id

__all__ = ["keep_geometry", "writing_input", "storable", "restored"]

_ARRAY, _ENUM = "__ndarray__", "__enum__"


def keep_geometry(
    data: Mapping[str, Any], image_key: str = "image", mask_key: str = "mask", foreground_key: str = "foreground"
) -> dict[str, Any]:
    """The geometry of a preprocessed subject: ``data`` holds the image and mask on the common grid (with their
    transform history) and the foreground in the input's own space."""
    image = data[image_key]
    return {
        "image_meta": storable(dict(image.meta)),
        "image_operations": storable(reset_ops_id(list(image.applied_operations))),
        "mask": _pack(data[mask_key]),
        "foreground": _pack(data[foreground_key]),
    }


def writing_input(
    geometry: Mapping[str, Any], image_key: str = "image", mask_key: str = "mask", foreground_key: str = "foreground"
) -> dict[str, Any]:
    """The data dictionary the postprocessing starts from: the common-grid ``image`` (its history and metadata; its
    voxels are not kept and read as zero), the common-grid ``mask`` and the input-space ``foreground``."""
    mask = _unpack(geometry["mask"])
    image = MetaTensor(
        torch.zeros(()).expand(mask.shape),
        meta=restored(geometry["image_meta"]),
        applied_operations=restored(geometry["image_operations"]),
    )
    return {image_key: image, mask_key: mask, foreground_key: _unpack(geometry["foreground"])}


def _pack(mask: torch.Tensor) -> dict[str, Any]:
    """A binary volume in an eighth of its bytes."""
    values = (mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)).cpu().numpy() > 0.5
    return {"bits": torch.from_numpy(np.packbits(values, axis=None)), "shape": tuple(values.shape)}


def _unpack(packed: Mapping[str, Any]) -> torch.Tensor:
    shape = tuple(int(s) for s in packed["shape"])
    bits = np.unpackbits(packed["bits"].numpy(), count=int(np.prod(shape)))
    return torch.from_numpy(bits.reshape(shape).astype(np.float32))


def storable(value: Any) -> Any:
    """``value`` with numpy arrays and scalars and enums written as plain dictionaries (see the module doc)."""
    if isinstance(value, Mapping):  # keys may be MONAI's string enums, equal to their text
        return {(k.value if isinstance(k, enum.Enum) else k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [storable(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        return {_ARRAY: array.tolist(), "dtype": array.dtype.str, "shape": list(array.shape)}
    if isinstance(value, enum.Enum):
        return {_ENUM: f"{type(value).__module__}:{type(value).__qualname__}", "value": value.value}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot keep a {type(value).__name__} in the token cache")


def restored(value: Any) -> Any:
    """The inverse of ``storable``; only MONAI's own enums are looked up by name."""
    if isinstance(value, Mapping):
        if _ARRAY in value:
            return np.asarray(value[_ARRAY], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
        if _ENUM in value:
            module, name = str(value[_ENUM]).split(":")
            if not module.startswith("monai."):
                raise ValueError(f"refusing to restore the enum {module}.{name} from the token cache")
            return getattr(importlib.import_module(module), name)(value["value"])
        return {k: restored(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [restored(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value
