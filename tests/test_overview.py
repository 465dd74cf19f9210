"""The overview must centre on the hottest region, draw in radiological convention and write a real PNG."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from scripts.overview import _slices, save_overview

SHAPE = (48, 56, 40)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _planted(seed: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Noise image and noise heat map with a gaussian blob plus a brighter single hot voxel elsewhere."""
    rng = np.random.default_rng(seed)
    centre = tuple(int(rng.integers(8, n - 8)) for n in SHAPE)
    grid = np.indices(SHAPE)
    blob = np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre)) / (2 * 3.0**2))
    heat = 0.3 * rng.random(SHAPE) + blob
    outlier = tuple((c + n // 2) % n for c, n in zip(centre, SHAPE))
    heat[outlier] = 5.0
    return rng.normal(1.0, 0.2, SHAPE), heat, centre


@pytest.mark.parametrize("seed", [0, 1])
def test_picks_the_planted_hot_spot_and_writes_a_png(tmp_path, seed):
    image, heat, centre = _planted(seed)
    mask = heat > 0.8
    path = tmp_path / "sub" / "overview.png"
    point = save_overview(image, heat, path, spacing=(1.0, 1.2, 2.0), title="subject", flagged=mask)
    assert all(isinstance(i, int) for i in point)
    assert np.abs(np.subtract(point, centre)).max() <= 2
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["overview.png"]


def test_overwrites_atomically_and_leaves_pyplot_alone(tmp_path):
    backend = matplotlib.get_backend()
    image, heat, _ = _planted(2)
    path = tmp_path / "overview.png"
    path.write_bytes(b"old")
    save_overview(image, heat, path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in tmp_path.iterdir()] == ["overview.png"]
    assert matplotlib.get_backend() == backend


def test_handles_heat_without_positive_values(tmp_path):
    image, _, _ = _planted(3)
    path = tmp_path / "flat.png"
    save_overview(image, np.zeros(SHAPE), path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError):
        save_overview(np.zeros(SHAPE), np.zeros((4, 4, 4)), tmp_path / "x.png")
    with pytest.raises(ValueError):
        save_overview(np.zeros(SHAPE), np.zeros(SHAPE), tmp_path / "x.png", flagged=np.zeros((4, 4, 4)))


def test_slices_follow_radiological_convention():
    volume = np.zeros(SHAPE)
    volume[-1, -1, -1] = 1.0  # patient right, anterior, superior corner
    axial, coronal, sagittal = _slices(volume, (SHAPE[0] - 1, SHAPE[1] - 1, SHAPE[2] - 1), (1.0, 2.0, 3.0))
    # With origin="lower", row -1 is the top of the screen and column 0 its left edge.
    assert axial["data"][-1, 0] == 1.0  # right on the left, anterior up
    assert coronal["data"][-1, 0] == 1.0  # right on the left, superior up
    assert sagittal["data"][-1, 0] == 1.0  # anterior on the left, superior up
    assert axial["cross"] == (0, SHAPE[1] - 1)
    assert (axial["aspect"], coronal["aspect"], sagittal["aspect"]) == (2.0, 3.0, 1.5)
