"""Cross-subject mutual scoring (after MuSc), as pure tensor functions.

A token of subject i is normal when the other subjects have something like it. For each other subject j
we take the distance to j's nearest valid token (within +-``radius`` grid positions in ``window`` mode,
anywhere in ``global`` mode); the token's score is the mean of the ``ceil(alpha * (N - 1))`` smallest of
those distances. Distances are computed in chunks so that the working memory stays under a budget
whatever the cohort size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "MATCHING_MODES",
    "num_closest",
    "window_offsets",
    "nearest_distances_window",
    "nearest_distances_global",
    "mean_of_closest",
    "mutual_scores",
    "robust_threshold",
]

MATCHING_MODES = ("window", "global")
_BYTES = 4  # float32


def num_closest(alpha: float, num_subjects: int) -> int:
    """How many of the other ``num_subjects - 1`` subjects a token score averages over."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return max(1, math.ceil(alpha * (num_subjects - 1)))


def window_offsets(radius: int) -> list[tuple[int, int, int]]:
    """All grid offsets of a cube of half-width ``radius`` ((2r+1)^3 of them)."""
    r = range(-radius, radius + 1)
    return [(dx, dy, dz) for dx in r for dy in r for dz in r]


def nearest_distances_window(
    query: torch.Tensor, refs: torch.Tensor, ref_valid: torch.Tensor, radius: int, budget_bytes: int = 256 << 20
) -> torch.Tensor:
    """Distance from each query token to the nearest valid reference token within +-``radius`` positions.

    Args:
        query: ``(C, X, Y, Z)`` tokens of one subject.
        refs: ``(M, C, X, Y, Z)`` tokens of M reference subjects on the same grid.
        ref_valid: ``(M, X, Y, Z)`` bool, which reference tokens may be matched.
        radius: half-width of the search window, in grid positions.
        budget_bytes: bound on the temporary memory; references are processed in chunks that fit it.

    Returns:
        ``(M, X, Y, Z)`` L2 distances, ``inf`` where the window holds no valid reference token.
    """
    m, c, *grid = refs.shape
    n_tokens = math.prod(grid)
    per_ref = 3 * c * n_tokens * _BYTES  # shifted view copy, difference, squared difference
    chunk = max(1, budget_bytes // per_ref)
    pad = (radius,) * 6
    out = []
    for start in range(0, m, chunk):
        block = F.pad(refs[start : start + chunk], pad)
        valid = F.pad(ref_valid[start : start + chunk], pad, value=False)
        best = torch.full((block.shape[0], *grid), math.inf, device=refs.device)
        for dx, dy, dz in window_offsets(radius):
            sl = (slice(radius + dx, radius + dx + grid[0]), slice(radius + dy, radius + dy + grid[1]),
                  slice(radius + dz, radius + dz + grid[2]))
            dist = (block[(slice(None), slice(None), *sl)] - query).square_().sum(1)
            dist = torch.where(valid[(slice(None), *sl)], dist, math.inf)
            torch.minimum(best, dist, out=best)
        out.append(best.sqrt_())
    return torch.cat(out)


def nearest_distances_global(
    query: torch.Tensor, refs: torch.Tensor, ref_valid: torch.Tensor, budget_bytes: int = 256 << 20
) -> torch.Tensor:
    """Distance from each query token to the nearest valid token of each reference subject, anywhere.

    Args:
        query: ``(T, C)`` tokens of one subject.
        refs: ``(M, T', C)`` tokens of M reference subjects.
        ref_valid: ``(M, T')`` bool, which reference tokens may be matched.
        budget_bytes: bound on the distance block held at once (query rows x reference tokens).

    Returns:
        ``(M, T)`` L2 distances, ``inf`` for a reference subject without valid tokens.
    """
    t = query.shape[0]
    out = torch.full((refs.shape[0], t), math.inf, device=query.device)
    for j in range(refs.shape[0]):
        candidates = refs[j][ref_valid[j]]
        if candidates.shape[0] == 0:
            continue
        rows = max(1, budget_bytes // (2 * candidates.shape[0] * _BYTES))
        for start in range(0, t, rows):
            d = torch.cdist(query[start : start + rows], candidates, compute_mode="donot_use_mm_for_euclid_dist")
            out[j, start : start + rows] = d.min(dim=1).values
    return out


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
) -> torch.Tensor:
    """Score every token of every subject against the other subjects of the cohort.

    Args:
        tokens: ``(N, C, X, Y, Z)`` tokens of one group (one axis and block), all subjects on one grid.
        valid: ``(N, X, Y, Z)`` bool, tokens inside the subject's mask.
        alpha: fraction of the other subjects whose distances are averaged.
        matching: ``"window"`` or ``"global"``.
        radius: window half-width in grid positions (``window`` mode only).
        budget_bytes: bound on the temporary memory of the distance computation.
        subjects: indices of the subjects to score (default: all); the others still serve as references.

    Returns:
        ``(len(subjects), X, Y, Z)`` scores, NaN for invalid tokens and tokens with no valid match.
    """
    if matching not in MATCHING_MODES:
        raise ValueError(f"matching must be one of {MATCHING_MODES}, got {matching!r}")
    n = tokens.shape[0]
    if n < 3:
        raise ValueError(f"cross-subject scoring needs at least 3 subjects, got {n}")
    k = num_closest(alpha, n)
    grid = tokens.shape[2:]
    flat = tokens.flatten(2).transpose(1, 2) if matching == "global" else None  # (N, T, C)
    scores = []
    for i in range(n) if subjects is None else subjects:
        others = [j for j in range(n) if j != i]
        if flat is None:
            d = nearest_distances_window(tokens[i], tokens[others], valid[others], radius, budget_bytes)
        else:
            d = nearest_distances_global(flat[i], flat[others], valid[others].flatten(1), budget_bytes).view(-1, *grid)
        s = mean_of_closest(d, k)
        scores.append(torch.where(valid[i], s, math.nan))
    return torch.stack(scores)


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
        median = finite.median()
        mad = (finite - median).abs().median()
        return float(median + value * 1.4826 * mad)
    raise ValueError(f"threshold method must be 'mad', 'percentile' or 'absolute', got {method!r}")
