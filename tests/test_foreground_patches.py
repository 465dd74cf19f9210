"""Background patches left out of the ViT: what is computed equals the ViT on those patches alone, what is left
out gets a blank slice's features, and nothing changes unless asked for."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_vit
from scripts.backbones import create_backbone
from scripts.foreground_patches import patches_with_foreground
from scripts.token_cache import describe
from scripts.tokenizer import MultiAxisTokenizer

P = 8  # patch size of the tiny ViT


@pytest.fixture(scope="module")
def vit():
    return tiny_vit(seed=0)


def _slices(count: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def _foreground() -> torch.Tensor:
    """Four slices with 1, 3, 16 and 4 of their 16 patches touched by foreground, and one with none."""
    fg = torch.zeros(5, 1, 32, 32, dtype=torch.bool)
    fg[0, :, 3:5, 3:5] = True  # one patch
    fg[1, :, 6:20, 10:12] = True  # patch rows 0 to 2 of patch column 1
    fg[2] = True  # every patch
    fg[3, :, 31, :] = True  # the last row of patches
    return fg


def _vit_on(encoder, image: torch.Tensor, kept: torch.Tensor) -> list[torch.Tensor]:
    """Reference: the timm ViT run on one slice's prefix tokens and ``kept`` patch tokens only, by hand."""
    model = encoder.model
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(encoder.network_input(image))))
    prefix = model.num_prefix_tokens
    x = torch.cat([tokens[:, :prefix], tokens[:, prefix:][:, kept]], dim=1)
    out = []
    for i, block in enumerate(model.blocks[: max(encoder.blocks) + 1]):
        x = block(x)
        if i in encoder.blocks:
            out.append(x[0, prefix:])
    return out


def test_patches_with_foreground():
    keep = patches_with_foreground(_foreground(), P)
    assert keep.shape == (5, 16)
    assert keep.sum(dim=1).tolist() == [1, 3, 16, 4, 0]
    assert keep[0].nonzero().flatten().tolist() == [0]
    assert keep[1].nonzero().flatten().tolist() == [1, 5, 9]
    assert keep[3].nonzero().flatten().tolist() == [12, 13, 14, 15]
    with pytest.raises(ValueError, match="30x32 pixels are not whole 8-pixel patches"):
        patches_with_foreground(torch.ones(1, 1, 30, 32, dtype=torch.bool), P)


@torch.inference_mode()
def test_computed_patches_equal_the_vit_on_those_patches_alone(vit):
    slices, fg = _slices(5), _foreground()
    maps = vit(slices, foreground=fg)
    keep = patches_with_foreground(fg, P)
    for s in range(5):
        if not keep[s].any():
            continue
        alone = _vit_on(vit, slices[s : s + 1], keep[s])
        for fmap, reference in zip(maps, alone):
            computed = fmap[s].flatten(1).T[keep[s]]  # (kept, C), raster order
            torch.testing.assert_close(computed, reference, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_skipped_patches_get_the_features_of_a_blank_slice(vit):
    slices, fg = _slices(5), _foreground()
    maps = vit(slices, foreground=fg)
    blank = vit(torch.zeros(1, 1, 32, 32))
    skipped = ~patches_with_foreground(fg, P)
    assert skipped[4].all() and not skipped[2].any()
    for fmap, reference in zip(maps, blank):
        for s in range(5):
            torch.testing.assert_close(fmap[s].flatten(1)[:, skipped[s]], reference[0].flatten(1)[:, skipped[s]])


@torch.inference_mode()
def test_all_foreground_is_the_plain_forward(vit):
    slices = _slices(3, seed=1)
    plain = vit(slices)
    for a, b in zip(vit(slices, foreground=torch.ones_like(slices, dtype=torch.bool)), plain):
        assert torch.equal(a, b)


@torch.inference_mode()
def test_computed_fraction_is_counted():
    encoder = tiny_vit(seed=0)
    assert encoder.computed_patch_fraction() == 1.0
    encoder(_slices(5), foreground=_foreground())
    assert encoder.computed_patch_fraction() == pytest.approx((1 + 3 + 16 + 4 + 0) / 80)


@torch.inference_mode()
def test_blank_features_follow_the_precision(vit):
    """A skipped patch under bf16 autocast gets the bf16 blank features, not the fp32 ones cached before."""
    slices, fg = _slices(5), _foreground()
    vit(slices, foreground=fg)
    fp32_blank = vit(torch.zeros(1, 1, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = vit(slices, foreground=fg)
        blank = vit(torch.zeros(1, 1, 32, 32))
    assert not torch.equal(blank[0], fp32_blank[0])  # autocast really changes them
    for fmap, reference in zip(maps, blank):
        assert torch.equal(fmap[4], reference[0].to(fmap.dtype))


def _volume_and_foreground() -> tuple[torch.Tensor, torch.Tensor]:
    volume = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))
    foreground = torch.zeros_like(volume, dtype=torch.bool)
    foreground[..., 4:20, 2:30, 9:27] = True
    return volume * foreground, foreground


@torch.inference_mode()
def test_tokenizer_skips_only_when_asked(vit):
    volume, foreground = _volume_and_foreground()
    plain = MultiAxisTokenizer(vit, slice_depth=P, proj_dim=16)
    skipping = MultiAxisTokenizer(vit, slice_depth=P, proj_dim=16, skip_background=True)
    reference = plain(volume)
    assert torch.equal(plain.tokenize(volume, foreground=foreground)["tokens"], reference)
    assert torch.equal(skipping.tokenize(volume)["tokens"], reference)  # no foreground given
    everywhere = torch.ones_like(foreground)
    torch.testing.assert_close(skipping.tokenize(volume, foreground=everywhere)["tokens"], reference)
    skipped = skipping.tokenize(volume, foreground=foreground)["tokens"]
    assert skipped.shape == reference.shape and torch.isfinite(skipped).all()
    assert not torch.equal(skipped, reference)
    # a token whose voxels are all foreground saw only foreground patches along every axis: in a ViT they still
    # attend to fewer tokens, so it changes, but it stays close
    inside = torch.nn.functional.cosine_similarity(skipped[0, :, 1, 1, 2], reference[0, :, 1, 1, 2], dim=0)
    assert inside > 0.9


def test_tokenizer_setting_enters_the_token_fingerprint(vit):
    assert describe(MultiAxisTokenizer(vit, slice_depth=P, skip_background=True))["skip_background"] is True
    assert describe(MultiAxisTokenizer(vit, slice_depth=P))["skip_background"] is False


@torch.inference_mode()
def test_encoders_that_cannot_skip_encode_every_patch():
    volume, foreground = _volume_and_foreground()
    intensity = create_backbone("intensity", img_size=32, backbone_kwargs={"patch_size": P, "reduce": 2})
    assert not intensity.skips_background
    tokenizer = MultiAxisTokenizer(intensity, slice_depth=P, skip_background=True)
    assert torch.equal(tokenizer.tokenize(volume, foreground=foreground)["tokens"], tokenizer(volume))


def test_foreground_must_match_the_volume(vit):
    volume, foreground = _volume_and_foreground()
    tokenizer = MultiAxisTokenizer(vit, slice_depth=P, skip_background=True)
    with pytest.raises(ValueError, match=r"foreground of shape \(1, 1, 32, 32, 16\) for a volume of"):
        tokenizer.tokenize(volume, foreground=foreground[..., :16])


@torch.inference_mode()
def test_the_inferer_gives_the_mask_as_foreground(vit):
    from scripts.inferer import CohortInferer

    volume, foreground = _volume_and_foreground()
    tokenizer = MultiAxisTokenizer(vit, slice_depth=P, proj_dim=16, skip_background=True)
    entry = CohortInferer(progress=False).encode_subject(volume[0], foreground[0].float(), tokenizer)
    assert torch.equal(entry["tokens"], tokenizer.tokenize(volume, foreground=foreground)["tokens"][0])
    assert not torch.equal(entry["tokens"], tokenizer(volume)[0])


def test_bundle_setting_reaches_the_tokenizer():
    from monai.bundle import ConfigParser

    from helpers import INFERENCE, ROOT, TINY_VIT_SETTINGS

    for setting in (False, True):
        parser = ConfigParser()
        parser.read_config(str(INFERENCE))
        parser.update({"bundle_root": str(ROOT / "bundle"), **TINY_VIT_SETTINGS, "skip_background_patches": setting})
        assert parser.get_parsed_content("network_def").skip_background is setting


@torch.inference_mode()
def test_non_cubic_volumes_skip_too():
    """Slices of three sizes (one per axis), each with its own blank features."""
    vit = tiny_vit(seed=0, dynamic_img_size=True)
    volume = torch.rand(1, 1, 32, 24, 16, generator=torch.Generator().manual_seed(4))
    foreground = torch.zeros_like(volume, dtype=torch.bool)
    foreground[..., 8:20, 4:20, 2:9] = True
    tokenizer = MultiAxisTokenizer(vit, slice_depth=P, proj_dim=16, skip_background=True)
    skipped = tokenizer.tokenize(volume * foreground, foreground=foreground)["tokens"]
    assert skipped.shape == tokenizer(volume).shape == (1, 3 * 2 * 16, 4, 3, 2)
    assert torch.isfinite(skipped).all()
    torch.testing.assert_close(
        tokenizer.tokenize(volume, foreground=torch.ones_like(foreground))["tokens"], tokenizer(volume)
    )
