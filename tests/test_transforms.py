"""Pre- and postprocessing as configured in ``configs/inference.json``: the round trip back to the input's grid,
bad inputs that name their file, and the custom transforms on their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Orientationd
from scipy import ndimage

from helpers import LPS_AFFINE, ellipsoid, write_nifti
from scripts.postprocessing import ThresholdFromKeyd, in_memory, upsample_scores
from scripts.transforms import CohortInputError, EnsureMaskd, MaskedPercentileNormalized, ValidateVolumed

CONFIG = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "inference.json"
GRID = 32
TOKEN = 8  # token size on the 32^3 grid (4^3 tokens)
SHAPE = (40, 48, 24)  # voxels of 1.2 x 1.0 x 2.0 mm, LPS
MASK = ellipsoid(SHAPE, (20, 22, 12), (15, 18, 9))


def _parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser["grid_size"] = GRID
    for key, value in overrides.items():
        parser[key] = value
    return parser


@pytest.fixture(scope="module")
def pipelines():
    parser = _parser(intensity_percentiles=[0.0, 100.0])  # no clipping: a planted spot stays the unique maximum
    return parser.get_parsed_content("preprocessing"), in_memory(parser.get_parsed_content("postprocessing"))


@pytest.fixture(scope="module")
def preprocessing():
    return _parser().get_parsed_content("preprocessing")


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(100, 5, SHAPE) * MASK + rng.normal(0, 1, SHAPE)).astype(np.float32)


def _write_subject(directory: Path, image: np.ndarray, mask: np.ndarray | None = MASK) -> dict[str, str]:
    subject = {"subject": "s", "image": str(write_nifti(directory / "s.nii.gz", image))}
    if mask is not None:
        subject["mask"] = str(write_nifti(directory / "s_mask.nii.gz", mask.astype(np.uint8)))
    return subject


def _innermost(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _to_voxel(affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    return (np.linalg.inv(affine) @ np.append(world, 1.0))[:3]


def test_preprocessing_output(tmp_path, preprocessing):
    data = preprocessing(_write_subject(tmp_path, _image()))
    image, mask = data["image"], data["mask"]
    assert image.shape == mask.shape == (1, GRID, GRID, GRID)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert set(torch.unique(mask.as_tensor()).tolist()) == {0.0, 1.0}
    affine = image.affine.numpy()
    assert np.all(np.diag(affine)[:3] > 0) and np.allclose(affine[:3, :3], np.diag(np.diag(affine)[:3]))  # RAS
    # the crop is tight around the mask: it touches every face of the grid
    inside = mask.as_tensor()[0] > 0
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = inside.any(dim=other[1]).any(dim=other[0])
        assert profile[0] and profile[-1]
    # the original-space copy of the mask, for the writing pass
    assert "original" not in data and data["foreground"].shape == (1, *SHAPE)
    np.testing.assert_array_equal(data["foreground"].as_tensor()[0].numpy() > 0, MASK)


def test_round_trip_back_to_the_input_grid(tmp_path, pipelines):
    preprocessing, postprocessing = pipelines
    data = preprocessing(_write_subject(tmp_path, _image()))
    data["anomaly"] = torch.ones(1, GRID // TOKEN, GRID // TOKEN, GRID // TOKEN)
    data["threshold"] = 0.5
    out = postprocessing(data)
    heat, binary = out["anomaly"], out["anomaly_mask"]
    assert isinstance(heat, MetaTensor)
    assert heat.shape == binary.shape == (1, *SHAPE)
    np.testing.assert_allclose(heat.affine.numpy(), LPS_AFFINE, atol=1e-5)
    np.testing.assert_allclose(binary.affine.numpy(), LPS_AFFINE, atol=1e-5)
    h = heat.as_tensor()[0].numpy()
    assert np.all(h[~MASK] == 0)
    # deeper than 4 mm inside the mask, nothing of the boundary's interpolation is left
    interior = ndimage.distance_transform_edt(MASK, sampling=(1.2, 1.0, 2.0)) > 4.0
    assert h[interior].min() > 0.99 and h.max() <= 1.0 + 1e-5
    b = binary.as_tensor()[0].numpy()
    assert binary.dtype == torch.uint8
    np.testing.assert_array_equal(b > 0, (h >= 0.5) & (h > 0))
    assert b[interior].all() and not b[~MASK].any()


@pytest.mark.parametrize("token", [(2, 1, 2), (1, 2, 1)])
def test_planted_spot_maps_back_to_its_place(tmp_path, pipelines, token):
    """A high score at the token that holds a bright spot peaks at that spot in the original image."""
    preprocessing, postprocessing = pipelines
    # where the preprocessed grid lies does not depend on the spot (the crop follows the mask): find the
    # original voxel at the centre of ``token``
    probe = preprocessing(_write_subject(tmp_path, _image()))
    pre_affine = probe["image"].affine.numpy()
    centre = np.array(token) * TOKEN + (TOKEN - 1) / 2
    spot = np.round(_to_voxel(LPS_AFFINE, (pre_affine @ np.append(centre, 1.0))[:3])).astype(int)
    assert MASK[tuple(spot)]

    image = _image()
    image[tuple(slice(s - 1, s + 2) for s in spot)] = 400.0
    data = preprocessing(_write_subject(tmp_path, image))
    # the data itself (not only the metadata) puts the spot in that token
    bright = np.array(np.unravel_index(int(data["image"].argmax()), data["image"].shape[1:]))
    assert tuple(bright // TOKEN) == token
    assert np.abs(bright - centre).max() <= 2.5

    scores = torch.zeros(GRID // TOKEN, GRID // TOKEN, GRID // TOKEN)
    scores[token] = 1.0
    data["anomaly"] = scores[None]
    data["threshold"] = 0.5
    h = postprocessing(data)["anomaly"].as_tensor()[0].numpy()
    peak = np.array(np.unravel_index(int(h.argmax()), h.shape))
    voxel_mm = np.array([1.2, 1.0, 2.0])
    assert np.linalg.norm((peak - spot) * voxel_mm) <= 3.0, (peak, spot)
    assert h[tuple(spot)] >= 0.8 * h.max()
    # and nothing hot far away (e.g. at a mirrored position)
    far = np.linalg.norm((np.indices(SHAPE).T - spot).T * voxel_mm[:, None, None, None], axis=0) > 20
    assert h[far].max() < 0.05


def test_preprocessing_without_mask_computes_one(tmp_path, preprocessing):
    data = preprocessing(_write_subject(tmp_path, _image(), mask=None))
    fg = data["foreground"].as_tensor()[0].numpy() > 0
    assert fg.shape == SHAPE
    # noise is N(0, 1) outside, N(100, 5) inside: otsu recovers the ellipsoid
    assert (fg == MASK).mean() > 0.999
    assert data["mask"].shape == (1, GRID, GRID, GRID)


def _bad_input_cases(tmp_path: Path) -> dict[str, tuple[dict[str, str], str, str]]:
    """name -> (subject dict, file the message must name, message fragment)."""
    rng = np.random.default_rng(1)
    cube = rng.random((10, 10, 10)).astype(np.float32)
    nan = cube.copy()
    nan[2, 3, 4] = np.nan
    img = write_nifti(tmp_path / "img.nii.gz", cube)
    cases = {}
    for name, array, fragment in [
        ("flat2d", rng.random((10, 10)).astype(np.float32), "3D volume"),
        ("series4d", rng.random((10, 10, 10, 3)).astype(np.float32), "3 volumes"),
        ("nan", nan, "NaN"),
        ("constant", np.full((10, 10, 10), 7.0, np.float32), "constant"),
    ]:
        path = write_nifti(tmp_path / f"{name}.nii.gz", array)
        cases[name] = ({"image": str(path)}, str(path), fragment)
    shifted = LPS_AFFINE.copy()
    shifted[0, 3] += 5.0
    for name, mask, affine, fragment in [
        ("empty_mask", np.zeros((10, 10, 10), np.uint8), LPS_AFFINE, "empty"),
        ("mask_shape", np.ones((10, 10, 12), np.uint8), LPS_AFFINE, "does not match"),
        ("mask_affine", np.ones((10, 10, 10), np.uint8), shifted, "affine"),
    ]:
        path = write_nifti(tmp_path / f"{name}.nii.gz", mask, affine)
        cases[name] = ({"image": str(img), "mask": str(path)}, str(path), fragment)
    return cases


@pytest.mark.parametrize("case", ["flat2d", "series4d", "nan", "constant", "empty_mask", "mask_shape", "mask_affine"])
def test_bad_inputs_name_the_file(tmp_path, preprocessing, case):
    subject, path, fragment = _bad_input_cases(tmp_path)[case]
    with pytest.raises(Exception) as info:
        preprocessing(subject)
    cause = _innermost(info.value)
    assert isinstance(cause, CohortInputError), repr(cause)
    assert path in str(cause)
    assert fragment in str(cause)


def test_validate_volume_directly():
    t = MetaTensor(torch.rand(1, 5, 5, 1), meta={"filename_or_obj": "/data/thin.nii.gz"})
    with pytest.raises(CohortInputError, match="thin.nii.gz.*not 3D"):
        ValidateVolumed("image")({"image": t})
    inf = torch.rand(1, 5, 5, 5)
    inf[0, 1, 1, 1] = float("inf")
    with pytest.raises(CohortInputError, match="<in-memory image>: 1 voxels"):
        ValidateVolumed("image")({"image": inf})
    ok = {"image": torch.rand(1, 4, 4, 4), "mask": torch.ones(1, 4, 4, 4)}  # a constant mask is fine
    assert ValidateVolumed(["image", "mask"])(ok)["mask"] is ok["mask"]


def _ct_phantom() -> tuple[np.ndarray, np.ndarray]:
    """Air (-1000) around a body (0 HU) with a lung whose airway leaves the body, and a separate table below it."""
    shape = (40, 40, 30)
    body = ellipsoid(shape, (18, 20, 15), (12, 14, 10))
    lung = ellipsoid(shape, (18, 20, 15), (5, 6, 4))
    image = np.full(shape, -1000.0, np.float32)
    image[body] = 0.0
    image[lung] = -900.0
    image[17:20, 19:22, 15:] = -900.0  # airway: opens the lung to the air outside the body in 3D
    image[35:38, 5:35, 3:27] = 50.0  # table: bright but not connected to the body
    image += np.random.default_rng(2).normal(0, 10, shape).astype(np.float32)
    return image, body


def _mr_phantom() -> tuple[np.ndarray, np.ndarray]:
    """Dark background with a bright head, a dark (CSF-like) hole inside it and a small bright blob outside."""
    shape = (36, 36, 36)
    head = ellipsoid(shape, (17, 18, 18), (12, 13, 11))
    ventricle = ellipsoid(shape, (17, 18, 18), (3, 4, 3))
    image = np.where(head, 300.0, 5.0).astype(np.float32)
    image[ventricle] = 5.0
    image[31:34, 31:34, 31:34] = 300.0  # marker capsule
    image += np.random.default_rng(3).normal(0, 3, shape).astype(np.float32)
    return image, head


@pytest.mark.parametrize(("phantom", "threshold"), [(_ct_phantom, -500), (_mr_phantom, "otsu")])
def test_computed_foreground_is_one_component_without_holes(phantom, threshold):
    image, expected = phantom()
    t = MetaTensor(torch.from_numpy(image)[None], meta={"filename_or_obj": "phantom.nii.gz"})
    out = EnsureMaskd(threshold=threshold)({"image": t})
    mask = out["mask"]
    assert isinstance(mask, MetaTensor) and mask.shape == t.shape and mask.dtype == torch.float32
    m = mask.as_tensor()[0].numpy() > 0
    _, count = ndimage.label(m)
    assert count == 1
    np.testing.assert_array_equal(ndimage.binary_fill_holes(m), m)
    assert (m == expected).mean() > 0.99
    assert m[tuple(np.argwhere(expected).mean(0).round().astype(int))]  # the cavity's centre is inside


def test_given_mask_labels_become_binary():
    image = MetaTensor(torch.rand(1, 6, 6, 6))
    labels = torch.zeros(1, 6, 6, 6)
    labels[0, 1:3, 1:3, 1:3] = 2.0
    labels[0, 4, 4, 4] = 1.0
    out = EnsureMaskd()({"image": image, "mask": MetaTensor(labels)})
    np.testing.assert_array_equal(out["mask"].as_tensor().numpy(), (labels > 0).float().numpy())


def test_masked_percentile_normalization():
    rng = np.random.default_rng(4)
    values = rng.gamma(3.0, 50.0, (1, 12, 10, 8)).astype(np.float32)
    mask = np.zeros((1, 12, 10, 8), np.float32)
    mask[0, 2:10, 2:9, 1:7] = 1.0
    affine = torch.tensor(LPS_AFFINE)
    data = {
        "image": MetaTensor(torch.from_numpy(values), affine=affine, meta={"filename_or_obj": "x.nii.gz"}),
        "mask": MetaTensor(torch.from_numpy(mask), affine=affine),
    }
    # gives the image a transform history
    data = Orientationd(["image", "mask"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(data)
    history = [op["class"] for op in data["image"].applied_operations]
    assert history == ["Orientation"]
    out = MaskedPercentileNormalized("image", lower=2.0, upper=98.0)(data)
    img = out["image"]
    assert isinstance(img, MetaTensor)
    assert [op["class"] for op in img.applied_operations] == history
    assert img.meta["filename_or_obj"] == "x.nii.gz"
    torch.testing.assert_close(img.affine, data["image"].affine)
    x = img.as_tensor().numpy()
    inside = data["mask"].as_tensor().numpy() > 0.5
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert np.all(x[~inside] == 0)
    raw = data["image"].as_tensor().numpy()
    lo, hi = np.percentile(raw[inside], [2.0, 98.0])
    np.testing.assert_allclose(x[inside], np.clip((raw[inside] - lo) / (hi - lo), 0, 1), rtol=1e-4, atol=1e-5)
    # about 2 % of the inside voxels clip at each end
    assert 0.01 < (x[inside] == 1.0).mean() < 0.04 and 0.01 < (x[inside] == 0.0).mean() < 0.04
    with pytest.raises(ValueError, match="percentiles"):
        MaskedPercentileNormalized("image", lower=50, upper=10)


def test_upsample_scores_ignores_unscored_tokens():
    scores = torch.full((4, 4, 4), 3.0)
    scores[1, 2, 1] = float("nan")
    up = upsample_scores(scores, (16, 16, 16))
    assert up.shape == (16, 16, 16) and torch.isfinite(up).all()
    torch.testing.assert_close(up, torch.full((16, 16, 16), 3.0))  # neither NaN nor a pull towards zero
    # where only unscored tokens are in reach (here the clamped border of a corner token) the heat is 0
    scores[0, 0, 0] = float("nan")
    up = upsample_scores(scores, (16, 16, 16))
    assert torch.all(up[:2, :2, :2] == 0)
    torch.testing.assert_close(up[2:], torch.full((14, 16, 16), 3.0))
    torch.testing.assert_close(upsample_scores(torch.full((2, 2, 2), float("nan")), (4, 4, 4)), torch.zeros(4, 4, 4))
    ramp = torch.arange(4.0).view(4, 1, 1).expand(4, 2, 2)
    up = upsample_scores(ramp, (8, 4, 4))
    assert torch.all(up[1:] >= up[:-1])  # monotone, as the token scores
    torch.testing.assert_close(up[0], torch.zeros(4, 4))
    torch.testing.assert_close(up[-1], torch.full((4, 4), 3.0))


def test_mask_outside_and_threshold():
    """The postprocessing's masking step (MONAI's MaskIntensityd, as the config uses it) and the threshold."""
    from monai.transforms import MaskIntensityd

    heat = torch.tensor([[[[0.0, 0.2], [0.6, 0.9]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]])
    out = MaskIntensityd("anomaly", mask_key="foreground")({"anomaly": heat, "foreground": mask})
    torch.testing.assert_close(out["anomaly"], torch.tensor([[[[0.0, 0.2], [0.0, 0.9]]]]))
    flagged = ThresholdFromKeyd("anomaly")({"anomaly": out["anomaly"], "threshold": 0.0})["anomaly_mask"]
    assert flagged.dtype == torch.uint8
    assert flagged.tolist() == [[[[0, 1], [0, 1]]]]  # zero heat (outside the mask) is never flagged
    flagged = ThresholdFromKeyd("anomaly")({"anomaly": out["anomaly"], "threshold": 0.5})["anomaly_mask"]
    assert flagged.tolist() == [[[[0, 0], [0, 1]]]]


def test_writing_pass_preprocesses_nothing_and_maps_back_as_the_full_preprocessing(tmp_path):
    """The writing pass inverts from the geometry the encoding pass kept (also when it comes back from the token
    cache): no subject is loaded or preprocessed twice, and the heat map equals the postprocessing of the fully
    preprocessed subject."""
    subject = _write_subject(tmp_path, _image())
    scores = torch.rand(GRID // TOKEN, GRID // TOKEN, GRID // TOKEN, generator=torch.Generator().manual_seed(0))
    maps = []
    for run in ("encoded", "cached"):
        parser = _parser(
            dataset_dir=str(tmp_path),
            output_dir=str(tmp_path / "out"),
            cache_dir=str(tmp_path / "cache"),
            backbone="intensity",
            progress=False,
            write_overview=False,
        )
        parser["backbone_kwargs"] = {"patch_size": TOKEN, "reduce": 2}
        parser["slice_depth"] = TOKEN
        evaluator = parser.get_parsed_content("evaluator")
        dataset = evaluator.encoder.data_loader.dataset
        preprocessing, calls = dataset.transform, []
        dataset.transform = lambda d, calls=calls, preprocessing=preprocessing: calls.append(1) or preprocessing(d)
        [encoded] = evaluator.encoder.encode([subject])
        assert encoded.from_cache == (run == "cached") and calls == ([1] if run == "encoded" else [])
        maps.append(evaluator.heat_maps(encoded, scores, threshold=0.5))
        assert len(calls) <= 1, "the writing pass preprocessed the subject again"
    full = preprocessing(dict(subject))
    full.update(anomaly=scores[None], threshold=0.5)
    expected = in_memory(evaluator.postprocessing)(full)  # to the input's space, masked, thresholded
    for got in maps:
        np.testing.assert_array_equal(got["anomaly"].as_tensor().numpy(), expected["anomaly"].as_tensor().numpy())
        np.testing.assert_array_equal(
            got["anomaly_mask"].as_tensor().numpy(), expected["anomaly_mask"].as_tensor().numpy()
        )
        np.testing.assert_allclose(got["anomaly"].affine, expected["anomaly"].affine)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))  # heat_maps writes nothing
