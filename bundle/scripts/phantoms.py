"""Procedural FLAIR-like brain phantoms with planted lesions, so the demo runs without downloaded data.

Each subject is built in one RAS world grid (same for the whole cohort), so anatomy and lesion
coordinates agree in world space; it is then stored in a subject-specific on-disk orientation to
exercise the pipeline's reorientation. The whole head scales with the field of view (shape * spacing);
at the default shape and spacing lesion radii are about 3-12 mm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

from .outputs import atomic_path
from .token_cache import file_digest, files_intact

# Tissue labels and their FLAIR-like intensities (white matter is the reference for lesion contrast).
BACKGROUND, SCALP, SKULL, CSF, GM, WM, NUCLEI = range(7)
INTENSITY = np.array([0.0, 0.9, 0.05, 0.1, 0.75, 0.6, 0.7], dtype=np.float32)

DEFAULT_FOV_MM = np.array([144.0, 168.0, 144.0])  # default shape (96, 112, 96) at 1.5 mm
ORIENTATIONS = ("RAS", "LPS", "LAS", "PSR")  # cycled through the subjects for on-disk storage
MANIFEST_VERSION = 1  # bump when the generator changes what a seed produces
FILE_KEYS = ("image", "mask", "label")

# Deep grey nuclei (centre, semi-axes) for the right hemisphere, in brain-normalised coordinates;
# mirrored to the left. Roughly thalamus, lentiform nucleus and caudate head.
_NUCLEI = (
    ((0.13, -0.14, -0.12), (0.11, 0.17, 0.14)),
    ((0.30, 0.08, -0.05), (0.08, 0.20, 0.15)),
    ((0.18, 0.25, 0.05), (0.07, 0.12, 0.12)),
)


def make_phantom_cohort(
    out_dir: str | Path,
    n_subjects: int = 8,
    shape: tuple[int, int, int] = (96, 112, 96),
    spacing: float = 1.5,
    n_lesion_free: int = 1,
    seed: int = 0,
) -> list[dict]:
    """Write `n_subjects` phantoms (FLAIR, brain mask, lesion mask) under `out_dir/sub-XX/`.

    The last `n_lesion_free` subjects have no lesions. Lesions sit at different world positions in
    different subjects, because the detector scores each subject against the others. A cohort already
    written with the same parameters (`out_dir/cohort.json`, files unchanged) is reused, not rewritten.
    """
    if n_subjects < 1 or not 0 <= n_lesion_free <= n_subjects:
        raise ValueError(
            f"need n_subjects >= 1 and 0 <= n_lesion_free <= n_subjects, got {n_subjects=} {n_lesion_free=}"
        )
    parameters = {
        "version": MANIFEST_VERSION,
        "n_subjects": n_subjects,
        "shape": list(shape),
        "spacing": spacing,
        "n_lesion_free": n_lesion_free,
        "seed": seed,
    }
    out_dir = Path(out_dir)
    manifest = out_dir / "cohort.json"
    records = _reusable(out_dir, manifest, parameters)
    if records is None:
        records = _write_cohort(out_dir, n_subjects, shape, spacing, n_lesion_free, seed)
        files = [Path(r[key]) for r in records for key in FILE_KEYS]
        stored = [{**r, **{key: Path(r[key]).relative_to(out_dir).as_posix() for key in FILE_KEYS}} for r in records]
        digests = {f.relative_to(out_dir).as_posix(): file_digest(f) for f in files}
        with atomic_path(manifest) as tmp:
            tmp.write_text(json.dumps({"parameters": parameters, "subjects": stored, "digests": digests}, indent=1))
    return records


def _reusable(out_dir: Path, manifest: Path, parameters: dict) -> list[dict] | None:
    """The records of an intact cohort written earlier into ``out_dir`` with these parameters, else None."""
    try:
        content = json.loads(manifest.read_text())
        if content["parameters"] != parameters or not files_intact(content["digests"], out_dir):
            return None
        return [{**r, **{key: str(out_dir / r[key]) for key in FILE_KEYS}} for r in content["subjects"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cohort(
    out_dir: Path, n_subjects: int, shape: tuple[int, int, int], spacing: float, n_lesion_free: int, seed: int
) -> list[dict]:
    grid = np.asarray(shape, dtype=int)
    scale = float((grid * spacing).mean() / DEFAULT_FOV_MM.mean())
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (grid - 1) / 2.0
    plan_rng, *subject_rngs = np.random.default_rng(seed).spawn(n_subjects + 1)
    radii = _plan_radii(plan_rng, n_subjects - n_lesion_free, scale)
    width = max(2, len(str(n_subjects)))
    taken: list[tuple[np.ndarray, float]] = []  # (centre_mm, radius) of every lesion in the cohort so far
    records = []
    for i, rng in enumerate(subject_rngs):
        tissue = _anatomy(rng, tuple(shape), spacing, scale)
        brain = _brain_mask(tissue)
        image = ndimage.gaussian_filter(INTENSITY[tissue], 0.5)  # partial-volume edges
        label = np.zeros(shape, dtype=np.uint8)
        lesions = []
        if i < len(radii):
            depth = ndimage.distance_transform_edt(brain, sampling=spacing)
            for radius in radii[i]:
                lesions.append(
                    _plant_lesion(rng, image, label, tissue, brain, depth, float(radius), taken, affine, scale)
                )
        image = _acquire(rng, image)
        sid = f"sub-{i + 1:0{width}d}"
        folder = Path(out_dir) / sid
        folder.mkdir(parents=True, exist_ok=True)
        paths = {
            key: folder / f"{sid}_{suffix}.nii.gz" for key, suffix in zip(FILE_KEYS, ("flair", "brainmask", "lesion"))
        }
        codes = ORIENTATIONS[i % len(ORIENTATIONS)]
        for key, data in (("image", image), ("mask", brain.astype(np.uint8)), ("label", label)):
            stored, stored_affine = _reorient(data, affine, codes)
            _save_nifti(stored, stored_affine, paths[key])
        records.append({"subject": sid, **{k: str(p) for k, p in paths.items()}, "lesions": lesions})
    return records


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance gaussian-filtered noise; wide fields are made coarse and upsampled for speed."""
    step = max(1, int(sigma // 2))
    coarse = tuple(-(-n // step) + 1 for n in shape)
    field = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), sigma / step)
    field = (field - field.mean()) / max(float(field.std()), 1e-6)
    if step > 1:
        field = ndimage.zoom(field, step, order=1)
    return field[tuple(slice(0, n) for n in shape)]


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles (radians) about x, y, z."""
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _template_coords(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: float, scale: float
) -> list[np.ndarray]:
    """Template-space mm coordinates of every voxel: inverse random affine plus a smooth elastic warp."""
    pose = _rotation(np.deg2rad(rng.uniform(-6.0, 6.0, 3))) @ np.diag(1.0 + rng.uniform(-0.06, 0.06, 3))
    inverse = np.linalg.inv(pose).astype(np.float32)
    shift = rng.uniform(-4.0, 4.0, 3) * scale
    world = np.ogrid[tuple(slice(0, n) for n in shape)]
    world = [((w - (n - 1) / 2.0) * spacing - s).astype(np.float32) for w, n, s in zip(world, shape, shift)]
    coords = []
    for row in inverse:
        warp = _smooth_noise(rng, shape, 6.0)
        warp *= 2.5 * spacing / max(float(np.abs(warp).max()), 1e-6)  # peak displacement 2.5 voxels
        coords.append(row[0] * world[0] + row[1] * world[1] + row[2] * world[2] + warp)
    return coords


def _radius(p: list[np.ndarray], semi: Sequence[float], centre: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Ellipsoidal radius: < 1 inside the ellipsoid with these semi-axes and centre."""
    return np.sqrt(sum(((c - o) / s) ** 2 for c, o, s in zip(p, centre, semi)))


def _anatomy(rng: np.random.Generator, shape: tuple[int, int, int], spacing: float, scale: float) -> np.ndarray:
    """Tissue label volume of one subject in the RAS grid."""
    half = np.asarray(shape) * spacing / 2.0
    head = half * np.array([0.86, 0.86, 0.80])
    x, y, z = _template_coords(rng, shape, spacing, scale)
    x = x * (1.0 + 0.08 * y / head[1])  # narrower frontally: the head is not mirror-symmetric front to back
    z = z - 0.04 * half[2]  # head sits a little above the grid centre
    p = [x, y, z]
    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[_radius(p, head) < 1] = SCALP
    tissue[_radius(p, head - 4.0 * scale) < 1] = SKULL
    brain_semi = head - 8.0 * scale
    rb = _radius(p, brain_semi)
    brain = rb < 1
    depth = np.sqrt(x * x + y * y + z * z) * (1.0 - rb) / np.maximum(rb, 1e-3)  # mm to the surface along the ray
    # Folding: sulci follow the zero-sheets of a smooth noise field; CSF fills a narrow wedge and grey
    # matter a wider one, so the cortex lines the sulcal walls.
    fold = np.abs(_smooth_noise(rng, shape, 3.0))
    sulci = scale * (1.0 + 12.0 * np.clip(1.0 - fold / 0.25, 0.0, None))
    cortex = scale * (4.5 + 0.8 * _smooth_noise(rng, shape, 4.0) + 12.0 * np.clip(1.0 - fold / 0.6, 0.0, None))
    tissue[brain] = CSF
    tissue[brain & (depth >= sulci)] = GM
    tissue[brain & (depth >= cortex)] = WM
    q = [c / s for c, s in zip(p, brain_semi)]
    for side in (1.0, -1.0):
        for (cx, cy, cz), semi in _NUCLEI:
            tissue[_radius(q, semi, (side * cx, cy, cz)) < 1] = NUCLEI
        bend = 0.15 - 0.3 * (q[1] / 0.45) ** 2  # lateral ventricles arch over the nuclei
        tissue[_radius([q[0], q[1], q[2] - bend], (0.09, 0.42, 0.12), (side * 0.13, 0.0, 0.0)) < 1] = CSF
    return tissue


def _brain_mask(tissue: np.ndarray) -> np.ndarray:
    """Everything inside the skull, ventricles included."""
    return tissue >= CSF


def _plan_radii(rng: np.random.Generator, n_lesion_subjects: int, scale: float) -> list[np.ndarray]:
    """1-3 lesion radii per lesion subject, with at least one small (<= 4 mm) and one large (>= 10 mm)."""
    if n_lesion_subjects == 0:
        return []
    counts = rng.integers(1, 4, n_lesion_subjects)
    if n_lesion_subjects == 1:
        counts[0] = max(counts[0], 2)  # room for both the small and the large lesion
    radii = rng.uniform(3.0, 12.0, counts.sum())
    radii[0], radii[-1] = rng.uniform(3.0, 4.0), rng.uniform(10.0, 12.0)
    return np.split(radii * scale, np.cumsum(counts)[:-1])


def _plant_lesion(
    rng: np.random.Generator,
    image: np.ndarray,
    label: np.ndarray,
    tissue: np.ndarray,
    brain: np.ndarray,
    depth: np.ndarray,
    radius: float,
    taken: list[tuple[np.ndarray, float]],
    affine: np.ndarray,
    scale: float,
) -> dict:
    """Blend one irregular hyperintense blob into `image`/`label` (in place) and return its description."""
    spacing = affine[0, 0]
    allowed = ((tissue == WM) | (tissue == GM)) & (depth >= 1.35 * radius + 3.0 * scale)
    candidates = np.flatnonzero(allowed)
    if candidates.size == 0:  # tiny or odd grids: fall back to the deepest parenchyma voxel
        candidates = np.array([np.argmax(depth * (tissue >= GM))])
    centre = _pick_centre(rng, candidates, radius, taken, affine, scale, image.shape)
    centre_mm = affine[:3, :3] @ centre + affine[:3, 3]
    taken.append((centre_mm, radius))
    half = int(np.ceil(1.5 * radius / spacing)) + 2
    lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, image.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    offsets = np.ogrid[box]
    dist = np.sqrt(sum(((o - c) * spacing) ** 2 for o, c in zip(offsets, centre)))
    noise = np.clip(_smooth_noise(rng, dist.shape, max(1.0, 0.4 * radius / spacing)), -1.5, 1.5)
    weight = 0.5 * (1.0 - np.tanh((dist - radius * (1.0 + 0.2 * noise)) / (0.75 * spacing))) * brain[box]
    contrast = float(rng.uniform(1.4, 2.2))
    image[box] = image[box] * (1.0 - weight) + contrast * INTENSITY[WM] * weight
    label[box] |= (weight > 0.5).astype(np.uint8)
    return {
        "center_ras_mm": [round(float(c), 3) for c in centre_mm],
        "radius_mm": round(radius, 3),
        "contrast": round(contrast, 3),
    }


def _pick_centre(
    rng: np.random.Generator,
    candidates: np.ndarray,
    radius: float,
    taken: list[tuple[np.ndarray, float]],
    affine: np.ndarray,
    scale: float,
    shape: tuple[int, ...],
) -> np.ndarray:
    """Random candidate voxel whose blob does not overlap earlier lesions in world space (relaxed if crowded)."""
    draws = np.unravel_index(rng.choice(candidates, size=min(512, candidates.size), replace=False), shape)
    draws = np.stack(draws, axis=1)
    if not taken:
        return draws[0]
    centres_mm = draws @ affine[:3, :3].T + affine[:3, 3]
    others = np.array([c for c, _ in taken])
    gaps = np.linalg.norm(centres_mm[:, None, :] - others[None], axis=2)
    needed = 1.3 * (radius + np.array([r for _, r in taken])) + 2.0 * scale
    for relax in (1.0, 0.75, 0.5, 0.25):
        ok = np.flatnonzero((gaps >= relax * needed).all(axis=1))
        if ok.size:
            return draws[ok[0]]
    return draws[np.argmax(gaps.min(axis=1))]


def _acquire(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Scanner effects: smooth multiplicative bias field (+-15 %) and Rician noise (sigma 3 % of WM)."""
    bias = _smooth_noise(rng, image.shape, float(np.mean(image.shape)) / 4.0)
    image = image * (1.0 + 0.15 * bias / max(float(np.abs(bias).max()), 1e-6))
    sigma = 0.03 * INTENSITY[WM]
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


def _reorient(data: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine for storing RAS-grid `data` with axis codes `codes`; world space is unchanged."""
    transform = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), orientations.axcodes2ornt(codes))
    return (
        np.ascontiguousarray(orientations.apply_orientation(data, transform)),
        affine @ orientations.inv_ornt_aff(transform, data.shape),
    )


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write atomically (``outputs.atomic_path``) so readers never see half a file."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
