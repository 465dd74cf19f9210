"""Coarse-to-fine scoring: the fine pass against a brute-force reference, and a lesion only fine tokens see."""

from __future__ import annotations

import math

import pytest
import torch

from scripts.scoring import fine_scores, mutual_scores


def brute_force_fine(query, query_valid, refs, ref_valid, chosen, matched, axis, margin):
    k, *coarse = chosen.shape
    r = query.shape[1 + axis] // coarse[axis]
    out = torch.full(query.shape[1:], math.nan)
    for u in torch.cartesian_prod(*(torch.arange(n) for n in query.shape[1:])).tolist():
        if not query_valid[tuple(u)]:
            continue
        t = list(u)
        t[axis] //= r
        dists = []
        for j, where in zip(chosen[(slice(None), *t)].tolist(), matched[(slice(None), *t)].tolist()):
            m = list(torch.unravel_index(torch.tensor(where), tuple(coarse)))
            best = math.inf
            for f in range(int(m[axis]) * r - margin, int(m[axis]) * r + r + margin):
                if not 0 <= f < query.shape[1 + axis]:
                    continue
                v = [int(x) for x in m]
                v[axis] = f
                if ref_valid[(j, *v)]:
                    best = min(best, float((query[(slice(None), *u)] - refs[(j, slice(None), *v)]).norm()))
            if math.isfinite(best):
                dists.append(best)
        if dists:
            out[tuple(u)] = sum(dists) / len(dists)
    return out


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("matching", ["window", "global"])
def test_fine_scores_match_brute_force(axis, matching):
    g = torch.Generator().manual_seed(axis)
    n, c, coarse, r = 5, 3, [3, 4, 2], 3
    fine_grid = list(coarse)
    fine_grid[axis] *= r
    coarse_tokens = torch.randn(n, c, *coarse, generator=g)
    coarse_valid = torch.rand(n, *coarse, generator=g) > 0.15
    fine = torch.randn(n, c, *fine_grid, generator=g)
    fine_valid = torch.rand(n, *fine_grid, generator=g) > 0.2
    scores, chosen, matched = mutual_scores(
        coarse_tokens, coarse_valid, alpha=0.5, matching=matching, radius=1, return_selection=True
    )
    for i in range(n):
        got = fine_scores(
            fine[i], fine_valid[i], fine, fine_valid, chosen[i], matched[i], axis, margin=1, budget_bytes=2000
        )
        want = brute_force_fine(fine[i], fine_valid[i], fine, fine_valid, chosen[i], matched[i], axis, 1)
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("matching", ["window", "global"])
def test_selection_points_at_the_closest_subjects(matching):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(6, 4, 3, 3, 3, generator=g)
    valid = torch.ones(6, 3, 3, 3, dtype=torch.bool)
    scores, chosen, matched = mutual_scores(tokens, valid, alpha=0.4, matching=matching, return_selection=True)
    assert chosen.shape == (6, 2, 3, 3, 3) and matched.shape == (6, 2, 3, 3, 3)
    assert not (chosen == torch.arange(6).view(6, 1, 1, 1, 1)).any(), "a subject is never its own reference"
    flat = tokens.flatten(2)
    for i in range(6):
        for t in range(27):
            pos = torch.unravel_index(torch.tensor(t), (3, 3, 3))
            d = [
                float((flat[i, :, t] - flat[j, :, matched[(i, s, *pos)]]).norm())
                for s, j in enumerate(chosen[(i, slice(None), *pos)].tolist())
            ]
            assert sum(d) / 2 == pytest.approx(float(scores[(i, *pos)]), rel=1e-5)
            if matching == "window":  # the match lies within one grid position
                where = torch.stack(torch.unravel_index(matched[(i, slice(None), *pos)], (3, 3, 3)), -1)
                assert int((where - torch.stack(pos)).abs().max()) <= 1


def test_fine_tokens_find_a_lesion_too_small_for_coarse_tokens():
    """A 2-slice-thin bright lesion is diluted 7x in 14-slice coarse tokens; coarse-to-fine must rank it higher."""
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from scripts.backbones import create_backbone
    from scripts.inferer import CohortInferer
    from scripts.postprocessing import upsample_scores
    from scripts.tokenizer import MultiAxisTokenizer

    g = torch.Generator().manual_seed(0)
    size, n = 56, 6

    # smooth between-subject variation of +-0.15: larger than the lesion's 7x-diluted coarse contrast (0.086)
    def anatomy() -> torch.Tensor:
        field = F.interpolate(torch.rand(1, 1, 4, 4, 4, generator=g), size=(size,) * 3, mode="trilinear")[0]
        return 0.35 + 0.3 * field + 0.03 * torch.randn(1, size, size, size, generator=g)

    volumes = [anatomy() for _ in range(n)]
    lesion = torch.zeros(size, size, size, dtype=torch.bool)
    lesion[30:32, 18:24, 32:38] = True  # 2 slices thick along axis 0, inside one coarse token
    volumes[0][0][lesion] += 0.6
    masks = [torch.ones(1, size, size, size) for _ in range(n)]
    encoder = create_backbone("intensity", img_size=size, backbone_kwargs={"patch_size": 14, "reduce": 4})
    aurocs = {}
    for fine_depth in (None, 2):
        network = MultiAxisTokenizer(encoder, axes=(0,), slice_depth=14, fine_depth=fine_depth)
        inferer = CohortInferer(matching="window", window=1, alpha=0.3, progress=False)
        entries = [inferer.encode_subject(v, m, network) for v, m in zip(volumes, masks)]
        scores = inferer.score_entries(entries, network)
        assert scores.shape[1:] == ((4, 4, 4) if fine_depth is None else (28, 28, 28))
        heat = torch.stack([upsample_scores(s, (size, size, size)) for s in scores])  # pooled over the cohort
        truth = torch.zeros_like(heat, dtype=torch.bool)
        truth[0] = lesion
        aurocs[fine_depth] = roc_auc_score(truth.flatten().numpy(), heat.flatten().numpy())
    assert aurocs[2] > aurocs[None] + 0.05, aurocs
    assert aurocs[2] > 0.95, aurocs
