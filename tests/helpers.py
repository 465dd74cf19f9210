"""Shared builders for the tests: tiny encoders and small NIfTI volumes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from scripts.backbones import create_backbone

TINY_VIT = {"embed_dim": 24, "depth": 2, "num_heads": 2, "patch_size": 8}
# the DINOv2 ViT-S/14 architecture shrunk to stay fast; patch size stays 14 like the real one
TINY_DINOV2 = {"depth": 2, "embed_dim": 48, "num_heads": 2}
# an LPS-oriented affine with anisotropic voxels (1.2 x 1.0 x 2.0 mm) and an offset origin
LPS_AFFINE = np.array(
    [
        [-1.2, 0.0, 0.0, 30.0],
        [0.0, -1.0, 0.0, 25.0],
        [0.0, 0.0, 2.0, -20.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


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
