"""The network: a frozen 2D encoder turned into a 3D tokenizer by slicing along the anatomical axes.

For each axis, every slice goes through the 2D encoder in batches; the patch features of each selected
block are L2-normalised (when the encoder asks for it), projected by a fixed seeded Gaussian matrix and
averaged over ``slice_depth`` neighbouring slices. A token therefore describes a ``slice_depth`` x patch x
patch block of the volume, and the tokens of all axes are laid out in one common (D, H, W) frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import SliceEncoder

__all__ = ["MultiAxisTokenizer"]


class MultiAxisTokenizer(nn.Module):
    """Volume ``(B, 1, D, H, W)`` -> tokens ``(B, G * C, D / k, H / p, W / p)``.

    ``G = len(axes) * encoder.num_outputs`` token groups (one per axis and block) of ``C`` channels each;
    use :meth:`groups` to view the output as ``(B, G, C, d, h, w)``. With the default ``slice_depth`` equal
    to the patch size the token grid is isotropic (16^3 for a 224^3 volume and patch 14).

    Args:
        encoder: frozen slice encoder (see ``backbones.create_backbone``).
        axes: volume axes to slice along (0, 1, 2 = D, H, W of the preprocessed RAS volume).
        slice_depth: number of neighbouring slices pooled into one token; must equal the patch size so
            every axis yields the same token grid.
        proj_dim: output channels per group; features wider than this are reduced by a fixed Gaussian
            random projection (distances are preserved in expectation), narrower ones are kept as they are.
        seed: seed of the projection matrices.
        slice_batch: slices per encoder call; bounds activation memory.
        amp: run the encoder under bfloat16 autocast (on CUDA this is the fast path; on CPU it works too).
    """

    def __init__(
        self,
        encoder: SliceEncoder,
        axes: Sequence[int] = (0, 1, 2),
        slice_depth: int = 14,
        proj_dim: int = 64,
        seed: int = 0,
        slice_batch: int = 32,
        amp: bool = False,
    ) -> None:
        super().__init__()
        if slice_depth != encoder.patch_size:
            raise ValueError(
                f"slice_depth ({slice_depth}) must equal the backbone patch size ({encoder.patch_size}) so that all "
                "axes produce the same token grid"
            )
        if not axes or any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"axes must be distinct values from (0, 1, 2), got {axes}")
        self.encoder = encoder
        self.axes = tuple(int(a) for a in axes)
        self.slice_depth = slice_depth
        self.slice_batch = slice_batch
        self.amp = amp
        width = encoder.embed_dim
        self.channels = min(width, proj_dim)
        self.num_groups = len(self.axes) * encoder.num_outputs
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(self.num_groups, width, self.channels, generator=generator) / self.channels**0.5
        self.project = width > proj_dim
        self.register_buffer("projection", projection if self.project else torch.empty(0), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def out_channels(self) -> int:
        return self.num_groups * self.channels

    def token_grid(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Token grid for a volume of ``spatial_shape`` voxels."""
        k = self.slice_depth
        for size in spatial_shape:
            if size % k:
                raise ValueError(f"volume shape {tuple(spatial_shape)} must be divisible by the token size {k}")
        return tuple(size // k for size in spatial_shape)

    def groups(self, tokens: torch.Tensor) -> torch.Tensor:
        """View ``(B, G * C, d, h, w)`` as ``(B, G, C, d, h, w)``."""
        b, _, *grid = tokens.shape
        return tokens.view(b, self.num_groups, self.channels, *grid)

    @torch.inference_mode()
    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        if volume.ndim != 5 or volume.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, D, H, W) volume, got shape {tuple(volume.shape)}")
        self.token_grid(volume.shape[2:])
        return torch.stack([self._tokenize(v[0]) for v in volume])

    def _tokenize(self, volume: torch.Tensor) -> torch.Tensor:
        outputs = []
        for a, axis in enumerate(self.axes):
            slices = volume.movedim(axis, 0).unsqueeze(1).float()  # (S, 1, h, w)
            per_block = self._encode_slices(slices, group_offset=a * self.encoder.num_outputs)
            for feats in per_block:  # (S, C, h/p, w/p)
                pooled = F.avg_pool1d(
                    feats.permute(1, 2, 3, 0).flatten(0, 2).unsqueeze(1), self.slice_depth
                )  # (C*h*w, 1, S/k)
                pooled = pooled.view(*feats.shape[1:], -1).permute(0, 3, 1, 2)  # (C, S/k, h/p, w/p)
                outputs.append(pooled.movedim(1, 1 + axis))  # slice axis back to its place in (D, H, W)
        return torch.cat(outputs, dim=0)

    def _encode_slices(self, slices: torch.Tensor, group_offset: int) -> list[torch.Tensor]:
        """Encode in batches; normalise and project each batch at once so only C-wide features are kept."""
        chunks: list[list[torch.Tensor]] = [[] for _ in range(self.encoder.num_outputs)]
        device_type = slices.device.type
        for start in range(0, slices.shape[0], self.slice_batch):
            batch = slices[start : start + self.slice_batch]
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.amp):
                maps = self.encoder(batch)
            for b, fmap in enumerate(maps):
                fmap = fmap.float()
                if self.encoder.normalize:
                    fmap = F.normalize(fmap, dim=1)
                if self.project:
                    fmap = torch.einsum("sehw,ec->schw", fmap, self.projection[group_offset + b])
                chunks[b].append(fmap)
        return [torch.cat(c) for c in chunks]
