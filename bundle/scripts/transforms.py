"""Dictionary transforms that MONAI does not ship but the CS3F preprocessing needs.

Each one does one job and names the offending file when the input is unusable, so one bad subject
can be reported and skipped by the cohort runner instead of ending the whole run.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import FillHoles, KeepLargestConnectedComponent, MapTransform
from scipy import ndimage

__all__ = [
    "CohortInputError",
    "ValidateVolumed",
    "EnsureMaskd",
    "MaskedPercentileNormalized",
    "source_name",
    "plain_tensor",
    "with_meta_of",
]


class CohortInputError(ValueError):
    """A subject's input cannot be used; the message names the file and the problem."""


def source_name(img: torch.Tensor | None, default: str = "<in-memory image>") -> str:
    """The file an image was read from, for error messages."""
    if isinstance(img, MetaTensor):
        name = img.meta.get("filename_or_obj")
        if name:
            return str(name)
    return default


class ValidateVolumed(MapTransform):
    """Check that each key holds one finite, non-constant 3D volume (channel-first, one channel).

    Catches 2D images, 4D series, NaN/inf voxels and blank files before they turn into silent garbage
    further down the pipeline.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = source_name(img)
            spatial = tuple(img.shape[1:])
            if len(spatial) != 3:
                raise CohortInputError(f"{name}: expected a 3D volume, got {len(spatial)} spatial dimensions {spatial}")
            if img.shape[0] != 1:
                raise CohortInputError(
                    f"{name}: expected one 3D volume, got {img.shape[0]} volumes (a 4D series or a multi-channel "
                    "image); extract the volume to analyse first"
                )
            if min(spatial) < 2:
                raise CohortInputError(f"{name}: a volume of shape {spatial} is not 3D")
            finite = torch.isfinite(img)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise CohortInputError(f"{name}: {bad} voxels are NaN or infinite")
            if key == self.keys[0] and float(img.max()) == float(img.min()):
                raise CohortInputError(f"{name}: the image is constant ({float(img.max())}), nothing to analyse")
        return d


class EnsureMaskd(MapTransform):
    """Make sure ``mask_key`` holds a binary foreground mask on the image grid.

    A given mask (any label > 0 counts as foreground) is checked against the image grid; without one,
    the foreground is the largest connected component above an intensity threshold, holes filled.

    Args:
        image_key: key of the channel-first image.
        mask_key: key of the mask; missing or ``None`` means "compute it from the image".
        threshold: ``"otsu"``, ``"nonzero"`` (skull-stripped images whose background is exactly 0) or an
            intensity value (for CT, e.g. -500 HU separates body from air; what a slice of the body encloses,
            such as the lungs, is filled in).
        affine_atol: tolerance, in mm, when comparing the image and mask affines.
        min_extent_mm: the foreground's bounding box must span at least this along every axis. A speck of
            foreground (a one-voxel mask, a 3x3x3 volume) would otherwise be blown up to the whole grid by the
            crop-and-resize, scored as a brain, and raise the cohort threshold for everybody else.
    """

    def __init__(
        self,
        image_key: str = "image",
        mask_key: str = "mask",
        threshold: str | float = "otsu",
        affine_atol: float = 1e-3,
        min_extent_mm: float = 0.0,
    ) -> None:
        super().__init__([image_key], allow_missing_keys=False)
        self.image_key = image_key
        self.mask_key = mask_key
        self.threshold = threshold
        self.affine_atol = affine_atol
        self.min_extent_mm = float(min_extent_mm)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = d[self.image_key]
        given = d.get(self.mask_key)
        mask = self._check_given(image, given) if given is not None else self._from_intensity(image)
        if not bool(mask.any()):
            what = source_name(given) if given is not None else f"{source_name(image)} (computed foreground)"
            raise CohortInputError(f"{what}: the mask is empty, no foreground voxels to analyse")
        self._check_extent(image, given, mask)
        d[self.mask_key] = with_meta_of(image, mask.to(torch.float32))
        return d

    def _check_extent(self, image: torch.Tensor, given: torch.Tensor | None, mask: torch.Tensor) -> None:
        voxel_mm = image.pixdim[:3].tolist() if isinstance(image, MetaTensor) else [1.0] * 3
        extent = []
        for axis, size in enumerate(voxel_mm):
            hit = torch.nonzero(mask[0].movedim(axis, 0).flatten(1).any(1)).flatten()  # slices holding foreground
            extent.append(float(hit[-1] - hit[0] + 1) * abs(float(size)))
        if min(extent) < self.min_extent_mm:
            what = source_name(given) if given is not None else f"{source_name(image)} (computed foreground)"
            raise CohortInputError(
                f"{what}: the foreground spans only {' x '.join(f'{e:g}' for e in extent)} mm; at least "
                f"{self.min_extent_mm:g} mm along every axis is needed (min_foreground_extent_mm)"
            )

    def _check_given(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.shape[1:] != image.shape[1:]:
            raise CohortInputError(
                f"{source_name(mask)}: mask grid {tuple(mask.shape[1:])} does not match image grid "
                f"{tuple(image.shape[1:])} of {source_name(image)}"
            )
        if isinstance(mask, MetaTensor) and isinstance(image, MetaTensor):
            if not torch.allclose(mask.affine.double(), image.affine.double(), atol=self.affine_atol):
                raise CohortInputError(
                    f"{source_name(mask)}: mask affine differs from the affine of {source_name(image)}; "
                    "the mask must be on the image's grid"
                )
        return plain_tensor(mask) > 0

    def _from_intensity(self, image: torch.Tensor) -> torch.Tensor:
        values = plain_tensor(image)
        if self.threshold == "nonzero":  # skull-stripped data: the brain is wherever the image is not 0
            mask = values != 0
        elif self.threshold == "otsu":
            from skimage.filters import threshold_otsu

            mask = values > float(threshold_otsu(values.numpy().astype(np.float32)))
        else:
            mask = values > float(self.threshold)
        mask = KeepLargestConnectedComponent(applied_labels=1)(mask.to(torch.uint8))
        mask = torch.as_tensor(FillHoles(applied_labels=1)(mask)) > 0
        if not isinstance(self.threshold, str):
            mask = _fill_holes_slice_by_slice(mask)
        return mask


def _fill_holes_slice_by_slice(mask: torch.Tensor) -> torch.Tensor:
    """Fill what each 2D slice encloses, along every axis: a CT body mask must hold the lungs, which the airway
    opens to the outside of the field of view in 3D (so a 3D fill leaves them out) but every axial slice encloses."""
    volume = mask[0].numpy()
    filled = volume.copy()
    for axis in range(3):
        in_plane = ndimage.generate_binary_structure(3, 1)
        in_plane[tuple(slice(None) if a != axis else [0, 2] for a in range(3))] = False  # no link across slices
        filled |= ndimage.binary_fill_holes(volume, structure=in_plane)
    return torch.from_numpy(filled)[None]


class MaskedPercentileNormalized(MapTransform):
    """Map intensities so the ``lower``..``upper`` percentiles inside the mask become 0..1, clipped; 0 outside.

    Percentiles inside the mask make cohorts with different scanners, gains and field of view comparable
    without letting the background decide the scale.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "mask",
        lower: float = 0.5,
        upper: float = 99.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.mask_key = mask_key
        self.lower = lower
        self.upper = upper

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        inside = plain_tensor(d[self.mask_key]) > 0.5
        for key in self.key_iterator(d):
            img = d[key]
            values = plain_tensor(img)[inside].float()
            # quantile() has an input size limit; a regular subsample keeps it exact enough and fast
            values = values[:: max(1, values.numel() // 4_000_000)]
            lo, hi = torch.quantile(values, torch.tensor([self.lower, self.upper]) / 100).tolist()
            scale = hi - lo if hi > lo else 1.0
            normalized = torch.where(inside, ((plain_tensor(img) - lo) / scale).clamp(0, 1), 0.0)
            d[key] = with_meta_of(img, normalized)
        return d


def plain_tensor(img: torch.Tensor) -> torch.Tensor:
    """The tensor without MONAI metadata, so arithmetic cannot mix up metadata of different keys."""
    return img.as_tensor() if isinstance(img, MetaTensor) else img


def with_meta_of(reference: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` carrying ``reference``'s metadata and transform history (needed by ``Invertd``)."""
    if isinstance(reference, MetaTensor):
        return MetaTensor(values, meta=dict(reference.meta), applied_operations=list(reference.applied_operations))
    return values
