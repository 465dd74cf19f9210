"""Cross-subject mutual scoring against a brute-force reference written with plain Python loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from scripts.pair_rows import each_pair_once, held_bytes
from scripts.scoring import (
    mean_of_closest,
    mutual_scores,
    nearest_distances_global,
    nearest_distances_window,
    num_closest,
    pairwise_distances_global,
    robust_threshold,
    window_offsets,
)
from scripts.threads import single_threaded_workers
from scripts.tiled_window import TiledWindow, tiled_window_bytes

N, C, GRID = 5, 4, (5, 4, 3)


def _cohort(seed: int, all_invalid_subject: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens with ~30 % invalid tokens and a few positions that are guaranteed to have no match."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(N, C, *GRID, generator=g)
    valid = torch.rand(N, *GRID, generator=g) > 0.3
    # position (0, 0, 0): only subject 0 is valid there -> no match within radius 0
    valid[:, 0, 0, 0] = False
    valid[0, 0, 0, 0] = True
    # corner (4, 3, 2) and its whole 1-neighbourhood: only subject 1 is valid -> no match even within radius 1
    valid[:, 3:, 2:, 1:] = False
    valid[1, 4, 3, 2] = True
    if all_invalid_subject:
        valid[3] = False  # a subject without any valid token: its distances are inf for everybody else
    return tokens, valid


def _reference(tokens: torch.Tensor, valid: torch.Tensor, alpha: float, matching: str, radius: int = 0) -> np.ndarray:
    """Mutual scores by brute force, in float64."""
    n, _, *grid = tokens.shape
    v = valid.numpy()
    vec = tokens.double().numpy()
    # one plain tuple of C floats per (subject, position)
    t = {(j, *q): tuple(vec[(j, slice(None), *q)].tolist()) for j in range(n) for q in np.ndindex(*grid)}
    k = max(1, math.ceil(alpha * (n - 1)))
    positions = list(itertools.product(*(range(s) for s in grid)))
    out = np.full((n, *grid), np.nan)
    for i in range(n):
        for p in positions:
            if not v[(i, *p)]:
                continue
            per_subject = []
            for j in range(n):
                if j == i:
                    continue
                best = math.inf
                if matching == "window":
                    candidates = []
                    for off in itertools.product(range(-radius, radius + 1), repeat=3):
                        q = tuple(a + b for a, b in zip(p, off))
                        if all(0 <= q[d] < grid[d] for d in range(3)):
                            candidates.append(q)
                else:
                    candidates = positions
                for q in candidates:
                    if v[(j, *q)]:
                        best = min(best, math.dist(t[(i, *p)], t[(j, *q)]))
                per_subject.append(best)
            closest = sorted(per_subject)[:k]
            finite = [d for d in closest if math.isfinite(d)]
            if finite:
                out[(i, *p)] = sum(finite) / len(finite)
    return out


def _assert_same_nan_pattern_and_close(actual: torch.Tensor, expected: np.ndarray) -> None:
    a = actual.double().numpy()
    assert a.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(expected))
    np.testing.assert_allclose(a[~np.isnan(a)], expected[~np.isnan(expected)], rtol=1e-5, atol=1e-5)


CASES = [
    # (matching, radius, alpha): alpha 0.2 -> k = 1, 0.5 -> k = 2, 1.0 -> k = 4 (N = 5)
    ("window", 0, 0.2),
    ("window", 0, 0.5),
    ("window", 1, 0.2),
    ("window", 1, 0.5),
    ("window", 1, 1.0),
    ("global", 0, 0.2),
    ("global", 0, 0.5),
    ("global", 0, 1.0),
]


@pytest.mark.parametrize("all_invalid_subject", [False, True])
@pytest.mark.parametrize(("matching", "radius", "alpha"), CASES)
def test_mutual_scores_match_brute_force(matching, radius, alpha, all_invalid_subject):
    tokens, valid = _cohort(seed=7, all_invalid_subject=all_invalid_subject)
    expected = _reference(tokens, valid, alpha, matching, radius)
    actual = mutual_scores(tokens, valid, alpha=alpha, matching=matching, radius=radius)
    _assert_same_nan_pattern_and_close(actual, expected)
    # the scenario really exercises the NaN paths: invalid tokens and valid tokens without any match
    assert np.isnan(expected[~valid.numpy()]).all()
    assert np.isfinite(expected[valid.numpy()]).any()
    if matching == "window":
        assert np.isnan(expected[1, 4, 3, 2])  # valid, but nothing valid around it in other subjects
        if radius == 0:
            assert np.isnan(expected[0, 0, 0, 0])
    else:
        assert np.isfinite(expected[1, 4, 3, 2])  # global matching finds a match elsewhere


def test_reference_scenario_has_valid_tokens_without_match():
    """Guard for the test itself: the planted no-match positions are valid tokens, scored NaN by the code."""
    tokens, valid = _cohort(seed=7)
    assert valid[0, 0, 0, 0] and valid[1, 4, 3, 2]
    s0 = mutual_scores(tokens, valid, alpha=0.5, matching="window", radius=0)
    s1 = mutual_scores(tokens, valid, alpha=0.5, matching="window", radius=1)
    assert torch.isnan(s0[0, 0, 0, 0]) and torch.isnan(s1[1, 4, 3, 2])
    assert torch.isnan(s1[~valid]).all()


# distances from matrix products (global; window when the tiled route fits the budget) differ from the
# difference-by-difference ones in float32 rounding only
_EXACTNESS = {"window": {"rtol": 1e-6, "atol": 1e-5}, "global": {"rtol": 1e-6, "atol": 1e-5}}


@pytest.mark.parametrize(("matching", "radius"), [("window", 0), ("window", 1), ("global", 0)])
def test_chunking_does_not_change_results(matching, radius):
    tokens, valid = _cohort(seed=3, all_invalid_subject=True)
    tiny = mutual_scores(tokens, valid, alpha=0.5, matching=matching, radius=radius, budget_bytes=1)
    large = mutual_scores(tokens, valid, alpha=0.5, matching=matching, radius=radius, budget_bytes=1 << 30)
    torch.testing.assert_close(tiny, large, equal_nan=True, **_EXACTNESS[matching])


def test_distance_helpers_chunked_equal_unchunked():
    tokens, valid = _cohort(seed=5)
    d_small = nearest_distances_window(tokens[0], tokens[1:], valid[1:], radius=1, budget_bytes=1)
    d_large = nearest_distances_window(tokens[0], tokens[1:], valid[1:], radius=1, budget_bytes=1 << 30)
    assert d_small.shape == (N - 1, *GRID)
    torch.testing.assert_close(d_small, d_large, rtol=0, atol=0)  # difference by difference: bit-identical
    flat = tokens.flatten(2).transpose(1, 2)
    g_small = nearest_distances_global(flat[0], flat[1:], valid[1:].flatten(1), budget_bytes=1)
    g_large = nearest_distances_global(flat[0], flat[1:], valid[1:].flatten(1), budget_bytes=1 << 30)
    torch.testing.assert_close(g_small, g_large, **_EXACTNESS["global"])
    # global search is never worse than a window search
    assert (g_large.view(N - 1, *GRID) <= d_large + 1e-6).all()


@pytest.mark.parametrize("budget", [1, 1 << 30])
def test_each_pair_once_equals_each_subject_against_the_others(budget):
    """The whole-cohort global pass (one distance matrix per pair, row and column minima) gives every subject's
    distances to every other subject, in order, as scoring each subject on its own does."""
    tokens, valid = _cohort(seed=11, all_invalid_subject=True)
    flat, flat_valid = tokens.flatten(2).transpose(1, 2), valid.flatten(1)
    pairwise = list(pairwise_distances_global(tokens.flatten(2), flat_valid, budget_bytes=budget))
    assert [i for i, _ in pairwise] == list(range(N))
    for i, found in pairwise:
        others = torch.tensor([j for j in range(N) if j != i])
        alone = nearest_distances_global(flat[i], flat, flat_valid, budget_bytes=budget, index=others)
        mine = valid[i].flatten()
        assert found.shape == (N - 1, flat.shape[1])
        torch.testing.assert_close(found[:, mine], alone[:, mine], **_EXACTNESS["global"])
        assert torch.isinf(found[:, ~mine]).all()  # invalid tokens of i are never scored


@pytest.mark.parametrize("workers", [1, 2])
def test_each_pair_once_holds_back_only_the_later_subjects_distances(workers):
    """Each subject's row leaves as soon as it is complete: what is kept between pairs is the later subjects'
    distances to the earlier ones, and a subject is compared only with the later ones (also when the comparisons
    run on worker threads, finishing in any order)."""
    n, compared, held = 6, [], []
    alive = set()

    def to_later(i):
        compared.append(i)
        rows = torch.arange(n - 1 - i, dtype=torch.float32)[:, None].expand(-1, 2) + 10 * i
        return rows, -rows

    with single_threaded_workers(workers) as map_in_order:
        for i, row in each_pair_once(n, to_later, map_in_order):
            alive.discard(i)
            alive.update(range(i + 1, n))
            held.append(len(alive))
            expected = [-(10 * j + i - j - 1) for j in range(i)] + [10 * i + m for m in range(n - 1 - i)]
            assert row[:, 0].tolist() == expected  # earlier subjects' columns first, then i's own row, in order
    assert sorted(compared) == list(range(n))
    assert held_bytes(n, 2) >= (n * n // 4) * 2 * 4
    assert held_bytes(n, 2, ahead=2) == held_bytes(n, 2) + 2 * 2 * n * 2 * 4  # two comparisons' rows, both ways


@pytest.mark.parametrize("matching", ["window", "global"])
def test_index_argument_equals_gathered_references(matching):
    """References picked by ``index`` (gathered block by block) give what a gathered copy gives."""
    tokens, valid = _cohort(seed=9)
    others = torch.tensor([4, 1, 2])
    if matching == "window":
        picked = nearest_distances_window(tokens[0], tokens, valid, 1, budget_bytes=1, index=others)
        copied = nearest_distances_window(tokens[0], tokens[others], valid[others], 1)
    else:
        flat = tokens.flatten(2).transpose(1, 2)
        picked = nearest_distances_global(flat[0], flat, valid.flatten(1), budget_bytes=1, index=others)
        copied = nearest_distances_global(flat[0], flat[others], valid[others].flatten(1))
    torch.testing.assert_close(picked, copied, **_EXACTNESS[matching])


def test_subjects_argument_selects_rows():
    tokens, valid = _cohort(seed=11)
    full = mutual_scores(tokens, valid, alpha=0.5, matching="window", radius=1)
    part = mutual_scores(tokens, valid, alpha=0.5, matching="window", radius=1, subjects=[3, 0])
    torch.testing.assert_close(part, full[[3, 0]], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("matching", ["window", "global"])
def test_planted_outlier_gets_the_highest_score(matching):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(6, C, *GRID, generator=g)
    valid = torch.ones(6, *GRID, dtype=torch.bool)
    tokens[2, :, 3, 1, 2] = 50.0  # far from every other token
    scores = mutual_scores(tokens, valid, alpha=0.3, matching=matching, radius=1)
    flat_argmax = int(torch.argmax(torch.nan_to_num(scores, nan=-1.0)))
    assert np.unravel_index(flat_argmax, scores.shape) == (2, 3, 1, 2)
    # and by a wide margin: every other token scores far lower
    others = scores.clone()
    others[2, 3, 1, 2] = float("nan")
    assert scores[2, 3, 1, 2] > 5 * float(others[torch.isfinite(others)].max())


def test_num_closest():
    assert num_closest(0.3, 5) == 2  # ceil(1.2)
    assert num_closest(0.25, 5) == 1  # exactly 1.0 -> 1
    assert num_closest(1.0, 5) == 4
    assert num_closest(1e-6, 100) == 1  # never less than one
    assert num_closest(0.5, 2) == 1
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="alpha"):
            num_closest(bad, 5)


def test_window_offsets():
    assert window_offsets(0) == [(0, 0, 0)]
    offs = window_offsets(1)
    assert len(offs) == 27 and len(set(offs)) == 27
    assert all(max(map(abs, o)) <= 1 for o in offs)
    assert len(window_offsets(2)) == 125


def test_mean_of_closest_edge_cases():
    inf, nan = math.inf, math.nan
    d = torch.tensor([[3.0, inf, inf, 1.0], [1.0, inf, 2.0, 1.0], [2.0, inf, inf, 7.0]])
    out = mean_of_closest(d, 2)
    expected = torch.tensor([1.5, nan, 2.0, 1.0])  # col 2: only one finite value among the 2 smallest
    torch.testing.assert_close(out, expected, equal_nan=True)
    # k larger than the number of rows is clipped
    torch.testing.assert_close(mean_of_closest(d, 10), torch.tensor([2.0, nan, 2.0, 3.0]), equal_nan=True)
    # k = 1 is the minimum
    torch.testing.assert_close(mean_of_closest(d, 1), torch.tensor([1.0, nan, 2.0, 1.0]), equal_nan=True)
    # works on a grid too
    g = torch.arange(24, dtype=torch.float32).view(4, 2, 3)
    torch.testing.assert_close(mean_of_closest(g, 2), (g[0] + g[1]) / 2)


def test_robust_threshold_matches_numpy():
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 1.0, size=1001)  # odd count: the median is unambiguous
    scores = torch.tensor(np.concatenate([values, [np.nan, np.nan, np.inf]]), dtype=torch.float32)
    v = values.astype(np.float32).astype(np.float64)
    median = np.median(v)
    mad = np.median(np.abs(v - median))
    assert robust_threshold(scores, "mad", 3.0) == pytest.approx(median + 3.0 * 1.4826 * mad, rel=1e-9)
    assert robust_threshold(scores, "mad", 0.0) == pytest.approx(median, rel=1e-9)
    for q in (50.0, 95.0, 99.5):
        assert robust_threshold(scores, "percentile", q) == pytest.approx(np.percentile(v, q), rel=1e-9)
    assert robust_threshold(scores, "absolute", 0.42) == 0.42
    # absolute does not need finite scores
    assert robust_threshold(torch.full((3,), math.nan), "absolute", 1.5) == 1.5


def test_robust_threshold_errors():
    with pytest.raises(ValueError, match="no finite"):
        robust_threshold(torch.full((4,), math.nan), "mad", 3.0)
    with pytest.raises(ValueError, match="threshold method"):
        robust_threshold(torch.ones(5), "median", 3.0)


def test_mutual_scores_errors():
    tokens, valid = _cohort(seed=1)
    with pytest.raises(ValueError, match="at least 2"):
        mutual_scores(tokens[:1], valid[:1])
    with pytest.raises(ValueError, match="matching"):
        mutual_scores(tokens, valid, matching="nearest")
    # two subjects are enough for the scoring itself (a cohort run asks for 3; a bank's statistics may have 2)
    assert mutual_scores(tokens[:2], valid[:2]).shape == (2, *GRID)


@pytest.mark.parametrize(
    ("grid", "radius", "block_bytes"),
    [((7, 9, 5), 1, 1), ((7, 9, 5), 1, 1 << 30), ((6, 6, 6), 2, 1 << 20), ((5, 3, 4), 0, 1 << 20), ((9, 8, 1), 1, 1)],
)
def test_tiled_window_equals_offset_by_offset(grid, radius, block_bytes):
    """Odd grids (padded up to whole tiles), a wider radius, no radius, a thin grid, one tile per block or all."""
    g = torch.Generator().manual_seed(11)
    tokens = torch.randn(4, 6, *grid, generator=g)
    valid = torch.rand(4, *grid, generator=g) > 0.3
    valid[1:, 0, 0, 0] = False  # subject 0's corner token has no valid neighbour at radius 0
    tiled = TiledWindow(tokens, valid, radius, block_bytes)
    each_pair_once = dict(tiled.each_subject())
    for i in range(4):
        others = torch.tensor([j for j in range(4) if j != i])
        expected = nearest_distances_window(tokens[i], tokens, valid, radius, index=others)[:, valid[i]]
        for actual in (tiled.distances(i)[:, valid[i]], each_pair_once[i][:, valid[i]]):
            assert torch.equal(torch.isinf(actual), torch.isinf(expected))
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        assert torch.isinf(each_pair_once[i][:, ~valid[i]]).all()  # i's invalid tokens are nobody's match
    assert tiled_window_bytes(4, 6, grid, radius) > 4 * 6 * math.prod(grid) * 4  # at least the tiled references
