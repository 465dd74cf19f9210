"""A ViT run on the foreground patches of a batch of slices only.

Cropped to its brain mask and resized, a BraTS volume still has 42.5 % of the patches of its slices entirely
outside the mask: the corners of every slice (measured by ``benchmarks/encoder_precision.py``). Those patches are
dropped from the ViT's token sequence (as MAE drops masked patches): each slice's foreground patches are packed
first, the batch is padded to its longest slice, and the padding is hidden from attention by a key mask. A
skipped patch gets the features a blank slice has at its place: the scoring never uses a token that is mostly
background (``min_token_coverage``), and pooled tokens at the border only need a background-like value there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["patches_with_foreground", "forward_foreground_patches"]


def patches_with_foreground(foreground: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(S, 1, H, W)`` foreground -> ``(S, H/p * W/p)`` bool: which patches hold at least one foreground pixel."""
    s, _, h, w = foreground.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"slices of {h}x{w} pixels are not whole {patch_size}-pixel patches")
    per_patch = foreground[:, 0].reshape(s, h // patch_size, patch_size, w // patch_size, patch_size)
    return per_patch.any(dim=4).any(dim=2).flatten(1)


def forward_foreground_patches(
    model: nn.Module, images: torch.Tensor, keep: torch.Tensor, blocks: Sequence[int], fill: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The patch tokens of ``blocks`` of a timm ViT, as ``(S, C, h, w)`` maps, computing only the ``keep`` patches.

    Args:
        model: a timm ``VisionTransformer`` (``patch_embed``, ``_pos_embed``, ``norm_pre``, ``blocks``).
        images: its input, ``(S, 3, H, W)``.
        keep: ``(S, h * w)`` bool, the patches to compute (see ``patches_with_foreground``).
        blocks: indices of the blocks whose output is returned, in increasing order.
        fill: one ``(1, C, h, w)`` map per block: the features given to the patches that are not computed.
    """
    s, hw = keep.shape
    counts = keep.sum(dim=1)
    longest = int(counts.max())
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))  # (S, prefix + h*w, C), positions added
    prefix = model.num_prefix_tokens
    width = tokens.shape[-1]
    # kept patches first, in raster order (a stable sort of "is skipped"), then as many skipped ones as padding
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :longest]
    real = torch.arange(longest, device=keep.device) < counts[:, None]  # (S, longest): a kept patch, not padding
    x = torch.cat([tokens[:, :prefix], tokens[:, prefix:].gather(1, order[..., None].expand(-1, -1, width))], dim=1)
    attend = torch.cat([real.new_ones(s, prefix), real], dim=1)[:, None, None, :]  # padding is never a key
    taken = []
    for i, block in enumerate(model.blocks[: max(blocks) + 1]):
        x = block(x, attn_mask=attend)
        if i in blocks:
            taken.append(x[:, prefix:])
    # padding rows are written to a spare column past the end, which is then dropped
    target = torch.where(real, order, hw)[..., None]
    maps = []
    for y, blank in zip(taken, fill):
        c = y.shape[-1]
        out = blank.flatten(2).transpose(1, 2).to(y.dtype).expand(s, -1, -1)
        out = torch.cat([out, out[:, :1]], dim=1).scatter(1, target.expand(-1, -1, c), y)
        h, w = blank.shape[-2:]
        maps.append(out[:, :hw].reshape(s, h, w, c).permute(0, 3, 1, 2).contiguous())
    return maps
