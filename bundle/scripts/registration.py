"""Affine registration of each subject to a common reference (ITK), as an invertible MONAI transform.

Native-space cohorts (each subject in its own scanner frame, e.g. IXI) do not share an anatomy frame after
reorientation and cropping alone. ``AffineRegisterd`` registers every subject's image (with its mask) to one
reference image -- a subject of the cohort or a template file -- and resamples the image and mask onto the
reference grid; its ``inverse`` brings a tensor on the reference grid (a heat map) back onto the subject's own
grid, so ``Invertd`` over the whole preprocessing works as without registration.

Convention for the matrices used here (``register_affine``'s result and the ``matrix`` in the transform record):
a 4x4 homogeneous matrix ``T`` in **RAS world coordinates (mm)** that maps a point ``p`` of the fixed
(reference) space to the corresponding point ``T @ p`` of the moving (subject) space. This is the direction
of ITK's registration output (fixed -> moving, a "pull-back" transform), converted from ITK's LPS with MONAI's
``orientation_ras_lps``. Resampling the moving image onto the reference grid then reads, for every reference
voxel ``v``, the moving voxel ``inv(A_moving) @ T @ A_reference @ v``.

What MONAI and ITK provide is used for all of it: images go to ITK through ``monai.data.itk_torch_bridge``, ITK
registers, and MONAI's invertible ``SpatialResample`` resamples, in both directions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.itk_torch_bridge import metatensor_to_itk_image
from monai.data.utils import orientation_ras_lps
from monai.transforms import InvertibleTransform, LoadImage, MapTransform, SpatialResample
from monai.utils import SpaceKeys, TraceKeys, ensure_tuple_rep
from scipy import ndimage

from .cohort import find_subjects
from .transforms import CohortInputError, source_name

__all__ = [
    "RegistrationError",
    "register_affine",
    "resample_affine",
    "registration_dice",
    "reference_image",
    "reference_fingerprint",
    "AffineRegisterd",
]

logger = logging.getLogger(__name__)


class RegistrationError(RuntimeError):
    """The registration did not produce a usable transform."""


# ---------------------------------------------------------------------------------------------------------
# registration


def _as_volume(x: Any) -> np.ndarray:
    """A 3D float array from a 3D or channel-first (1, X, Y, Z) array or tensor."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"expected a 3D volume (or one channel of it), got shape {a.shape}")
    return a


def _affine_of(x: Any, affine: Any, what: str) -> np.ndarray:
    if affine is None:
        if isinstance(x, MetaTensor):
            affine = x.affine
        else:
            raise ValueError(f"{what}: no affine given and the array carries none")
    a = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    return a.astype(np.float64)


def _itk_image(array: np.ndarray, affine: np.ndarray, dtype=np.float32):
    """An ITK image of a 3D ``array`` placed by a RAS ``affine`` (MONAI's bridge turns it into ITK's LPS)."""
    volume = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))[None],
        affine=torch.as_tensor(affine, dtype=torch.float64),
        meta={"space": SpaceKeys.RAS},
    )
    return metatensor_to_itk_image(volume, channel_dim=0, dtype=dtype)


def _prepare(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Intensities clipped to the 0.5..99.5 percentiles (inside the mask), shifted to start at 0, masked.

    Clipping keeps a few extreme voxels from squeezing the mutual-information histogram; the shift makes
    the masked-out background the darkest value whatever the modality (CT, z-scored MRI, ...).
    """
    inside = image[mask] if mask is not None else image
    inside = inside[:: max(1, inside.size // 2_000_000)]
    lo, hi = np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0)
    out = np.clip(image, lo, hi if hi > lo else lo + 1.0).astype(np.float32) - np.float32(lo)
    if mask is not None:
        out *= mask
    return out


def _block_mean(array: np.ndarray, affine: np.ndarray, min_spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """``array`` averaged over blocks of whole voxels so each side is about ``min_spacing`` mm (no finer), and the
    affine of the coarser grid; voxels that do not fill a whole block at the far edges are dropped."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    factors = np.maximum(1, np.floor(min_spacing / spacing + 1e-6)).astype(int)
    if np.all(factors == 1):
        return array, affine
    shape = np.array(array.shape) // factors
    cropped = array[: shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]].astype(np.float32)
    blocks = cropped.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2]).mean(axis=(1, 3, 5))
    step = np.eye(4)
    step[:3, :3] = np.diag(factors)
    step[:3, 3] = (factors - 1) / 2.0  # a coarse voxel's centre is the centre of its block
    return blocks, affine @ step


def register_affine(
    moving: Any,
    fixed: Any,
    moving_mask: Any = None,
    fixed_mask: Any = None,
    *,
    moving_affine: Any = None,
    fixed_affine: Any = None,
    min_spacing: float = 2.0,
    levels: int = 3,
    iterations: Sequence[int] = (60, 40, 20),
    samples: Sequence[int] = (8_000, 20_000, 40_000),
    histogram_bins: int = 32,
    learning_rate: float | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> np.ndarray:
    """Affine transform that aligns ``moving`` to ``fixed``, with ITK (``ImageRegistrationMethodv4``).

    Mattes mutual information (so the two images may differ in contrast), an ``AffineTransform`` initialised
    by a moments ``CenteredTransformInitializer`` (centres of mass), ``RegularStepGradientDescentOptimizerv4``
    with physical-shift parameter scales, and a ``levels``-level pyramid whose finest level has voxels of at
    least ``min_spacing`` mm (coarser levels double it; e.g. shrink 4, 2, 1 for 2 mm volumes, 8, 4, 2 for 1 mm),
    smoothed by half the level's voxel size. A fixed random subset of voxels (``samples`` per level, seeded by
    ``seed``) is used for the metric, so the run time depends little on the volume size: about 3 s on two CPU
    cores for 120x120x90 voxels of 2 mm, plus ITK's one-time module loading (15-20 s) in a fresh process.

    Masks (any value > 0 is inside; same grid as their image):
      - both given: only what is inside them is registered (the images are multiplied by their masks), e.g.
        the brains of two T1 scans that are not skull-stripped;
      - only ``fixed_mask``: the metric is evaluated inside it (dilated by 2 voxels), on the whole images;
      - otherwise: the whole images.

    Args:
        moving, fixed: 3D arrays or tensors, or channel-first with one channel; ``MetaTensor``s carry their
            affines, other inputs need ``moving_affine`` / ``fixed_affine`` (voxel -> RAS mm, as in NIfTI).
        moving_mask, fixed_mask: optional masks on the grids of ``moving`` / ``fixed``.
        min_spacing: voxel size (mm) of the finest pyramid level, at least the fixed image's own.
        levels, iterations, samples: pyramid levels, and per level (coarse to fine) the most optimiser iterations
            and the number of voxels sampled for the metric.
        histogram_bins: of the Mattes joint histogram.
        learning_rate: the optimiser's initial step; ``None`` estimates it at each level from the parameter
            scales (a shift of at most one voxel of the level).
        seed: of the metric's voxel sampling; the same inputs and seed give the same matrix (up to the order of
            multithreaded sums, about 1e-10).
        verbose: log iterations and times per level.

    Returns:
        ``T``, float64 (4, 4): maps a point of the fixed (reference) space, RAS mm, to the corresponding point of
        the moving space, RAS mm (see the module docstring). The moving image resampled onto the fixed grid is
        ``moving[inv(moving_affine) @ T @ fixed_affine @ v]`` for every fixed voxel ``v``.

    Raises:
        RegistrationError: the optimisation gave a non-finite or degenerate transform.
    """
    import itk

    a_mov = _affine_of(moving, moving_affine, "moving")
    a_fix = _affine_of(fixed, fixed_affine, "fixed")
    mov, fix = _as_volume(moving).astype(np.float32), _as_volume(fixed).astype(np.float32)
    m_mask = _as_volume(moving_mask) > 0 if moving_mask is not None else None
    f_mask = _as_volume(fixed_mask) > 0 if fixed_mask is not None else None
    for name, img, m in (("moving", mov, m_mask), ("fixed", fix, f_mask)):
        if m is not None and m.shape != img.shape:
            raise ValueError(f"{name} mask shape {m.shape} differs from the {name} image shape {img.shape}")
        if m is not None and not m.any():
            raise ValueError(f"the {name} mask is empty")
    both = m_mask is not None and f_mask is not None
    # finer voxels than min_spacing only cost time: average them into blocks first (1 mm -> 2 mm: 8x fewer)
    if f_mask is not None and not both:
        f_mask = _block_mean(f_mask, a_fix, min_spacing)[0] > 0.5
    mov_p, a_mov = _block_mean(_prepare(mov, m_mask if both else None), a_mov, min_spacing)
    fix_p, a_fix = _block_mean(_prepare(fix, f_mask if both else None), a_fix, min_spacing)

    image_type = itk.Image[itk.F, 3]
    fixed_itk, moving_itk = _itk_image(fix_p, a_fix), _itk_image(mov_p, a_mov)

    # centres of mass -> the initial translation (the linear part starts as the identity)
    rigid = itk.VersorRigid3DTransform[itk.D].New()
    initializer = itk.CenteredTransformInitializer[itk.VersorRigid3DTransform[itk.D], image_type, image_type].New(
        Transform=rigid, FixedImage=fixed_itk, MovingImage=moving_itk
    )
    initializer.MomentsOn()
    initializer.InitializeTransform()
    affine = itk.AffineTransform[itk.D, 3].New()
    affine.SetCenter(rigid.GetCenter())
    affine.SetTranslation(rigid.GetTranslation())

    metric = itk.MattesMutualInformationImageToImageMetricv4[image_type, image_type].New()
    metric.SetNumberOfHistogramBins(int(histogram_bins))
    if f_mask is not None and not both:
        spatial = itk.ImageMaskSpatialObject[3].New()
        spatial.SetImage(_itk_image(ndimage.binary_dilation(f_mask, iterations=2), a_fix, np.uint8))
        spatial.Update()
        metric.SetFixedImageMask(spatial)

    scales = itk.RegistrationParameterScalesFromPhysicalShift[type(metric)].New()
    scales.SetMetric(metric)
    optimizer = itk.RegularStepGradientDescentOptimizerv4[itk.D].New()
    optimizer.SetLearningRate(1.0 if learning_rate is None else float(learning_rate))
    optimizer.SetMinimumStepLength(1e-3)
    optimizer.SetRelaxationFactor(0.5)
    optimizer.SetGradientMagnitudeTolerance(1e-6)
    optimizer.SetScalesEstimator(scales)
    optimizer.SetDoEstimateLearningRateOnce(learning_rate is None)

    registration = itk.ImageRegistrationMethodv4[image_type, image_type].New()
    registration.SetFixedImage(fixed_itk)
    registration.SetMovingImage(moving_itk)
    registration.SetMetric(metric)
    registration.SetOptimizer(optimizer)
    registration.SetInitialTransform(affine)
    registration.InPlaceOn()

    # pyramid on the fixed (virtual) grid: per-dimension shrink factors so anisotropic voxels stay sensible
    spacing = np.linalg.norm(a_fix[:3, :3], axis=0)
    shape = np.array(fix_p.shape)
    iterations = ensure_tuple_rep(iterations, levels)
    samples = ensure_tuple_rep(samples, levels)
    registration.SetNumberOfLevels(levels)
    sigmas, percentages = [], []
    for level in range(levels):
        target = max(min_spacing, float(spacing.min())) * 2 ** (levels - 1 - level)
        factors = np.maximum(1, np.round(target / spacing)).astype(int)
        registration.SetShrinkFactorsPerDimension(level, [int(f) for f in factors])
        sigmas.append(0.5 * target if np.any(factors > 1) else 0.0)
        voxels = float(np.prod(np.ceil(shape / factors)))
        percentages.append(min(1.0, samples[level] / voxels))
    registration.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(True)
    registration.SetSmoothingSigmasPerLevel(sigmas)
    registration.SetMetricSamplingStrategy(itk.ImageRegistrationMethodv4Enums.MetricSamplingStrategy_RANDOM)
    registration.SetMetricSamplingPercentagePerLevel(percentages)
    registration.MetricSamplingReinitializeSeed(int(seed))

    counts: list[int] = []
    ticks: list[float] = [time.perf_counter()]

    def on_level() -> None:
        optimizer.SetNumberOfIterations(int(iterations[registration.GetCurrentLevel()]))
        counts.append(0)
        ticks.append(time.perf_counter())

    def on_iteration() -> None:
        counts[-1] += 1

    registration.AddObserver(itk.MultiResolutionIterationEvent(), on_level)
    optimizer.AddObserver(itk.IterationEvent(), on_iteration)
    registration.Update()
    ticks.append(time.perf_counter())

    lps = np.eye(4)
    lps[:3, :3] = itk.array_from_matrix(affine.GetMatrix())
    lps[:3, 3] = np.asarray(affine.GetOffset(), dtype=np.float64)
    flip = orientation_ras_lps(np.eye(4))  # LPS <-> RAS, its own inverse
    matrix = flip @ lps @ flip
    if verbose:
        logger.info(
            "registration: setup %.2f s, iterations per level %s in %s s; %s",
            ticks[1] - ticks[0],
            counts,
            [round(b - a, 2) for a, b in zip(ticks[1:], ticks[2:])],
            optimizer.GetStopConditionDescription(),
        )
    det = float(np.linalg.det(matrix[:3, :3]))
    if not np.all(np.isfinite(matrix)) or not 0.2 < det < 5.0:
        raise RegistrationError(f"affine registration failed: degenerate transform (determinant {det:.3g})")
    return matrix


# ---------------------------------------------------------------------------------------------------------
# resampling and checks


_MODES = {"nearest": "nearest", "bilinear": "bilinear", "trilinear": "bilinear", "linear": "bilinear"}


def _mode(mode: str | int) -> str | int:
    """``SpatialResample``'s name of an interpolation mode (an integer is a spline order)."""
    if isinstance(mode, (int, np.integer)):
        return int(mode)
    if str(mode).lower() not in _MODES:
        raise ValueError(f"interpolation mode {mode!r} is not one of {sorted(_MODES)} or a spline order")
    return _MODES[str(mode).lower()]


def _resampler() -> SpatialResample:
    """MONAI's resampler as registration uses it: zero outside the source, voxel centres as the affines place them."""
    return SpatialResample(padding_mode="zeros", align_corners=False, dtype=torch.float64)


def resample_affine(
    array: Any,
    src_affine: Any,
    dst_affine: Any,
    dst_shape: Sequence[int],
    matrix: Any = None,
    mode: str | int = "bilinear",
) -> np.ndarray:
    """``array`` (3D, or channel-first) read onto the grid ``(dst_affine, dst_shape)`` through the world map ``matrix``.

    Output voxel ``v`` takes the value of ``array`` at the source voxel ``inv(src_affine) @ matrix @ dst_affine @ v``
    (``matrix`` maps destination-space points to source-space points, RAS mm; identity when ``None``). Linear
    (``"bilinear"``) or nearest-neighbour (``"nearest"``) interpolation, or an integer spline order; zero outside.
    MONAI's ``SpatialResample`` does it: the destination grid placed in the source's world is ``matrix @ dst_affine``.
    """
    a = torch.as_tensor(array.detach().cpu() if isinstance(array, torch.Tensor) else np.asarray(array))
    squeeze = a.ndim == 3
    channels = (a[None] if squeeze else a).float() if not a.is_floating_point() else (a[None] if squeeze else a)
    world = np.eye(4) if matrix is None else np.asarray(matrix, np.float64)
    source = MetaTensor(channels, affine=torch.as_tensor(np.asarray(src_affine, np.float64)))
    out = _resampler()(
        source,
        dst_affine=torch.as_tensor(world @ np.asarray(dst_affine, np.float64)),
        spatial_size=tuple(int(s) for s in dst_shape),
        mode=_mode(mode),
    )
    values = out.as_tensor().numpy()
    return values[0] if squeeze else values


def registration_dice(
    moving_mask: Any,
    reference_mask: Any,
    matrix: Any = None,
    *,
    moving_affine: Any = None,
    reference_affine: Any = None,
) -> float:
    """Dice of the moving mask carried onto the reference grid by ``matrix`` (see ``register_affine``) and the
    reference mask: how well the two foregrounds (e.g. brains) overlap after registration (1.0 = perfectly)."""
    from .metrics import dice

    a_mov = _affine_of(moving_mask, moving_affine, "moving_mask")
    a_ref = _affine_of(reference_mask, reference_affine, "reference_mask")
    ref = _as_volume(reference_mask) > 0
    warped = resample_affine(_as_volume(moving_mask).astype(np.float32) > 0, a_mov, a_ref, ref.shape, matrix, "nearest")
    return dice(warped > 0, ref)


# ---------------------------------------------------------------------------------------------------------
# reference


def _is_off(value: Any) -> bool:
    return (
        value is None
        or value is False
        or (isinstance(value, str) and value.strip().lower() in ("", "none", "null", "off"))
    )


def reference_image(
    dataset_dir: str | os.PathLike,
    image_pattern: str = "{id}.nii.gz",
    mask_pattern: str | None = None,
    reference: str | os.PathLike | None = None,
    reference_mask: str | os.PathLike | None = None,
) -> tuple[str | None, str | None]:
    """The reference image (and its mask) the cohort is registered to: ``(image path, mask path or None)``.

    ``reference`` is, in this order: ``None`` / ``""`` / ``"off"`` (no registration: ``(None, None)``, and the
    dataset folder is not looked at), the path of an image file (or DICOM folder), ``"first"`` (the first subject
    of the cohort by id) or a subject id of the cohort. A subject of the cohort brings its mask when
    ``mask_pattern`` matches one; ``reference_mask`` (a path) overrides the mask in every case.

    Raises:
        FileNotFoundError: ``reference`` is neither an existing path nor a subject of the cohort.
    """
    if _is_off(reference):
        return None, None
    mask = None if _is_off(reference_mask) else str(reference_mask)
    if mask is not None and not Path(mask).expanduser().exists():
        raise FileNotFoundError(f"registration reference mask {mask!r} does not exist")
    candidate = Path(str(reference)).expanduser()
    if candidate.exists() and (candidate.is_file() or str(reference) != "first"):
        return str(candidate), mask
    subjects, _ = find_subjects(dataset_dir, image_pattern, mask_pattern)
    if not subjects:
        raise FileNotFoundError(
            f"registration reference {reference!r}: no subjects in {dataset_dir} matching {image_pattern!r}"
        )
    if str(reference) == "first":
        chosen = subjects[0]
    else:
        found = [s for s in subjects if s["subject"] == str(reference)]
        if not found:
            raise FileNotFoundError(
                f"registration reference {reference!r} is neither an existing file nor a subject of {dataset_dir} "
                f"(subjects: {', '.join(s['subject'] for s in subjects[:5])}{', ...' if len(subjects) > 5 else ''})"
            )
        chosen = found[0]
    return chosen["image"], mask if mask is not None else chosen.get("mask")


def reference_fingerprint(files: Sequence[str | None] | None) -> dict[str, str] | None:
    """What identifies the reference for ``run.json`` and the token cache: paths and a digest of the content."""
    from .token_cache import file_digest

    if not files or files[0] is None:
        return None
    image, mask = files[0], files[1] if len(files) > 1 else None
    digest = hashlib.sha256(file_digest(image).encode())
    if mask:
        digest.update(file_digest(mask).encode())
    return {"image": str(image), "mask": str(mask or ""), "sha256": digest.hexdigest()}


# ---------------------------------------------------------------------------------------------------------
# transform


class AffineRegisterd(MapTransform, InvertibleTransform):
    """Register the subject to a reference image and resample ``keys`` onto the reference grid; invertible.

    The image under ``image_key`` (with the mask under ``mask_key`` when both it and a reference mask exist) is
    registered once per call with ``register_affine``; every key is then resampled onto the reference grid
    (``modes``: ``"bilinear"`` for images, ``"nearest"`` for masks) by MONAI's ``SpatialResample`` (the reference
    grid placed in the subject's world, ``matrix @ A_reference``) and returned as a ``MetaTensor`` with the
    reference affine. Each key's ``applied_operations`` gets the resampler's record and then one of this
    transform's, holding the world matrix (reference -> subject, RAS mm), the key's original spatial shape and,
    when masks are available, the Dice of the registered mask with the reference mask (``dice_to_reference``).
    ``inverse`` places a tensor on the reference grid in the subject's world again and lets the resampler's own
    ``inverse`` bring it back onto the subject's grid, so ``Invertd`` over a ``Compose`` that holds this
    transform works.

    With ``reference`` ``None`` or ``""`` the transform is disabled: data pass unchanged, and an identity
    record is still pushed (and popped by ``inverse``) so the ``Compose`` history stays one record per
    invertible transform.

    Matrices are cached per input content (image, mask and affine), so preprocessing a subject again (the
    cohort runner does, to write its results) does not register it again. The reference subject itself is
    mapped by the identity.

    Args:
        keys: keys to resample, e.g. ``["image", "mask"]``.
        reference: path of the reference image (any format ``LoadImage`` reads), or ``None`` / ``""`` (off).
        reference_mask: path of the reference's mask (label > 0 is inside), optional.
        image_key: key of the image to register (default: the first of ``keys``).
        mask_key: key of the subject's mask.
        modes: interpolation per key (``"bilinear"``, ``"nearest"`` or a spline order).
        min_dice: log a warning when the registered mask overlaps the reference mask less than this.
        register_kwargs: more arguments for ``register_affine`` (``min_spacing``, ``iterations``, ``samples``, ...).
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference: str | os.PathLike | None = None,
        reference_mask: str | os.PathLike | None = None,
        image_key: str | None = None,
        mask_key: str = "mask",
        modes: Sequence[str | int] | str | int = ("bilinear", "nearest"),
        min_dice: float = 0.8,
        register_kwargs: Mapping[str, Any] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.reference = None if _is_off(reference) else str(reference)
        self.reference_mask = None if _is_off(reference_mask) else str(reference_mask)
        self.image_key = image_key or self.keys[0]
        self.mask_key = mask_key
        self.modes = ensure_tuple_rep(modes, len(self.keys))
        for mode in self.modes:
            _mode(mode)
        self.resampler = _resampler()
        self.min_dice = min_dice
        self.register_kwargs = dict(register_kwargs or {})
        self._ref: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.reference is not None

    def _load_reference(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(image (X, Y, Z), affine (4, 4) RAS, mask or None)`` of the reference, loaded once."""
        if self._ref is None:
            loader = LoadImage(image_only=True, ensure_channel_first=True)
            try:
                image = loader(self.reference)
            except Exception as err:
                raise CohortInputError(f"registration reference {self.reference}: cannot be read ({err})") from err
            if image.ndim != 4 or image.shape[0] != 1:
                raise CohortInputError(
                    f"registration reference {self.reference}: not one 3D volume (shape {tuple(image.shape)})"
                )
            affine = image.affine.numpy().astype(np.float64)
            mask = None
            if self.reference_mask is not None:
                m = loader(self.reference_mask)
                if tuple(m.shape[1:]) != tuple(image.shape[1:]) or not np.allclose(m.affine.numpy(), affine, atol=1e-3):
                    raise CohortInputError(
                        f"registration reference mask {self.reference_mask}: not on the grid of {self.reference}"
                    )
                mask = m.as_tensor()[0].numpy() > 0
                if not mask.any():
                    raise CohortInputError(f"registration reference mask {self.reference_mask}: empty")
            self._ref = (image.as_tensor()[0].numpy().astype(np.float32), affine, mask)
        return self._ref

    def _matrix(self, image: torch.Tensor, mask: torch.Tensor | None, affine: np.ndarray) -> np.ndarray:
        ref_image, ref_affine, ref_mask = self._load_reference()
        name = source_name(image, "")
        if name and self.reference and os.path.abspath(name) == os.path.abspath(self.reference):
            return np.eye(4)  # the reference subject itself
        moving = _as_volume(image).astype(np.float32)
        moving_mask = _as_volume(mask) > 0 if mask is not None else None
        digest = hashlib.sha256(np.ascontiguousarray(moving).tobytes())
        digest.update(np.ascontiguousarray(affine).tobytes())
        if moving_mask is not None:
            digest.update(np.packbits(moving_mask).tobytes())
        key = digest.hexdigest()
        if key not in self._cache:
            tick = time.perf_counter()
            try:
                self._cache[key] = register_affine(
                    moving,
                    ref_image,
                    moving_mask if ref_mask is not None else None,
                    ref_mask,
                    moving_affine=affine,
                    fixed_affine=ref_affine,
                    **self.register_kwargs,
                )
            except RegistrationError as err:
                raise CohortInputError(f"{source_name(image)}: {err} (reference {self.reference})") from err
            logger.info("registered %s to %s in %.1f s", source_name(image), self.reference, time.perf_counter() - tick)
            while len(self._cache) > 4096:
                self._cache.popitem(last=False)
        return self._cache[key]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if not self.enabled:
            for key in self.key_iterator(d):
                if isinstance(d[key], MetaTensor):
                    d[key] = self.push_transform(d[key], extra_info={"registered": False})
            return d
        image = d[self.image_key]
        moving_affine = _affine_of(image, None, source_name(image))
        mask = d.get(self.mask_key)
        matrix = self._matrix(image, mask, moving_affine)
        _, ref_affine, ref_mask = self._load_reference()
        ref_shape = self._ref[0].shape
        dice_value = None
        if mask is not None and ref_mask is not None:
            dice_value = registration_dice(mask, ref_mask, matrix, reference_affine=ref_affine)
            if dice_value < self.min_dice:
                logger.warning(
                    "%s: registered mask overlaps the reference mask poorly (Dice %.3f); the registration may have failed",
                    source_name(image),
                    dice_value,
                )
        placed = torch.as_tensor(matrix @ ref_affine)  # the reference grid, placed in the subject's world
        for key, mode in self.key_iterator(d, self.modes):
            img = d[key]
            if not isinstance(img, MetaTensor):
                img = MetaTensor(torch.as_tensor(img), affine=torch.as_tensor(moving_affine))
            orig_size = tuple(int(s) for s in img.shape[1:])
            out = self.resampler(
                img if img.is_floating_point() else img.float(),
                dst_affine=placed,
                spatial_size=ref_shape,
                mode=_mode(mode),
            )
            if key == self.mask_key and not bool((out > 0.5).any()):
                raise CohortInputError(
                    f"{source_name(image)}: after registration to {self.reference} the mask lies outside the reference grid"
                )
            out.affine = torch.as_tensor(ref_affine, dtype=torch.float64)  # ... and named in the reference's world
            extra = {
                "registered": True,
                "matrix": torch.as_tensor(matrix, dtype=torch.float64),
                "reference": self.reference,
                "dice_to_reference": dice_value,
            }
            d[key] = self.push_transform(out, orig_size=orig_size, extra_info=extra)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in [k for k in self.keys if k in d]:  # e.g. only the heat map, under the image's key
            img = d[key]
            if not isinstance(img, MetaTensor):
                continue
            record = self.pop_transform(img)
            info = record.get(TraceKeys.EXTRA_INFO, {})
            if not info.get("registered", False):
                continue
            img.affine = torch.as_tensor(np.asarray(info["matrix"], np.float64)) @ img.affine.double()
            d[key] = self.resampler.inverse(img)  # back onto the subject's grid, with its own affine
        return d
