"""Dictionary transforms that turn token scores into voxel heat maps, masks and a subject's summary.

Token scores live on the coarse token grid of the preprocessed volume; ``TokenScoresToVoxelsd`` brings
them onto the preprocessed voxel grid and hands them the image's transform history, so MONAI's
``Invertd`` can take them back to the original image space. Cohort-level values (the threshold, known only
after the whole cohort is scored) travel in the data dictionary.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform, SaveImaged

from .outputs import SUBJECT_META, top_fraction_mean, volume_ml
from .transforms import plain_tensor, with_meta_of

__all__ = [
    "upsample_scores",
    "upsample_parts",
    "TokenScoresToVoxelsd",
    "ThresholdFromKeyd",
    "SubjectSummaryd",
    "SubjectMetad",
    "in_memory",
]


def upsample_scores(scores: torch.Tensor, spatial_shape: tuple[int, ...]) -> torch.Tensor:
    """Trilinear upsampling of a ``(d, h, w)`` token score grid with NaN holes to ``spatial_shape``.

    Normalised convolution: values and validity are interpolated separately and divided, so unscored
    tokens neither spread NaN nor pull their neighbours towards zero.
    """
    num, den = upsample_parts(scores, spatial_shape)
    return torch.where(den > 1e-6, num / den.clamp(min=1e-6), 0.0)


def upsample_parts(scores: torch.Tensor, spatial_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator and weight of the normalised-convolution upsampling of a score grid with NaN holes.

    Summing the parts of several maps before dividing averages them where each has support.
    """
    valid = torch.isfinite(scores).float()[None, None]
    values = torch.nan_to_num(scores.float(), nan=0.0)[None, None]
    num = F.interpolate(values, size=tuple(spatial_shape), mode="trilinear", align_corners=False)
    den = F.interpolate(valid, size=tuple(spatial_shape), mode="trilinear", align_corners=False)
    return num[0, 0], den[0, 0]


class TokenScoresToVoxelsd(MapTransform):
    """Token score grid -> ``(1, D, H, W)`` voxel heat map on ``ref_key``'s grid, zero outside ``mask_key``.

    The result carries ``ref_key``'s metadata, so ``Invertd(orig_keys=ref_key)`` maps it back.
    """

    def __init__(self, keys: KeysCollection, ref_key: str = "image", mask_key: str = "mask") -> None:
        super().__init__(keys)
        self.ref_key = ref_key
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        ref = d[self.ref_key]
        inside = plain_tensor(d[self.mask_key])[0] > 0.5
        for key in self.key_iterator(d):
            heat = upsample_scores(plain_tensor(torch.as_tensor(d[key])).reshape(d[key].shape[-3:]), ref.shape[1:])
            d[key] = with_meta_of(ref, torch.where(inside, heat, 0.0)[None])
        return d


class ThresholdFromKeyd(MapTransform):
    """Binary mask ``output_key`` = ``keys`` >= the threshold stored under ``threshold_key``.

    The threshold is a cohort-level value known only after scoring, hence it travels in the data dict.
    """

    def __init__(
        self, keys: KeysCollection, threshold_key: str = "threshold", output_key: str = "anomaly_mask"
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError("ThresholdFromKeyd thresholds exactly one key")
        self.threshold_key = threshold_key
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        heat = d[self.keys[0]]
        # heat is exactly 0 outside the mask: never flag that, whatever the threshold
        d[self.output_key] = ((heat >= float(d[self.threshold_key])) & (heat > 0)).to(torch.uint8)
        return d


class SubjectSummaryd(MapTransform):
    """A subject's two numbers: ``subject_score``, the mean of the ``top_fraction`` highest voxel scores of ``keys``
    inside ``foreground_key`` (robust to single hot voxels), and ``lesion_volume_ml``, the volume of ``mask_key``."""

    def __init__(
        self,
        keys: KeysCollection = "anomaly",
        mask_key: str = "anomaly_mask",
        foreground_key: str = "foreground",
        top_fraction: float = 0.01,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError("SubjectSummaryd summarises exactly one heat map")
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        self.mask_key = mask_key
        self.foreground_key = foreground_key
        self.top_fraction = top_fraction

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, object]:
        d = dict(data)
        heat = d[self.keys[0]]
        inside = plain_tensor(d[self.foreground_key])[0].numpy() > 0.5
        d["subject_score"] = top_fraction_mean(plain_tensor(heat)[0].numpy()[inside], self.top_fraction)
        d["lesion_volume_ml"] = volume_ml(plain_tensor(d[self.mask_key])[0].numpy(), np.asarray(heat.affine))
        return d


class SubjectMetad(MapTransform):
    """Write the subject id (``subject_key``) into the metadata of ``keys``, for the writers to name files by."""

    def __init__(self, keys: KeysCollection, subject_key: str = "subject") -> None:
        super().__init__(keys)
        self.subject_key = subject_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key].meta[SUBJECT_META] = d[self.subject_key]
        return d


def in_memory(postprocessing: Compose) -> Compose:
    """The postprocessing without the steps that name and write files (``SubjectMetad``, ``SaveImaged``, the overview
    figure): heat map, mask and summary in memory, for a server that answers with them."""
    from .overview import SaveOverviewd

    writers = (SubjectMetad, SaveImaged, SaveOverviewd)
    return Compose([t for t in postprocessing.transforms if not isinstance(t, writers)])
