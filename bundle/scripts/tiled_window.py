"""Window matching as batched matrix products over tiles of the token grid.

Each query token needs its distance to the (2r+1)^3 reference tokens around its own position in every other
subject. Formed offset by offset (``scoring.nearest_distances_window``), that is 27 x 5 element-wise passes over the
references per block: bound by memory traffic, at a few percent of the machine's matrix-product rate. Here the
grid is cut into tiles of ``t = 2r`` positions a side. One tile of every reference (t^3 tokens each) can only be
the neighbour of the ``w = t + 2r`` positions a side around it, so one small matrix product per tile, between those
``w^3`` query tokens and the tile's tokens of all references, holds every distance the window needs (with
``|q|^2 + |r|^2 - 2 q.r``, as in global matching), at ``(w / t)^3 t^3 / (2r+1)^3`` = 2.4x the needed products for
r = 1; a fixed mask keeps the pairs inside the window, and each query position takes the minimum over the
``(w / t)^3`` tiles that saw it. ``benchmarks/perf.py --only peer`` measures both formulations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["TiledWindow", "tiled_window_bytes"]

_BYTES = 4  # float32


def _axis_layout(radius: int, size: int) -> tuple[int, int, int]:
    """``(r, t, w)`` along one axis: the radius that can reach anything (no further than the grid), the tile side and
    the side of the query region that a tile's tokens can be the neighbours of."""
    r = min(radius, size - 1)
    t = max(1, 2 * r)
    return r, t, t + 2 * r


def tiled_window_bytes(num_subjects: int, channels: int, grid: tuple[int, ...], radius: int) -> int:
    """Memory ``TiledWindow`` holds besides the tokens: the references in tile order (twice while they are laid out),
    one query's expanded tiles and the per-tile minima (the product blocks are bounded separately)."""
    layout = [_axis_layout(radius, n) for n in grid]
    padded = math.prod(math.ceil(n / t) * t for n, (_, t, _) in zip(grid, layout))
    expansion = math.prod(w / t for _, t, w in layout)
    return int(_BYTES * padded * (num_subjects * (2 * channels + 1) + expansion * (channels + 2 * num_subjects)))


class TiledWindow:
    """Window distances of every subject of a cohort to all of them, the references laid out in tiles once.

    Args:
        tokens: ``(N, C, X, Y, Z)`` tokens of the cohort, one grid.
        valid: ``(N, X, Y, Z)`` bool, which tokens may be matched.
        radius: half-width of the search window, in grid positions.
        block_bytes: bound on one block of products (a block of tiles against all references).
    """

    def __init__(self, tokens: torch.Tensor, valid: torch.Tensor, radius: int, block_bytes: int) -> None:
        n, c, *grid = tokens.shape
        self.tokens, self.grid = tokens, tuple(grid)
        self.layout = [_axis_layout(radius, size) for size in grid]
        self.tiles = tuple(math.ceil(size / t) for size, (_, t, _) in zip(grid, self.layout))
        (_, tx, _), (_, ty, _), (_, tz, _) = self.layout
        nx, ny, nz = self.tiles
        # the grid padded up to whole tiles, with invalid tokens (F.pad takes the last axis first)
        padding = (0, nz * tz - grid[2], 0, ny * ty - grid[1], 0, nx * tx - grid[0])
        channels_last = F.pad(tokens, padding).permute(0, 2, 3, 4, 1)
        ok = F.pad(valid, padding, value=False)

        def tile_order(x: torch.Tensor) -> torch.Tensor:
            """(N, PX, PY, PZ, *rest) -> (tiles, t^3 * N, *rest), the subject innermost: the minimum over a tile's
            positions then runs over contiguous rows of N values (a reduction over a short last axis is slow)."""
            rest = x.shape[4:]
            x = x.reshape(n, nx, tx, ny, ty, nz, tz, *rest).permute(1, 3, 5, 2, 4, 6, 0, *range(7, 7 + len(rest)))
            return x.reshape(nx * ny * nz, tx * ty * tz * n, *rest)

        self.refs = tile_order(channels_last)  # one contiguous copy
        self.ref_squares = tile_order(channels_last.square().sum(-1).masked_fill(~ok, math.inf))[:, None]
        near = []  # (w, t) per axis: query position a of the region and reference position d of the tile are within r
        for r, t, w in self.layout:
            offset = torch.arange(w, device=tokens.device)[:, None] - r - torch.arange(t, device=tokens.device)
            near.append(offset.abs() <= r)
        inside = near[0][:, None, None, :, None, None] & near[1][None, :, None, None, :, None]
        inside = inside & near[2][None, None, :, None, None, :]
        region, positions = math.prod(w for _, _, w in self.layout), tx * ty * tz
        mask = torch.zeros(inside.shape, device=tokens.device).masked_fill_(~inside, math.inf)
        self.mask = mask.reshape(region, positions, 1).expand(region, positions, n).reshape(1, region, positions * n)
        self.tiles_per_block = max(1, block_bytes // (region * positions * n * _BYTES))

    def distances(self, i: int) -> torch.Tensor:
        """``(N, X, Y, Z)`` distances from each token of subject ``i`` to the nearest valid token within the window
        in every subject (itself included), ``inf`` where the window holds none."""
        n, c = self.tokens.shape[:2]
        (rx, tx, wx), (ry, ty, wy), (rz, tz, wz) = self.layout
        nx, ny, nz = self.tiles
        x, y, z = self.grid
        query = self.tokens[i].permute(1, 2, 3, 0)
        query = F.pad(query, (0, 0, rz, nz * tz - z + rz, ry, ny * ty - y + ry, rx, nx * tx - x + rx))
        regions = query.unfold(0, wx, tx).unfold(1, wy, ty).unfold(2, wz, tz)  # (nx, ny, nz, C, wx, wy, wz)
        regions = regions.permute(0, 1, 2, 4, 5, 6, 3).reshape(nx * ny * nz, wx * wy * wz, c)
        tiles, region, positions = nx * ny * nz, wx * wy * wz, tx * ty * tz
        per_tile = torch.empty(tiles, region, n, device=query.device)
        buffer = torch.empty(min(tiles, self.tiles_per_block), region, positions * n, device=query.device)
        for start in range(0, tiles, self.tiles_per_block):
            block = slice(start, start + self.tiles_per_block)
            squared = buffer[: len(range(*block.indices(tiles)))]
            # |r|^2 (inf where r is invalid) + the window mask, then -2 q.r added in place by the product
            torch.add(self.ref_squares[block], self.mask, out=squared)
            squared.baddbmm_(regions[block], self.refs[block].transpose(1, 2), alpha=-2)
            torch.amin(squared.view(-1, region, positions, n), dim=2, out=per_tile[block])
        # each query position was seen by (w / t)^3 tiles: the minimum over them, on the grid padded by r
        per_tile = per_tile.view(nx, ny, nz, wx, wy, wz, n)
        out = torch.full((nx * tx + 2 * rx, ny * ty + 2 * ry, nz * tz + 2 * rz, n), math.inf, device=query.device)
        for bx in range(wx // tx):
            for by in range(wy // ty):
                for bz in range(wz // tz):
                    seen = per_tile[:, :, :, bx * tx : (bx + 1) * tx, by * ty : (by + 1) * ty, bz * tz : (bz + 1) * tz]
                    target = out[bx * tx : bx * tx + nx * tx, by * ty : by * ty + ny * ty, bz * tz : bz * tz + nz * tz]
                    target = target.view(nx, tx, ny, ty, nz, tz, n)
                    torch.minimum(target, seen.permute(0, 3, 1, 4, 2, 5, 6), out=target)
        out = out[rx : rx + x, ry : ry + y, rz : rz + z]
        out = out.add_(self.tokens[i].square().sum(0)[..., None]).clamp_(min=0).sqrt_()
        return out.permute(3, 0, 1, 2)
