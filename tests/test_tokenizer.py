"""MultiAxisTokenizer: shapes, projection, determinism, the common (D, H, W) frame of all axes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import tiny_vit
from scripts.backbones import SliceEncoder, create_backbone
from scripts.tokenizer import MultiAxisTokenizer

K = 8  # patch size of the tiny ViT = slice depth


@pytest.fixture(scope="module")
def vit():
    return tiny_vit(seed=0)


@pytest.fixture(scope="module")
def dynamic_vit():
    """Same tiny ViT but accepting slices of any size (needed for non-cubic volumes)."""
    return tiny_vit(seed=0, dynamic_img_size=True)


def _volume(shape, seed=0):
    return torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("axes", [(0, 1, 2), (0,), (2,)])
def test_output_shapes_cubic(vit, axes):
    tok = MultiAxisTokenizer(vit, axes=axes, slice_depth=K, proj_dim=16)
    out = tok(_volume((32, 32, 32)))
    groups = len(axes) * 2  # two blocks per axis
    assert tok.num_groups == groups and tok.channels == 16 and tok.out_channels == groups * 16
    assert out.shape == (1, groups * 16, 4, 4, 4)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert tok.token_grid((32, 32, 32)) == (4, 4, 4)


@pytest.mark.parametrize("axes", [(0, 1, 2), (0,), (2,)])
def test_output_shapes_non_cubic(dynamic_vit, axes):
    tok = MultiAxisTokenizer(dynamic_vit, axes=axes, slice_depth=K, proj_dim=16)
    out = tok(_volume((32, 24, 16)))
    assert out.shape == (1, len(axes) * 2 * 16, 4, 3, 2)
    assert tok.token_grid((32, 24, 16)) == (4, 3, 2)
    assert torch.isfinite(out).all()


def test_non_cubic_with_intensity_backbone():
    enc = create_backbone("intensity", img_size=32, backbone_kwargs={"patch_size": K, "reduce": 2})
    tok = MultiAxisTokenizer(enc, axes=(0, 1, 2), slice_depth=K)
    assert tok(_volume((32, 24, 16))).shape == (1, 3 * 4, 4, 3, 2)


def test_batch_equals_subjects_one_by_one(vit):
    tok = MultiAxisTokenizer(vit, slice_depth=K, proj_dim=16)
    a, b = _volume((32, 32, 32), 1), _volume((32, 32, 32), 2)
    both = tok(torch.cat([a, b]))
    assert both.shape[0] == 2
    torch.testing.assert_close(both[0], tok(a)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[1], tok(b)[0], rtol=1e-5, atol=1e-6)


def test_groups_view(vit):
    tok = MultiAxisTokenizer(vit, axes=(0, 2), slice_depth=K, proj_dim=16)
    out = tok(_volume((32, 32, 32)))
    g = tok.groups(out)
    assert g.shape == (1, 4, 16, 4, 4, 4)
    for i in range(4):
        assert torch.equal(g[:, i], out[:, 16 * i : 16 * (i + 1)])


def test_projection_applied_only_when_wider(vit):
    vol = _volume((32, 32, 32), 3)
    projected = MultiAxisTokenizer(vit, slice_depth=K, proj_dim=8, seed=5)
    same_width = MultiAxisTokenizer(vit, slice_depth=K, proj_dim=24)
    wider = MultiAxisTokenizer(vit, slice_depth=K, proj_dim=64)
    assert all(projected.projected) and projected.channels == 8
    assert projected.projection.shape == (6, 24, 8)
    assert not any(same_width.projected) and same_width.channels == 24 and same_width.projection.numel() == 0
    assert not any(wider.projected) and wider.channels == 24 and wider.out_channels == 6 * 24

    raw = same_width.groups(same_width(vol))  # (1, G, 24, d, h, w): normalised features, not projected
    torch.testing.assert_close(wider(vol), same_width(vol), rtol=0, atol=0)
    # projection and slice averaging are both linear: projecting the raw tokens gives the projected tokens
    expected = torch.einsum("bgedhw,gec->bgcdhw", raw, projected.projection)
    torch.testing.assert_close(projected.groups(projected(vol)), expected, rtol=1e-4, atol=1e-5)


def test_vit_features_are_l2_normalised_before_pooling(vit):
    # constant along axis 0: the 8 slices pooled into one axis-0 token are identical, so the average of
    # unit vectors is a unit vector; other axes average different unit vectors (norm <= 1)
    plane = torch.rand(32, 32, generator=torch.Generator().manual_seed(4))
    vol = plane.expand(32, 32, 32)[None, None].clone()
    tok = MultiAxisTokenizer(vit, axes=(0, 1), slice_depth=K, proj_dim=64)
    norms = tok.groups(tok(vol)).norm(dim=2)  # (1, G, d, h, w)
    torch.testing.assert_close(norms[0, :2], torch.ones_like(norms[0, :2]), rtol=0, atol=1e-5)
    assert (norms <= 1 + 1e-5).all()
    assert (norms[0, 2:] < 1 - 1e-3).any()


def test_deterministic_per_seed():
    vol = _volume((32, 32, 32), 6)
    a = MultiAxisTokenizer(tiny_vit(seed=0), slice_depth=K, proj_dim=8, seed=0)(vol)
    b = MultiAxisTokenizer(tiny_vit(seed=0), slice_depth=K, proj_dim=8, seed=0)(vol)
    c = MultiAxisTokenizer(tiny_vit(seed=0), slice_depth=K, proj_dim=8, seed=1)(vol)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("position", [(1, 2, 3), (3, 1, 0)])
def test_all_axes_share_one_frame_vit(vit, position):
    """A bright block changes the tokens of every (axis, block) group exactly at the block's token position."""
    base = torch.full((1, 1, 32, 32, 32), 0.2)
    vol = base.clone()
    vol[(0, 0, *(slice(K * p, K * p + K) for p in position))] = 0.9
    tok = MultiAxisTokenizer(vit, axes=(0, 1, 2), slice_depth=K, proj_dim=64)
    change = tok.groups(tok(vol) - tok(base))[0].norm(dim=1)  # (G, d, h, w)
    for g in range(tok.num_groups):
        at_block = change[g][position]
        elsewhere = change[g].clone()
        elsewhere[position] = 0
        assert at_block > 0.1, f"group {g}: the block's token did not change"
        assert elsewhere.max() < 1e-3 * at_block, f"group {g}: tokens away from {position} changed"


def test_all_axes_share_one_frame_intensity():
    """Same with exact intensity features, on a non-cubic volume where a transposed axis would show up."""
    enc = create_backbone("intensity", img_size=32, backbone_kwargs={"patch_size": K, "reduce": 2})
    tok = MultiAxisTokenizer(enc, axes=(0, 1, 2), slice_depth=K)
    vol = torch.zeros(1, 1, 32, 24, 16)
    vol[0, 0, 8:16, 16:24, 0:8] = 1.0  # token (1, 2, 0) of the (4, 3, 2) grid
    groups = tok.groups(tok(vol))[0]  # (3, 4, 4, 3, 2)
    expected = torch.zeros(4, 3, 2, dtype=torch.bool)
    expected[1, 2, 0] = True
    for g in range(3):
        assert torch.equal(groups[g].abs().sum(0) > 0, expected), f"axis group {g}"
        torch.testing.assert_close(groups[g][:, 1, 2, 0], torch.ones(4))


def test_amp_close_to_fp32(vit):
    vol = _volume((32, 32, 32), 8)
    fp32 = MultiAxisTokenizer(vit, slice_depth=K, proj_dim=16)(vol)
    bf16 = MultiAxisTokenizer(vit, slice_depth=K, proj_dim=16, amp=True)(vol)
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)  # autocast really ran in bfloat16
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.02)
    assert torch.nn.functional.cosine_similarity(bf16.flatten(), fp32.flatten(), dim=0) > 0.999


def test_slice_batch_does_not_change_results(vit):
    vol = _volume((32, 32, 32), 9)
    one = MultiAxisTokenizer(vit, slice_depth=K, proj_dim=16, slice_batch=1)(vol)
    many = MultiAxisTokenizer(vit, slice_depth=K, proj_dim=16, slice_batch=64)(vol)
    torch.testing.assert_close(one, many, rtol=1e-6, atol=1e-6)


def test_intensity_tokens_are_block_means():
    enc = create_backbone("intensity", img_size=28, backbone_kwargs={"patch_size": 14, "reduce": 2})
    assert enc.out_dims == [4] and not enc.normalize and not enc.pretrained
    tok = MultiAxisTokenizer(enc, axes=(0, 1, 2), slice_depth=14)
    assert not any(tok.projected)
    rng = np.random.default_rng(0)
    v = rng.random((28, 28, 28)).astype(np.float32)
    groups = tok.groups(tok(torch.from_numpy(v)[None, None]))[0].numpy()  # (3, 4, 2, 2, 2)
    assert groups.shape == (3, 4, 2, 2, 2)
    expected = np.zeros_like(groups)
    for i in range(2):
        for j in range(2):
            for k in range(2):
                for u in range(2):
                    for w in range(2):
                        c = u * 2 + w  # row-major cell within the slice plane
                        d0, h0, w0 = 14 * i, 14 * j, 14 * k
                        # axis 0: slices are (H, W) planes, pooled over 14 slices along D
                        expected[0, c, i, j, k] = v[
                            d0 : d0 + 14, h0 + 7 * u : h0 + 7 * u + 7, w0 + 7 * w : w0 + 7 * w + 7
                        ].mean()
                        # axis 1: slices are (D, W) planes, pooled along H
                        expected[1, c, i, j, k] = v[
                            d0 + 7 * u : d0 + 7 * u + 7, h0 : h0 + 14, w0 + 7 * w : w0 + 7 * w + 7
                        ].mean()
                        # axis 2: slices are (D, H) planes, pooled along W
                        expected[2, c, i, j, k] = v[
                            d0 + 7 * u : d0 + 7 * u + 7, h0 + 7 * w : h0 + 7 * w + 7, w0 : w0 + 14
                        ].mean()
    np.testing.assert_allclose(groups, expected, rtol=1e-5, atol=1e-6)


def test_errors(vit):
    with pytest.raises(ValueError, match="slice_depth"):
        MultiAxisTokenizer(vit, slice_depth=14)
    for axes in [(), (3,), (0, 0), (-1,), (0, 1, 2, 1)]:
        with pytest.raises(ValueError, match="axes"):
            MultiAxisTokenizer(vit, axes=axes, slice_depth=K)
    tok = MultiAxisTokenizer(vit, slice_depth=K)
    with pytest.raises(ValueError, match="divisible"):
        tok(torch.rand(1, 1, 32, 30, 32))
    with pytest.raises(ValueError, match="divisible"):
        tok.token_grid((32, 32, 20))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        tok(torch.rand(1, 32, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        tok(torch.rand(1, 2, 32, 32, 32))


class _TwoStageEncoder(SliceEncoder):
    """Feature maps of two widths (4 and 12 channels), like the stages of a CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.name, self.patch_size, self.num_outputs, self.out_dims, self.normalize = "two-stage", 4, 2, [4, 12], True
        self.mix = torch.nn.Conv2d(1, 12, 4, stride=4)
        torch.nn.init.normal_(self.mix.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, slices):
        full = self.mix(slices)
        return [full[:, :4], full]


def test_outputs_of_different_widths_share_one_group_width():
    encoder = _TwoStageEncoder()
    tok = MultiAxisTokenizer(encoder, axes=(0, 2), slice_depth=4, proj_dim=8, seed=1)
    assert tok.channels == 8 and tok.widths == [4, 12, 4, 12] and all(tok.projected)
    assert tok.projection.shape == (4, 12, 8) and torch.all(tok.projection[0, 4:] == 0)
    vol = _volume((8, 8, 8), 2)
    tokens = tok.groups(tok(vol))
    assert tokens.shape == (1, 4, 8, 2, 2, 2)
    # projection and slice averaging are linear: projecting the kept 12-channel tokens gives the projected ones
    raw = MultiAxisTokenizer(encoder, axes=(0, 2), slice_depth=4, proj_dim=12)  # 12 wide: the 12-channel group is kept
    assert raw.projected == [True, False, True, False]
    wide = raw.groups(raw(vol))[:, 1]
    expected = torch.einsum("bedhw,ec->bcdhw", wide, tok.projection[1, :12])
    torch.testing.assert_close(tokens[:, 1], expected, rtol=1e-4, atol=1e-5)
