"""Frozen 2D slice encoders, built by name, and where their weights come from.

Like timm, the model code and the weight source are separate concerns: ``create_backbone`` builds the
architecture, ``find_weights`` looks for a checkpoint (a local file, the bundle's ``models/`` folder, the
torch hub cache, the Hugging Face hub) and ``load_weights`` accepts both the original DINOv2 and the timm
key layout. Every encoder maps slices ``(S, 1, H, W)`` with intensities in [0, 1] to a list of patch
feature maps ``(S, E, H / patch, W / patch)``, one per selected block.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DINOV2",
    "SliceEncoder",
    "ViTSliceEncoder",
    "IntensitySliceEncoder",
    "WeightsNotFoundError",
    "create_backbone",
    "find_weights",
    "load_weights",
    "evenly_spaced_blocks",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# backbone name -> (timm architecture, Hugging Face repo, torch hub checkpoint file name)
DINOV2 = {
    "dinov2_vits14": ("vit_small_patch14_dinov2", "timm/vit_small_patch14_dinov2.lvd142m", "dinov2_vits14_pretrain.pth"),
    "dinov2_vitb14": ("vit_base_patch14_dinov2", "timm/vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14_pretrain.pth"),
    "dinov2_vitl14": ("vit_large_patch14_dinov2", "timm/vit_large_patch14_dinov2.lvd142m", "dinov2_vitl14_pretrain.pth"),
}
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{stem}/{file}"
RANDOM_ARCH = "vit_small_patch14_dinov2"


class WeightsNotFoundError(FileNotFoundError):
    """No checkpoint for a pretrained backbone could be found; the message says how to provide one."""


class SliceEncoder(nn.Module):
    """Base of all slice encoders: frozen, in eval mode, and self-describing.

    Attributes:
        name: backbone name as given in the config.
        patch_size: side of the square patch one feature vector describes, in pixels.
        num_outputs: number of feature maps returned per call (blocks for a ViT).
        embed_dim: channels of each feature map.
        normalize: whether features should be L2-normalised (direction carries the meaning) or not
            (raw intensities, where the magnitude is the signal).
        pretrained: whether real pretrained weights were loaded.
        warning: why this encoder is not the one that was asked for (empty when it is).
        source: the checkpoint file the weights came from (empty when there are none).
    """

    name: str
    patch_size: int
    num_outputs: int
    embed_dim: int
    normalize: bool
    pretrained: bool
    warning: str = ""
    source: str = ""

    def freeze(self) -> SliceEncoder:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> SliceEncoder:
        # frozen feature extractor: dropout and friends must never switch on
        return super().train(False)


def evenly_spaced_blocks(depth: int, count: int) -> list[int]:
    """Indices of ``count`` blocks spread over a ``depth``-block ViT, ending at the last one (12, 4 -> 2, 5, 8, 11)."""
    if not 1 <= count <= depth:
        raise ValueError(f"cannot take {count} blocks from a ViT with {depth} blocks")
    return sorted({round((i + 1) * depth / count) - 1 for i in range(count)})


class ViTSliceEncoder(SliceEncoder):
    """A timm ViT that returns the patch tokens of several blocks as NCHW maps.

    Grey slices are repeated to three channels and normalised with the ImageNet statistics DINOv2 was
    trained with.
    """

    def __init__(self, model: nn.Module, name: str, blocks: Sequence[int], pretrained: bool) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.blocks = list(blocks)
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.num_outputs = len(self.blocks)
        self.embed_dim = int(model.embed_dim)
        self.normalize = True
        self.pretrained = pretrained
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def forward(self, slices: torch.Tensor) -> list[torch.Tensor]:
        x = (slices.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self.model.forward_intermediates(x, indices=self.blocks, output_fmt="NCHW", intermediates_only=True)


class IntensitySliceEncoder(SliceEncoder):
    """Raw voxel patches on the same token grid as a ViT: each patch averaged down to ``reduce x reduce`` values.

    Not a learned model: it is the baseline every pretrained backbone has to beat, and the backbone the
    offline demo uses. Features are NOT L2-normalised, because the intensity contrast is the signal.
    """

    def __init__(self, patch_size: int = 14, reduce: int = 4) -> None:
        super().__init__()
        if not 1 <= reduce <= patch_size:
            raise ValueError(f"intensity backbone: reduce must be in 1..patch_size ({patch_size}), got {reduce}")
        self.name = "intensity"
        self.patch_size = patch_size
        self.reduce = reduce
        self.num_outputs = 1
        self.embed_dim = reduce * reduce
        self.normalize = False
        self.pretrained = False
        self.freeze()

    def forward(self, slices: torch.Tensor) -> list[torch.Tensor]:
        s, _, h, w = slices.shape
        p, r = self.patch_size, self.reduce
        patches = slices.reshape(s, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(-1, 1, p, p)
        cells = F.adaptive_avg_pool2d(patches, r).view(s, h // p, w // p, r * r)
        return [cells.permute(0, 3, 1, 2).contiguous()]


def find_weights(name: str, weights_path: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None,
                 allow_download: bool = True) -> Path:
    """Locate a checkpoint for DINOv2 backbone ``name``, trying each source in turn.

    Order: ``weights_path`` (if given it must exist), ``models_dir/<checkpoint>`` (where the bundle's
    ``large_files.yml`` puts it), the torch hub cache, the Hugging Face hub cache (and a download when
    ``allow_download`` and the network allow it).
    """
    if name not in DINOV2:
        raise ValueError(f"unknown pretrained backbone {name!r}; choose one of {sorted(DINOV2)}")
    _, hf_repo, ckpt = DINOV2[name]
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"weights_path {str(path)!r} for backbone {name!r} does not exist")
        return path
    tried = []
    for candidate in (Path(models_dir) / ckpt if models_dir else None, Path(torch.hub.get_dir()) / "checkpoints" / ckpt):
        if candidate is None:
            continue
        tried.append(str(candidate))
        if candidate.is_file():
            return candidate
    tried.append(f"Hugging Face hub {hf_repo} (model.safetensors)")
    from huggingface_hub import constants, hf_hub_download

    # the cache first; the network only when allowed and reachable (the hub client retries for ~20 s otherwise)
    for local_only in (True, False) if allow_download and _reachable(constants.ENDPOINT) else (True,):
        try:
            return Path(hf_hub_download(hf_repo, "model.safetensors", local_files_only=local_only))
        except Exception as err:  # not cached, offline, no such file: all mean "not here"
            logger.debug("Hugging Face hub lookup for %s (local_only=%s) failed: %s", hf_repo, local_only, err)
    stem = ckpt.removesuffix("_pretrain.pth")
    url = DINOV2_URL.format(stem=stem, file=ckpt)
    raise WeightsNotFoundError(
        f"no pretrained weights for backbone {name!r}. Looked in: " + "; ".join(tried) + ".\n"
        "Provide them in one of these ways (this needs a machine with internet access once):\n"
        f"  * download {url} and pass --weights_path /path/to/{ckpt}\n"
        f"  * or put that file in {tried[0]}\n"
        f"  * or run `huggingface-cli download {hf_repo}` (then it is found in the Hugging Face cache)\n"
        "  * or choose --backbone intensity (no weights; the baseline) to run without them."
    )


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` resolves and accepts a connection, so an offline machine fails fast."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file: ``.safetensors`` or a torch pickle (tensors only, never arbitrary code)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot read checkpoint ({err})") from err
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a DINOv2 (original layout: ``mask_token``, 518 px position embedding) or timm checkpoint into ``model``.

    timm's own filter converts the layout and resamples the position embedding to the model's image size.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = load_state_dict(path)
    state = {k.removeprefix("backbone.").removeprefix("module."): v for k, v in state.items()}
    try:
        state = checkpoint_filter_fn(state, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{path}: checkpoint does not fit {type(model).__name__}: {err}") from err
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _timm_vit(arch: str, img_size: int, seed: int, **kwargs) -> nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # "random" must mean the same random network on every run
        # dynamic_img_size: slices of non-cubic grids work too (position embeddings are interpolated)
        kwargs.setdefault("dynamic_img_size", True)
        return timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=0, **kwargs)


def create_backbone(
    name: str,
    img_size: int,
    num_blocks: int | Sequence[int] = 4,
    weights_path: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
    allow_download: bool = True,
    seed: int = 0,
    fallback: str | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> SliceEncoder:
    """Build the slice encoder called ``name``.

    Args:
        name: ``dinov2_vits14`` | ``dinov2_vitb14`` | ``dinov2_vitl14`` (pretrained, weights required),
            ``random`` (the ViT-S/14 architecture, randomly initialised with ``seed``: for testing the
            mechanics only, it is NOT a feature extractor) or ``intensity`` (raw voxel patches).
        img_size: side of the square slices, in pixels.
        num_blocks: how many evenly spaced blocks to take features from, or explicit block indices.
        weights_path, models_dir, allow_download: where to look for weights, see :func:`find_weights`.
        seed: initialisation seed of ``random``.
        fallback: backbone to build instead when the weights of ``name`` cannot be found (the demo uses
            ``intensity``); the substitution is logged as a warning and kept in ``encoder.warning``.
        backbone_kwargs: architecture overrides passed to timm (e.g. ``embed_dim``, ``depth``, ``num_heads``,
            ``patch_size`` for a tiny test ViT), or ``reduce`` and ``patch_size`` for ``intensity``.
    """
    kwargs = dict(backbone_kwargs or {})
    if name == "intensity":
        return IntensitySliceEncoder(**kwargs)
    if name == "random":
        model = _timm_vit(kwargs.pop("arch", RANDOM_ARCH), img_size, seed, **kwargs)
        pretrained = False
    elif name in DINOV2:
        try:
            path = find_weights(name, weights_path, models_dir, allow_download)
        except WeightsNotFoundError as err:
            if not fallback:
                raise
            encoder = create_backbone(fallback, img_size, num_blocks, seed=seed)
            encoder.warning = (
                f"WARNING: pretrained weights for {name!r} were not found, so this run uses the {fallback!r} "
                f"backbone instead. Its results are NOT those of {name}. {err}"
            )
            logger.warning(encoder.warning)
            return encoder
        model = load_weights(_timm_vit(DINOV2[name][0], img_size, seed, **kwargs), path)
        logger.info("backbone %s: loaded pretrained weights from %s", name, path)
        pretrained = True
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted([*DINOV2, 'random', 'intensity'])}")
    depth = len(model.blocks)
    blocks = evenly_spaced_blocks(depth, num_blocks) if isinstance(num_blocks, int) else list(num_blocks)
    if not all(0 <= b < depth for b in blocks):
        raise ValueError(f"block indices {blocks} out of range for a ViT with {depth} blocks")
    encoder = ViTSliceEncoder(model, name=name, blocks=blocks, pretrained=pretrained)
    encoder.source = str(path) if pretrained else ""
    return encoder
