"""Window matching as batched matrix products over tiles of the token grid, each pair of subjects once.

Each query token needs its distance to the (2r+1)^3 reference tokens around its own position in every other
subject. Formed offset by offset (``scoring.nearest_distances_window``), that is 27 x 5 element-wise passes over the
references per block: bound by memory traffic, at a few percent of the machine's matrix-product rate. Here the
grid is cut into tiles of ``t = 2r`` positions a side. One tile of a reference (t^3 tokens) can only be the neighbour
of the ``w = t + 2r`` positions a side around it, so one small matrix product per tile, between the tile's tokens of
the references and those ``w^3`` query tokens, holds every distance the window needs (with
``|q|^2 + |r|^2 - 2 q.r``, as in global matching), at ``(w / t)^3 t^3 / (2r+1)^3`` = 2.4x the needed products for
r = 1; a fixed mask keeps the pairs inside the window.

The same products answer both directions: the minimum over a tile's positions is the query's distance to that
reference (each query position is seen by ``(w / t)^3`` tiles, whose minima are merged), and the minimum over the
query region is the reference token's distance to the query, exact within one tile. A whole cohort is therefore
scored with each pair once (``pair_rows.each_pair_once``). ``benchmarks/perf.py --only peer`` measures it.

The references are laid out once, channels-last in tile order: one transposing copy per subject (the tokens arrive
channels-first), on the scoring's workers. A query's regions are then whole rows of that layout, gathered with one
``index_select``; positions outside the grid read one extra row of zeros with an infinite norm.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .pair_rows import each_pair_once, held_bytes
from .threads import MapInOrder

__all__ = ["TiledWindow", "tiled_window_bytes", "tiled_window_flops", "window_neighbours"]

_BYTES = 4  # float32


def _axis_layout(radius: int, size: int) -> tuple[int, int, int]:
    """``(r, t, w)`` along one axis: the radius that can reach anything (no further than the grid), the tile side and
    the side of the query region that a tile's tokens can be the neighbours of."""
    r = min(radius, size - 1)
    t = max(1, 2 * r)
    return r, t, t + 2 * r


def _padded_positions(grid: tuple[int, ...], layout: list[tuple[int, int, int]]) -> int:
    """Token positions of the grid padded up to whole tiles."""
    return math.prod(math.ceil(n / t) * t for n, (_, t, _) in zip(grid, layout))


def tiled_window_bytes(num_subjects: int, channels: int, grid: tuple[int, ...], radius: int, ahead: int = 0) -> int:
    """Memory ``TiledWindow`` holds besides the tokens: the references in tile order with their squared norms, then
    per call running at once (one, or one per worker when ``ahead`` calls may run ahead of the one in hand) the larger
    of a subject being laid out (a channels-last copy and a squared temporary) and a query being compared (its regions
    and per-tile minima), the row indices (int64), and the distances held back between pairs (the product blocks are
    bounded separately). Laying out ends before comparing begins."""
    layout = [_axis_layout(radius, n) for n in grid]
    padded = _padded_positions(grid, layout)
    expansion = math.prod(w / t for _, t, w in layout)
    running = max(1, ahead)
    per_call = max(2 * channels + 1, expansion * (channels + 1 + num_subjects))
    laid_out = num_subjects * (channels + 1) + running * per_call
    indices = 2 + 2.25 * expansion + running * 4 * expansion  # int64 rows of the grid, of the regions, per query
    return int(_BYTES * padded * (laid_out + indices)) + held_bytes(num_subjects, padded, _BYTES, ahead)


def window_neighbours(grid: tuple[int, ...], radius: int) -> int:
    """Positions a token's window holds: ``(2r+1)`` a side, fewer along an axis the grid has no room for (a grid one
    token thick, ``37 x 37 x 1``, has 9 for r = 1, not 27)."""
    return math.prod(2 * r + 1 for r, _, _ in (_axis_layout(radius, n) for n in grid))


def tiled_window_flops(channels: int, grid: tuple[int, ...], radius: int) -> int:
    """Floating-point operations of one pair's products (each reference position against its query region): what
    the padded tiles cost, against ``2 C window_neighbours`` per token for the window alone."""
    layout = [_axis_layout(radius, n) for n in grid]
    return 2 * channels * _padded_positions(grid, layout) * math.prod(w for _, _, w in layout)


class TiledWindow:
    """Window distances between the subjects of a cohort, the references laid out in tiles once.

    Args:
        tokens: ``(N, C, X, Y, Z)`` tokens of the cohort, one grid.
        valid: ``(N, X, Y, Z)`` bool, which tokens may be matched.
        radius: half-width of the search window, in grid positions.
        block_bytes: bound on one block of products (a block of tiles against the references of one pass).
        map_in_order: how the subjects are laid out (``map``, or the scoring's workers: ``threads``).
    """

    def __init__(
        self, tokens: torch.Tensor, valid: torch.Tensor, radius: int, block_bytes: int, map_in_order: MapInOrder = map
    ) -> None:
        n, c, *grid = tokens.shape
        self.tokens, self.valid, self.grid, self.block_bytes = tokens, valid, tuple(grid), block_bytes
        self.layout = [_axis_layout(radius, size) for size in grid]
        self.tiles = tuple(math.ceil(size / t) for size, (_, t, _) in zip(grid, self.layout))
        # a query region is w / t (1 or 2) tiles a side: the query's tiles at these shifts from the reference tile
        self.shifts = list(itertools.product(*(range(w // t) for _, t, w in self.layout)))
        self.positions = math.prod(t for _, t, _ in self.layout)  # t^3, the tokens of one tile
        rows = math.prod(self.tiles) * n * self.positions
        whole_tiles = rows == n * math.prod(grid)
        # (tiles, N, t^3, C) rows, a run of subjects one matrix per tile, then one more row: outside the grid (and in
        # the padding up to whole tiles), zero tokens with infinite norms, nobody's match
        self._grid_rows = self._rows_of_grid()
        self._rows = (torch.empty if whole_tiles else torch.zeros)(rows + 1, c, device=tokens.device)
        self._rows[rows] = 0.0
        self._row_squares = torch.full((rows + 1,), math.inf, device=tokens.device)
        for _ in map_in_order(self._lay_out, range(n)):
            pass
        self.refs = self._rows[:rows].view(-1, n, self.positions, c)
        self.ref_squares = self._row_squares[:rows].view(-1, n, self.positions)
        # a query's regions are gathered from its own rows: which rows (of subject 0); outside the grid, the last row
        region_rows = self._region_rows().flatten()
        self._region_index = region_rows.masked_fill(region_rows < 0, rows)
        self._region_inside = region_rows >= 0  # subject i's rows are i t^3 further, the last row stays
        # inf where reference position d of a tile and query position (shift, e) of its region are further than r
        near = []
        for r, t, w in self.layout:
            offset = torch.arange(w, device=tokens.device) - r - torch.arange(t, device=tokens.device)[:, None]
            near.append((offset.abs() <= r).view(t, w // t, t))  # (d, shift, e)
        inside = (
            near[0][:, None, None, :, None, None, :, None, None] & near[1][None, :, None, None, :, None, None, :, None]
        )
        inside = inside & near[2][None, None, :, None, None, :, None, None, :]  # (d, shift, e) per axis, interleaved
        self.outside = torch.zeros(inside.shape, device=tokens.device).masked_fill_(~inside, math.inf)
        self.outside = self.outside.view(self.positions, len(self.shifts), self.positions)

    def _rows_of_grid(self) -> torch.Tensor:
        """``(X, Y, Z)`` long: the row of each grid position of subject 0 in the references, ``(tiles * N * t^3)``
        (subject i's are ``i t^3`` further)."""
        n, positions = self.tokens.shape[0], self.positions
        padded = [count * t for count, (_, t, _) in zip(self.tiles, self.layout)]
        at_spot = self._tile_order(torch.arange(math.prod(padded), device=self.tokens.device).view(1, *padded))
        spot = torch.arange(at_spot.numel(), device=self.tokens.device)  # tile * t^3 + position in the tile
        rows = torch.empty_like(spot)
        rows[at_spot.flatten()] = spot // positions * n * positions + spot % positions
        x, y, z = self.grid
        return rows.view(padded)[:x, :y, :z]

    def _lay_out(self, i: int) -> None:
        """Subject ``i``'s tokens and squared norms into its rows of the references: one transposing copy, then whole
        rows (torch's blocked 2D transpose moves 2-3 GB/s on one of these cores, a strided copy of the 5D tokens 1)."""
        c = self.tokens.shape[1]
        rows = self._grid_rows.flatten() + i * self.positions
        channels_last = self.tokens[i].reshape(c, -1).T.contiguous()
        self._rows.index_copy_(0, rows, channels_last)
        squares = self.tokens[i].square().sum(0).masked_fill_(~self.valid[i], math.inf)
        self._row_squares.index_copy_(0, rows, squares.flatten())

    def _region_rows(self) -> torch.Tensor:
        """``(tiles, shifts, t^3)`` long: the reference row (of subject 0) of each query token of each tile's region,
        -1 outside the grid. The query grid is padded by r in front, so that a region is whole tiles of it."""
        extra = [0, 0, 0, 0, 0, 0]
        for axis, (size, (r, t, w), count) in enumerate(zip(self.grid, self.layout, self.tiles)):
            extra[5 - 2 * axis - 1 : 6 - 2 * axis] = [r, (count + w // t - 1) * t - size - r]
        padded = F.pad(self._grid_rows, extra, value=-1)
        return self._around_tiles(self._tile_order(padded[None])[..., 0, :])

    def _tile_order(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, PX, PY, PZ, *rest)``, ``P = tiles * t`` -> ``(tiles_x, tiles_y, tiles_z, N, t^3, *rest)``."""
        (_, tx, _), (_, ty, _), (_, tz, _) = self.layout
        n, px, py, pz, *rest = x.shape
        x = x.reshape(n, px // tx, tx, py // ty, ty, pz // tz, tz, *rest)
        x = x.permute(1, 3, 5, 0, 2, 4, 6, *range(7, 7 + len(rest)))
        return x.reshape(px // tx, py // ty, pz // tz, n, tx * ty * tz, *rest)

    def _regions(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Subject ``i``'s tokens around each tile, ``(tiles, shifts * t^3, C)``, and their squared norms,
        ``(tiles, shifts, t^3)``: ``inf`` for invalid tokens and outside the grid, so that they are nobody's match.
        Gathered as whole rows from the references (its tokens are laid out channels-last there already)."""
        index = self._region_index + self._region_inside * (i * self.positions)
        regions = self._rows.index_select(0, index)
        squares = self._row_squares.index_select(0, index)
        c = self.tokens.shape[1]
        tiles, shifts = math.prod(self.tiles), len(self.shifts)
        return regions.view(tiles, shifts * self.positions, c), squares.view(tiles, shifts, self.positions)

    def _around_tiles(self, tiled: torch.Tensor) -> torch.Tensor:
        """``(QX, QY, QZ, *rest)`` contiguous, the query's padded grid in tile order -> ``(tiles, shifts, *rest)``:
        the region of each reference tile, its query tiles at every shift (regions overlap: one strided view of the
        tiles, then one copy)."""
        shifts, tile = [w // t for _, t, w in self.layout], tiled.stride()
        view = tiled.as_strided((*self.tiles, *shifts, *tiled.shape[3:]), (*tile[:3], *tile))
        return view.reshape(math.prod(self.tiles), math.prod(shifts), *tiled.shape[3:])

    def _compare(
        self, query: tuple[torch.Tensor, torch.Tensor], first: int, stop: int, both: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A subject (its ``_regions``) against subjects ``first .. stop-1``: ``(M, X, Y, Z)`` distances from it to each
        of them and, with ``both``, from each of them to it (else ``None``)."""
        m, c = stop - first, self.tokens.shape[1]
        if m <= 0:
            empty = self.tokens.new_empty(0, *self.grid)
            return empty, empty if both else None
        regions, squares = query
        tiles, shifts, positions = squares.shape
        region = shifts * positions
        # |q|^2 (inf for invalid query tokens) + inf outside the window: the row part of every block's initial value
        query_part = (squares[:, None] + self.outside).view(tiles, positions, region)
        rows = torch.empty(tiles, m, region, device=regions.device)
        columns = torch.empty(tiles, m, positions, device=regions.device) if both else None
        per_block = max(1, self.block_bytes // (m * positions * region * _BYTES))
        buffer = torch.empty(min(tiles, per_block), m, positions, region, device=regions.device)
        for start in range(0, tiles, per_block):
            block = slice(start, min(start + per_block, tiles))
            count = block.stop - block.start
            squared = buffer[:count]
            # |r|^2 + |q|^2 (+ inf outside the window), then -2 r.q added in place by the product
            torch.add(self.ref_squares[block, first:stop, :, None], query_part[block, None], out=squared)
            refs = self.refs[block, first:stop].reshape(count, m * positions, c)
            squared.view(count, m * positions, region).baddbmm_(refs, regions[block].transpose(1, 2), alpha=-2)
            torch.amin(squared, dim=2, out=rows[block])  # i -> them: the nearest of the tile's positions
            if columns is not None:
                torch.amin(squared, dim=3, out=columns[block])  # them -> i: the nearest in the query region
        return self._merge_rows(rows.view(tiles, m, shifts, positions)), (
            None if columns is None else self._untile(columns)
        )

    def _merge_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``(tiles, M, shifts, t^3)`` minima per reference tile -> ``(M, X, Y, Z)`` distances: each query tile was
        seen from the reference tiles at every shift behind it, the minimum over them."""
        nx, ny, nz = self.tiles
        m, positions = rows.shape[1], rows.shape[3]
        rows = rows.view(nx, ny, nz, m, len(self.shifts), positions)
        extent = [count + w // t - 1 for count, (_, t, w) in zip(self.tiles, self.layout)]
        out = torch.full((*extent, m, positions), math.inf, device=rows.device)
        for s, (x, y, z) in enumerate(self.shifts):
            target = out[x : x + nx, y : y + ny, z : z + nz]
            torch.minimum(target, rows[:, :, :, :, s], out=target)
        return self._untile(out, front=True)

    def _untile(self, tiled: torch.Tensor, front: bool = False) -> torch.Tensor:
        """``(tiles, M, t^3)`` squared distances in tile order (or ``(tx, ty, tz, M, t^3)``) -> ``(M, X, Y, Z)``
        distances; ``front``: the grid starts r positions into the tiles (the query's padding)."""
        (rx, tx, _), (ry, ty, _), (rz, tz, _) = self.layout
        m = tiled.shape[-2]
        tiled = tiled.view(-1, *self.tiles[1:], m, tx, ty, tz) if tiled.dim() == 3 else tiled
        nx, ny, nz = tiled.shape[:3]
        grid = tiled.view(nx, ny, nz, m, tx, ty, tz).permute(3, 0, 4, 1, 5, 2, 6).reshape(m, nx * tx, ny * ty, nz * tz)
        (x, y, z), (ox, oy, oz) = self.grid, (rx, ry, rz) if front else (0, 0, 0)
        return grid[:, ox : ox + x, oy : oy + y, oz : oz + z].clamp(min=0).sqrt_()

    def distances(self, i: int) -> torch.Tensor:
        """``(N-1, X, Y, Z)`` distances from each token of subject ``i`` to the nearest valid token within the window
        in every other subject, in order; ``inf`` where the window holds none (and for i's invalid tokens)."""
        n, query = self.tokens.shape[0], self._regions(i)
        return torch.cat([self._compare(query, 0, i, False)[0], self._compare(query, i + 1, n, False)[0]])

    def each_subject(self, map_in_order: MapInOrder = map) -> Iterator[tuple[int, torch.Tensor]]:
        """``(i, distances(i))`` for every subject in order, each pair of subjects compared once (the comparisons run
        as ``map_in_order`` runs them, see ``pair_rows.each_pair_once``)."""
        n = self.tokens.shape[0]
        return each_pair_once(n, lambda i: self._compare(self._regions(i), i + 1, n, True), map_in_order)
