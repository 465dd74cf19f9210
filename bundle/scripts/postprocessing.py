"""Dictionary transforms that turn token scores into voxel heat maps and masks.

Token scores live on the coarse token grid of the preprocessed volume; ``TokenScoresToVoxelsd`` brings
them onto the preprocessed voxel grid and hands them the image's transform history, so MONAI's
``Invertd`` can take them back to the original image space.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .transforms import plain_tensor, with_meta_of

__all__ = ["upsample_scores", "upsample_parts", "TokenScoresToVoxelsd", "ThresholdFromKeyd"]


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

    def __init__(self, keys: KeysCollection, threshold_key: str = "threshold", output_key: str = "anomaly_mask") -> None:
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
