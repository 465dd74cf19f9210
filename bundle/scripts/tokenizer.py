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
from .values import as_bool

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
        proj_dim: output channels per group. Feature maps of another width are mapped to
            ``C = min(proj_dim, widest map)`` channels by a fixed Gaussian random projection (distances are
            preserved in expectation); a map exactly ``C`` wide is kept as it is (e.g. 16 raw intensities).
        seed: seed of the projection matrices.
        slice_batch: slices per encoder call; bounds activation memory.
        amp: run the encoder under bfloat16 autocast (on CUDA this is the fast path; on CPU it works too).
        fine_depth: slices pooled into a fine token (coarse-to-fine tokenization), or ``None`` for coarse
            tokens only. Must divide ``slice_depth``; fine tokens come from the same encoder pass.
        skip_background: with a ``foreground`` given to ``tokenize`` and an encoder that can
            (``encoder.skips_background``, the ViTs), leave the patches without a foreground pixel out of the
            encoder; they get the features of a blank slice.
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
        fine_depth: int | None = None,
        skip_background: bool = False,
    ) -> None:
        super().__init__()
        if slice_depth != encoder.patch_size:
            raise ValueError(
                f"slice_depth ({slice_depth}) must equal the backbone patch size ({encoder.patch_size}) so that all "
                "axes produce the same token grid"
            )
        if not axes or any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"axes must be distinct values from (0, 1, 2), got {axes}")
        if fine_depth is not None and (fine_depth < 1 or slice_depth % fine_depth):
            raise ValueError(f"fine_depth ({fine_depth}) must divide slice_depth ({slice_depth})")
        self.fine_depth = fine_depth
        self.encoder = encoder
        self.axes = tuple(int(a) for a in axes)
        self.slice_depth = slice_depth
        self.slice_batch = slice_batch
        self.amp = as_bool(amp, "amp")
        self.skip_background = as_bool(skip_background, "skip_background")
        widths = [int(w) for w in encoder.out_dims] * len(self.axes)  # per (axis, output) group
        self.channels = min(max(widths), proj_dim)
        self.num_groups = len(widths)
        generator = torch.Generator().manual_seed(seed)
        # one seeded Gaussian matrix per group, drawn in group order, kept in one zero-padded (G, widest, C) buffer;
        # a group exactly C wide is not projected
        self.widths = widths
        self.projected = [w != self.channels for w in widths]
        projection = torch.zeros(self.num_groups, max(widths), self.channels)
        for g, w in enumerate(widths):
            if self.projected[g]:
                projection[g, :w] = torch.randn(w, self.channels, generator=generator) / self.channels**0.5
        self.register_buffer("projection", projection if any(self.projected) else torch.empty(0), persistent=False)
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
        return self.tokenize(volume)["tokens"]

    @torch.inference_mode()
    def tokenize(
        self, volume: torch.Tensor, foreground: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Coarse tokens ``tokens`` and, with ``fine_depth``, ``fine``: one ``(B, L * C, *grid_a)`` per axis,
        where ``grid_a`` is the coarse grid with axis a made ``slice_depth / fine_depth`` times finer.

        ``foreground``, a bool ``(B, 1, D, H, W)`` like ``volume``, is used with ``skip_background`` only."""
        if volume.ndim != 5 or volume.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, D, H, W) volume, got shape {tuple(volume.shape)}")
        if foreground is not None and foreground.shape != volume.shape:
            raise ValueError(f"foreground of shape {tuple(foreground.shape)} for a volume of {tuple(volume.shape)}")
        self.token_grid(volume.shape[2:])
        skipping = self.skip_background and foreground is not None and self.encoder.skips_background
        per_volume = [self._tokenize(v[0], foreground[b, 0] if skipping else None) for b, v in enumerate(volume)]
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {"tokens": torch.stack([t for t, _ in per_volume])}
        if self.fine_depth is not None:
            out["fine"] = [torch.stack([f[a] for _, f in per_volume]) for a in range(len(self.axes))]
        return out

    def _tokenize(
        self, volume: torch.Tensor, foreground: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        coarse, fine = [], []
        for a, axis in enumerate(self.axes):
            slices = volume.movedim(axis, 0).unsqueeze(1).float()  # (S, 1, h, w)
            fg = None if foreground is None else foreground.movedim(axis, 0).unsqueeze(1).bool()
            per_block = self._encode_slices(slices, group_offset=a * self.encoder.num_outputs, foreground=fg)
            coarse += [self._pool(feats, self.slice_depth, axis) for feats in per_block]
            if self.fine_depth is not None:
                fine.append(torch.cat([self._pool(feats, self.fine_depth, axis) for feats in per_block]))
        return torch.cat(coarse, dim=0), fine

    @staticmethod
    def _pool(feats: torch.Tensor, depth: int, axis: int) -> torch.Tensor:
        """Average ``depth`` neighbouring slices of ``(S, C, h, w)`` features; slice axis back in its place."""
        pooled = F.avg_pool1d(feats.permute(1, 2, 3, 0).flatten(0, 2).unsqueeze(1), depth)  # (C*h*w, 1, S/depth)
        pooled = pooled.view(*feats.shape[1:], -1).permute(0, 3, 1, 2)  # (C, S/depth, h, w)
        return pooled.movedim(1, 1 + axis)

    def _encode_slices(
        self, slices: torch.Tensor, group_offset: int, foreground: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Encode in batches; normalise and project each batch at once so only C-wide features are kept."""
        chunks: list[list[torch.Tensor]] = [[] for _ in range(self.encoder.num_outputs)]
        device_type = slices.device.type
        for start in range(0, slices.shape[0], self.slice_batch):
            batch = slices[start : start + self.slice_batch]
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.amp):
                if foreground is None:
                    maps = self.encoder(batch)
                else:
                    maps = self.encoder(batch, foreground=foreground[start : start + self.slice_batch])
            for b, fmap in enumerate(maps):
                fmap = fmap.float()
                if self.encoder.normalize:
                    fmap = F.normalize(fmap, dim=1)
                g = group_offset + b
                if self.projected[g]:
                    fmap = torch.einsum("sehw,ec->schw", fmap, self.projection[g, : self.widths[g]])
                chunks[b].append(fmap)
        return [torch.cat(c) for c in chunks]
