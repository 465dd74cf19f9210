"""Cross-subject mutual scoring (after MuSc), as pure tensor functions.

A token of subject i is normal when the other subjects have something like it. For each other subject j
we take the distance to j's nearest valid token (within +-``radius`` grid positions in ``window`` mode,
anywhere in ``global`` mode); the token's score is the mean of the ``ceil(alpha * (N - 1))`` smallest of
those distances. Distances are computed in blocks of bounded size and reference subjects are gathered a block at a
time, so the working memory stays flat whatever the cohort size. Scoring a whole cohort compares each pair of
subjects once and takes both directions from it (``pair_rows``): one distance matrix per pair in global mode
(``pairwise_distances_global``), tiled matrix products in window mode (``tiled_window``), on as many single-threaded
workers as torch has intra-op threads (``threads.single_threaded_workers``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .allocator import keep_freed_memory
from .pair_rows import each_pair_once, held_bytes
from .threads import MapInOrder, calls_ahead, ready_vector_math, single_threaded_workers
from .tiled_window import TiledWindow, tiled_window_bytes

__all__ = [
    "MATCHING_MODES",
    "freed_memory_kept",
    "num_closest",
    "window_offsets",
    "nearest_distances_window",
    "nearest_distances_global",
    "pairwise_distances_global",
    "mean_of_closest",
    "mutual_scores",
    "fine_scores",
    "robust_threshold",
    "median_and_mad",
]

MATCHING_MODES = ("window", "global")
_BYTES = 4  # float32
# Distances are computed in blocks of about this size: blocks that stream through the CPU caches are faster
# than budget-sized ones (``benchmarks/perf.py --only blocks``), and they keep the working memory of scoring
# flat in the cohort size. ``memory_budget_mb`` still caps every block.
BLOCK_BYTES = 8 << 20


def freed_memory_kept(matching: str) -> contextlib.AbstractContextManager:
    """Keep freed memory for reuse while scoring with ``matching`` (``allocator.keep_freed_memory``), or not.

    Window matching's temporaries (each query's regions, the product blocks) are alike from subject to subject and
    group to group: kept, they are reused instead of faulted in again (fresh pages cost about 1 ms per MB on the
    2-core machine of ``perf.md``). Global matching is left to glibc: its 8 MB blocks, kept on the heap among the
    small rows held back between pairs, fragmented it (``perf.py``'s memory process, 16^3 x 64 tokens: 61 and 115 MB
    of working memory at N = 8 and 32, against 38 and 44).
    """
    return keep_freed_memory() if matching == "window" else contextlib.nullcontext()


def block_bytes(budget_bytes: int) -> int:
    """Size of one distance block under ``budget_bytes``."""
    return max(1, min(budget_bytes, BLOCK_BYTES))


def num_closest(alpha: float, num_subjects: int) -> int:
    """How many of the other ``num_subjects - 1`` subjects a token score averages over: ``alpha`` of them, rounded
    up, so at least one and never fewer than ``alpha`` of them. MuSc rounds down (``int``), which averages no
    subject at N = 3 and 2 instead of 3 at N = 8, alpha 0.3; small cohorts are common here."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return max(1, math.ceil(alpha * (num_subjects - 1)))


def window_offsets(radius: int) -> list[tuple[int, int, int]]:
    """All grid offsets of a cube of half-width ``radius`` ((2r+1)^3 of them)."""
    r = range(-radius, radius + 1)
    return [(dx, dy, dz) for dx in r for dy in r for dz in r]


def _blocks(index: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``index`` in consecutive pieces of ``size`` (at least one element each)."""
    size = max(1, size)
    return [index[start : start + size] for start in range(0, len(index), size)]


def nearest_distances_window(
    query: torch.Tensor,
    refs: torch.Tensor,
    ref_valid: torch.Tensor,
    radius: int,
    budget_bytes: int = 256 << 20,
    return_match: bool = False,
    index: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Distance from each query token to the nearest valid reference token within +-``radius`` positions.

    Args:
        query: ``(C, X, Y, Z)`` tokens of one subject.
        refs: ``(N, C, X, Y, Z)`` tokens of the reference subjects on the same grid.
        ref_valid: ``(N, X, Y, Z)`` bool, which reference tokens may be matched.
        radius: half-width of the search window, in grid positions.
        budget_bytes: bound on the temporary memory (see ``BLOCK_BYTES``).
        return_match: also return where the nearest token is.
        index: the M subjects of ``refs`` to compare with (default: all); they are gathered a block at a
            time, so the working memory does not grow with the cohort.

    Returns:
        ``(M, X, Y, Z)`` L2 distances, ``inf`` where the window holds no valid reference token; with
        ``return_match``, also the flat grid index of the matched reference token (``(M, X, Y, Z)``, long).
    """
    index = torch.arange(refs.shape[0], device=refs.device) if index is None else index
    c, *grid = query.shape
    per_ref = 3 * c * math.prod(grid) * _BYTES  # padded copy, difference, squared difference
    pad = (radius,) * 6
    offsets = window_offsets(radius)
    out, where = [], []
    for block_index in _blocks(index, block_bytes(budget_bytes) // per_ref):
        block = F.pad(refs[block_index], pad)
        valid = F.pad(ref_valid[block_index], pad, value=False)
        best = torch.full((len(block_index), *grid), math.inf, device=refs.device)
        best_offset = torch.zeros((len(block_index), *grid), dtype=torch.long, device=refs.device)
        for o, (dx, dy, dz) in enumerate(offsets):
            sl = (
                slice(radius + dx, radius + dx + grid[0]),
                slice(radius + dy, radius + dy + grid[1]),
                slice(radius + dz, radius + dz + grid[2]),
            )
            dist = (block[(slice(None), slice(None), *sl)] - query).square_().sum(1)
            dist = torch.where(valid[(slice(None), *sl)], dist, math.inf)
            if return_match:
                best_offset[dist < best] = o
            torch.minimum(best, dist, out=best)
        out.append(best.sqrt_())
        where.append(best_offset)
    distances = torch.cat(out)
    if not return_match:
        return distances
    # matched position = own position + chosen offset (clamped: unmatched tokens point at a valid index)
    shift = torch.tensor(offsets, device=refs.device).T  # (3, offsets)
    flat = torch.zeros_like(distances, dtype=torch.long)
    chosen = torch.cat(where)
    for axis, n in enumerate(grid):
        shape = [1, 1, 1]
        shape[axis] = n
        coord = (torch.arange(n, device=refs.device).view(shape) + shift[axis][chosen]).clamp_(0, n - 1)
        flat = flat * n + coord
    return distances, flat


def nearest_distances_global(
    query: torch.Tensor,
    refs: torch.Tensor,
    ref_valid: torch.Tensor,
    budget_bytes: int = 256 << 20,
    return_match: bool = False,
    index: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Distance from each query token to the nearest valid token of each reference subject, anywhere.

    Squared distances come from one matrix product per block (``|q|^2 + |r|^2 - 2 q.r``, as
    ``torch.cdist`` does for large inputs): exact to float32 rounding, an order of magnitude faster than
    forming every difference vector.

    Args:
        query: ``(T, C)`` tokens of one subject.
        refs: ``(N, T', C)`` tokens of the reference subjects.
        ref_valid: ``(N, T')`` bool, which reference tokens may be matched.
        budget_bytes: bound on the distance block held at once (see ``BLOCK_BYTES``).
        return_match: also return where the nearest token is.
        index: the M subjects of ``refs`` to compare with (default: all), taken one at a time.

    Returns:
        ``(M, T)`` L2 distances, ``inf`` for a reference subject without valid tokens; with ``return_match``,
        also the index (into T') of the matched reference token (``(M, T)``, long).
    """
    index = torch.arange(refs.shape[0], device=refs.device) if index is None else index
    query = query.contiguous()
    t = query.shape[0]
    query_sq = query.square().sum(1)
    out = torch.full((len(index), t), math.inf, device=query.device)
    matched = torch.zeros((len(index), t), dtype=torch.long, device=query.device)
    for m, j in enumerate(index.tolist()):
        valid_index = ref_valid[j].nonzero()[:, 0]
        candidates = refs[j].contiguous()[valid_index]  # one contiguous copy (refs may be a transposed view)
        if candidates.shape[0] == 0:
            continue
        candidates_sq = candidates.square().sum(1)
        rows = max(1, block_bytes(budget_bytes) // (candidates.shape[0] * _BYTES))
        for start in range(0, t, rows):
            sl = slice(start, start + rows)
            products = torch.addmm(candidates_sq, query[sl], candidates.T, alpha=-2)
            if return_match:
                nearest = products.min(dim=1)
                out[m, sl], matched[m, sl] = nearest.values, valid_index[nearest.indices]
            else:  # no index work when no match is asked for
                out[m, sl] = products.amin(dim=1)
        out[m].add_(query_sq).clamp_(min=0).sqrt_()
    return (out, matched) if return_match else out


def pairwise_distances_global(
    tokens: torch.Tensor, valid: torch.Tensor, budget_bytes: int = 256 << 20, map_in_order: MapInOrder = map
) -> Iterator[tuple[int, torch.Tensor]]:
    """Nearest distances between every pair of subjects, each pair's distance matrix computed once.

    The squared distances of i's and j's valid tokens form one matrix: its row minima are i's distances to j and its
    column minima j's distances to i, so each unordered pair costs one matrix product instead of two
    (``pair_rows.each_pair_once``). A subject's valid tokens are gathered for each pair it is in, and not at all when
    every token is valid: the matrix product reads the channels-first tokens as they are, so no copy of the cohort
    is made and the memory does not grow with it beyond the distances held back between pairs.

    Args:
        tokens: ``(N, C, T)`` tokens of every subject.
        valid: ``(N, T)`` bool.
        budget_bytes: bound on the distance block held at once (see ``BLOCK_BYTES``), per comparison running.
        map_in_order: how the comparisons run (``pair_rows.each_pair_once``).

    Yields:
        ``(i, distances)`` for i = 0 .. N-1, ``(N-1, T)`` L2 distances from each token of i to the nearest valid token
        of each other subject, in order; ``inf`` for invalid tokens of i and where the other subject has no valid token.
    """
    n, _, t = tokens.shape
    squares = tokens.square().sum(1)  # (N, T), once: every subject is in N - 1 pairs

    def valid_tokens(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inside = valid[i].nonzero()[:, 0]
        if len(inside) == t:
            return inside, tokens[i], squares[i]
        return inside, tokens[i].index_select(1, inside), squares[i, inside]  # (C, T_valid), (T_valid,)

    def to_later(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        to_them = torch.full((n - 1 - i, t), math.inf, device=tokens.device)
        from_them = torch.full((n - 1 - i, t), math.inf, device=tokens.device)
        mine, a, a_squares = valid_tokens(i)
        a_rows = a.T.contiguous()  # rows read contiguously by every block's product
        for m, j in enumerate(range(i + 1, n)):
            theirs, b, b_squares = valid_tokens(j)
            if a.shape[1] == 0 or b.shape[1] == 0:
                continue
            rows = max(1, block_bytes(budget_bytes) // (b.shape[1] * _BYTES))
            to_j = torch.empty(a.shape[1], device=tokens.device)
            to_i = torch.full((b.shape[1],), math.inf, device=tokens.device)
            for start in range(0, a.shape[1], rows):
                sl = slice(start, start + rows)
                squared = torch.addmm(b_squares, a_rows[sl], b, alpha=-2).add_(a_squares[sl, None])
                to_j[sl] = squared.amin(dim=1)
                torch.minimum(to_i, squared.amin(dim=0), out=to_i)
            to_them[m, mine] = to_j.clamp_(min=0).sqrt_()
            from_them[m, theirs] = to_i.clamp_(min=0).sqrt_()
        return to_them, from_them

    return each_pair_once(n, to_later, map_in_order)


def mean_of_closest(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` smallest finite values along dim 0 (fewer if fewer are finite; NaN if none)."""
    k = min(k, distances.shape[0])
    smallest = distances.topk(k, dim=0, largest=False).values
    finite = torch.isfinite(smallest)
    total = torch.where(finite, smallest, 0.0).sum(0)
    count = finite.sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), math.nan)


def mutual_scores(
    tokens: torch.Tensor,
    valid: torch.Tensor,
    alpha: float = 0.3,
    matching: str = "window",
    radius: int = 1,
    budget_bytes: int = 256 << 20,
    subjects: list[int] | None = None,
    return_selection: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every token of every subject against the other subjects of the cohort.

    Args:
        tokens: ``(N, C, X, Y, Z)`` tokens of one group (one axis and block), all subjects on one grid.
        valid: ``(N, X, Y, Z)`` bool, tokens inside the subject's mask.
        alpha: fraction of the other subjects whose distances are averaged.
        matching: ``"window"`` or ``"global"``.
        radius: window half-width in grid positions (``window`` mode only).
        budget_bytes: bound on the temporary memory of the distance computation.
        subjects: indices of the subjects to score (default: all); the others still serve as references.
        return_selection: also return, per scored token, the k closest subjects and where their match is
            (what the fine pass of coarse-to-fine scoring compares against).

    Returns:
        ``(S, X, Y, Z)`` scores, NaN for invalid tokens and tokens with no valid match; with
        ``return_selection`` also ``(S, k, X, Y, Z)`` subject indices and ``(S, k, X, Y, Z)`` flat grid
        indices of the matched tokens.
    """
    if matching not in MATCHING_MODES:
        raise ValueError(f"matching must be one of {MATCHING_MODES}, got {matching!r}")
    n = tokens.shape[0]
    if n < 2:  # a cohort run asks for 3 (engines.MIN_SUBJECTS); a bank's own statistics may have 2 references
        raise ValueError(f"cross-subject scoring needs at least 2 subjects (one scored, one to compare with), got {n}")
    k = num_closest(alpha, n)
    grid = tokens.shape[2:]
    flat = tokens.flatten(2).transpose(1, 2) if matching == "global" else None  # (N, T, C), a view
    flat_valid = valid.flatten(1)
    # a whole cohort's comparisons run on single-threaded workers, as many as torch has intra-op threads (the threads
    # meet once per subject instead of at every op: threads.single_threaded_workers)
    whole_cohort = subjects is None and not return_selection
    workers = torch.get_num_threads() if whole_cohort and tokens.device.type == "cpu" else 1
    ahead = calls_ahead(workers)
    # window mode without selection: tiled matrix products, the references laid out once, when that fits the budget
    tiled = (
        flat is None
        and not return_selection
        and tiled_window_bytes(n, tokens.shape[1], tuple(grid), radius, ahead) <= budget_bytes
    )

    def others_of(i: int) -> torch.Tensor:
        return torch.tensor([j for j in range(n) if j != i], device=tokens.device)

    def one_by_one(i: int, window: TiledWindow | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if window is not None:
            return window.distances(i)
        others = others_of(i)
        if flat is None:
            return nearest_distances_window(tokens[i], tokens, valid, radius, budget_bytes, return_selection, others)
        return nearest_distances_global(flat[i], flat, flat_valid, budget_bytes, return_selection, others)

    # the whole cohort each pair once, when what is held back between pairs fits the budget
    pairwise = whole_cohort and (
        tiled or (flat is not None and held_bytes(n, flat.shape[1], ahead=ahead) <= budget_bytes)
    )
    scores, chosen, matches = [], [], []
    with freed_memory_kept(matching), single_threaded_workers(workers if pairwise else 1) as map_in_order:
        ready_vector_math(tokens.device)  # distances end in sqrt: no thread's first VML call on them
        window = TiledWindow(tokens, valid, radius, block_bytes(budget_bytes), map_in_order) if tiled else None
        if not pairwise:
            found_per_subject = ((i, one_by_one(i, window)) for i in (range(n) if subjects is None else subjects))
        elif window is not None:
            found_per_subject = window.each_subject(map_in_order)
        else:
            found_per_subject = pairwise_distances_global(tokens.flatten(2), flat_valid, budget_bytes, map_in_order)
        for i, found in found_per_subject:
            d, where = found if return_selection else (found, None)
            d = d.view(-1, *grid)
            s = mean_of_closest(d, k)
            scores.append(torch.where(valid[i], s, math.nan))
            if return_selection:
                closest = d.topk(min(k, d.shape[0]), dim=0, largest=False).indices
                chosen.append(others_of(i)[closest])
                matches.append(where.view(-1, *grid).gather(0, closest))
    if return_selection:
        return torch.stack(scores), torch.stack(chosen), torch.stack(matches)
    return torch.stack(scores)


def fine_scores(
    query: torch.Tensor,
    query_valid: torch.Tensor,
    refs: torch.Tensor,
    ref_valid: torch.Tensor,
    chosen: torch.Tensor,
    matched: torch.Tensor,
    axis: int,
    margin: int = 1,
    budget_bytes: int = 256 << 20,
) -> torch.Tensor:
    """Fine-token scores of one subject, matched only where the coarse pass pointed.

    Fine tokens pool fewer slices, so along ``axis`` each coarse token holds ``r`` fine tokens. A fine token
    of the query is compared with the fine tokens inside the coarse token that the coarse pass matched in
    each of the k closest subjects (plus ``margin`` fine tokens on either side along ``axis``); its score
    is the mean over those subjects of the distance to the nearest one. No exhaustive fine matching.

    Args:
        query: ``(C, *fine_grid)`` fine tokens of the scored subject; ``fine_grid`` is the coarse grid with
            the ``axis`` dimension multiplied by r.
        query_valid: ``(*fine_grid)`` bool.
        refs: ``(N, C, *fine_grid)`` fine tokens of all subjects; ref_valid: ``(N, *fine_grid)`` bool.
        chosen: ``(k, X, Y, Z)`` subject indices (into ``refs``) the coarse pass selected per coarse token.
        matched: ``(k, X, Y, Z)`` flat coarse-grid index of the matched token in each chosen subject.
        axis: the slice axis (0, 1, 2) along which these fine tokens are finer.
        margin: extra fine tokens searched on either side along ``axis``.
        budget_bytes: bound on the gathered reference block held at once.

    Returns:
        ``(*fine_grid)`` scores, NaN where the fine token is invalid or nothing valid was matched.
    """
    ready_vector_math(query.device)
    k, *coarse = chosen.shape
    r = query.shape[1 + axis] // coarse[axis]
    c = query.shape[0]
    # put the slice axis first: (N, C, A*r, P, Q) -> padded (N, A*r + 2m, P, Q, C)
    refs_a = F.pad(refs.movedim(2 + axis, 2), (0, 0, 0, 0, margin, margin)).permute(0, 2, 3, 4, 1)
    valid_a = F.pad(ref_valid.movedim(1 + axis, 1), (0, 0, 0, 0, margin, margin), value=False)
    plane = [n for a, n in enumerate(coarse) if a != axis]
    t = math.prod(coarse)

    # coarse coordinates of every coarse token and of its matches, slice axis first
    def split(flat_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        coords = torch.stack(torch.unravel_index(flat_index, tuple(coarse)), -1)
        other = [a for a in range(3) if a != axis]
        return coords[..., axis], coords[..., other[0]], coords[..., other[1]]

    # coarse tokens are enumerated slice axis first, (A, P, Q), here and in q / out below
    m_a, m_p, m_q = split(matched.movedim(1 + axis, 1).reshape(k, t).T)  # (T, k)
    subj = chosen.movedim(1 + axis, 1).reshape(k, t).T
    window = torch.arange(r + 2 * margin, device=query.device)
    q = query.movedim(1 + axis, 1).reshape(c, coarse[axis], r, *plane).permute(1, 3, 4, 2, 0).reshape(t, r, c)
    q_ok = query_valid.movedim(axis, 0).reshape(coarse[axis], r, *plane).permute(0, 2, 3, 1).reshape(t, r)
    out = torch.full((t, r), math.nan, device=query.device)
    rows = max(1, block_bytes(budget_bytes) // (3 * k * (r + 2 * margin) * c * _BYTES))
    for start in range(0, t, rows):
        sl = slice(start, start + rows)
        a_idx = (m_a[sl] * r)[..., None] + window  # (t, k, w) indices into the padded slice axis
        gather = (subj[sl][..., None], a_idx, m_p[sl][..., None], m_q[sl][..., None])
        cand = refs_a[gather].float()  # (t, k, w, C)
        ok = valid_a[gather]  # (t, k, w)
        d = torch.cdist(q[sl].float(), cand.flatten(1, 2), compute_mode="donot_use_mm_for_euclid_dist")
        d = d.view(d.shape[0], r, k, -1).masked_fill(~ok[:, None], math.inf).amin(-1)  # (t, r, k)
        finite = torch.isfinite(d)
        mean = torch.where(finite, d, 0.0).sum(-1) / finite.sum(-1).clamp(min=1)
        out[sl] = torch.where(finite.any(-1) & q_ok[sl], mean, math.nan)
    # back to (*fine_grid): (T, r) -> (A, P, Q, r) -> (A, r, P, Q) -> axis in place
    fine = out.view(coarse[axis], *plane, r).permute(0, 3, 1, 2).reshape(coarse[axis] * r, *plane)
    return fine.movedim(0, axis)


def median_and_mad(values: torch.Tensor) -> tuple[float, float]:
    """Median and median absolute deviation of a 1-D tensor of finite values."""
    median = values.median()
    return float(median), float((values - median).abs().median())


def robust_threshold(scores: torch.Tensor, method: str = "mad", value: float = 3.0) -> float:
    """Operating threshold from the pooled token scores of the whole cohort (NaNs ignored).

    ``mad``: median + value * 1.4826 * MAD (a robust z-score: "value standard deviations above typical
    tissue"); ``percentile``: the value-th percentile; ``absolute``: value itself.
    """
    finite = scores[torch.isfinite(scores)].double()
    if method == "absolute":
        return float(value)
    if finite.numel() == 0:
        raise ValueError("no finite token scores to derive a threshold from")
    if method == "percentile":
        return float(torch.quantile(finite[:: max(1, finite.numel() // 4_000_000)], value / 100))
    if method == "mad":
        median, mad = median_and_mad(finite)
        return median + value * 1.4826 * mad
    raise ValueError(f"threshold method must be 'mad', 'percentile' or 'absolute', got {method!r}")
