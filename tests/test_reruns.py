"""Re-runs do only what changed: the token cache (encoding) and up-to-date results (writing)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import pytest
import torch

from helpers import PHANTOM, TINY_VIT_SETTINGS, run_in_process, tiny_vit, write_nifti
from scripts.outputs import subject_files
from scripts.phantoms import make_phantom_cohort
from scripts.token_cache import TokenCache, token_fingerprint
from scripts.tokenizer import MultiAxisTokenizer


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    return make_phantom_cohort(
        tmp_path_factory.mktemp("cohort"), n_subjects=4, shape=(40, 48, 40), spacing=3.5, n_lesion_free=1, seed=3
    )


def _link_cohort(records: list[dict], folder: Path) -> Path:
    """A dataset folder holding the given subjects (symlinks: the same content under another path)."""
    for r in records:
        (folder / r["subject"]).mkdir(parents=True, exist_ok=True)
        for key in ("image", "mask"):
            target = folder / r["subject"] / Path(r[key]).name
            if not target.exists():
                os.symlink(r[key], target)
    return folder


def _run(data: Path, out: Path, cache: Path, **overrides) -> dict:
    run_in_process(
        dataset_dir=str(data),
        output_dir=str(out),
        cache_dir=str(cache),
        overwrite=True,
        **PHANTOM,
        **TINY_VIT_SETTINGS,
        **overrides,
    )
    return json.loads((out / "run.json").read_text())


def _stamps(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("sub-*")}


def test_rerun_encodes_and_writes_only_what_changed(records, tmp_path):
    data, out, cache = _link_cohort(records[:3], tmp_path / "data"), tmp_path / "out", tmp_path / "cache"
    first = _run(data, out, cache)
    assert first["token_cache"] == {**first["token_cache"], "hits": 0, "misses": 3}
    assert first["subjects_kept"] == 0 and len(first["results"]) == 3
    stamps, scores_csv = _stamps(out), (out / "scores.csv").read_text()

    # nothing changed: nothing is encoded, nothing is written, the same scores are reported
    second = _run(data, out, cache)
    assert second["token_cache"]["hits"] == 3 and second["token_cache"]["misses"] == 0
    assert second["subjects_kept"] == 3
    assert _stamps(out) == stamps and (out / "scores.csv").read_text() == scores_csv

    # a damaged result is noticed and written again, identical to the first
    damaged = subject_files(out, records[1]["subject"])["anomaly"]
    good = damaged.read_bytes()
    damaged.write_bytes(b"not a heat map")
    third = _run(data, out, cache)
    assert third["subjects_kept"] == 2 and damaged.read_bytes() == good

    # a scoring setting changed: tokens are reused, every result is written again
    fourth = _run(data, out, cache, threshold_value=2.0)
    assert fourth["token_cache"]["hits"] == 3 and fourth["subjects_kept"] == 0
    assert fourth["threshold"]["score"] != first["threshold"]["score"]

    # a subject added: only it is encoded; the others' scores change (a new cohort), so all are written
    _link_cohort(records, data)
    fifth = _run(data, out, cache, threshold_value=2.0)
    assert fifth["token_cache"]["hits"] == 3 and fifth["token_cache"]["misses"] == 1
    assert fifth["subjects_kept"] == 0 and len(fifth["results"]) == 4
    assert nib.load(subject_files(out, records[3]["subject"])["anomaly"]).shape == nib.load(records[3]["image"]).shape


def _subject(folder: Path, value: float) -> dict[str, str]:
    image = torch.zeros(8, 8, 8)
    image[2:6, 2:6, 2:6] = value
    return {"subject": "s", "image": str(write_nifti(folder / "image.nii.gz", image.numpy()))}


def test_any_override_of_the_preprocessing_is_a_cache_miss(records, tmp_path):
    """Not only the keys mirrored in `settings`: a config path override changes the tokens, so it must miss."""
    data, cache = _link_cohort(records[:3], tmp_path / "data"), tmp_path / "cache"
    first = _run(data, tmp_path / "first", cache)
    again = _run(data, tmp_path / "again", cache)
    assert again["token_cache"]["hits"] == 3
    changed = _run(data, tmp_path / "changed", cache, **{"preprocessing#transforms#11#upper": 60.0})
    assert changed["token_cache"]["hits"] == 0 and changed["token_cache"]["misses"] == 3
    assert changed["threshold"]["score"] != pytest.approx(first["threshold"]["score"])


def test_bundle_root_is_the_bundle_folder_wherever_the_run_starts(monkeypatch):
    """Model Zoo layout: `cd bundle && python -m monai.bundle run --config_file configs/inference.json` finds
    `bundle/models`, as a run from the repository root does."""
    from monai.bundle import ConfigParser

    from helpers import INFERENCE, ROOT

    for cwd in (ROOT / "bundle", ROOT):
        monkeypatch.chdir(cwd)
        parser = ConfigParser()
        parser.read_config(str(INFERENCE))
        assert parser.get_parsed_content("models_dir") == str(ROOT / "bundle" / "models")


def test_cache_key_follows_content_and_token_settings_only(tmp_path):
    network = MultiAxisTokenizer(tiny_vit(), slice_depth=8, proj_dim=16)
    settings = {"grid_size": 32, "slice_depth": 8, "alpha": 0.3, "matching": "window"}
    base = TokenCache(tmp_path, token_fingerprint(settings, network))
    subject = _subject(tmp_path / "a", 1.0)
    same_content = _subject(tmp_path / "b", 1.0)
    other_content = _subject(tmp_path / "c", 2.0)
    assert base.key(subject) == base.key(same_content)  # content, not file names
    assert base.key(subject) != base.key(other_content)
    scoring_only = TokenCache(tmp_path, token_fingerprint({**settings, "alpha": 0.5, "matching": "global"}, network))
    assert scoring_only.key(subject) == base.key(subject)
    token_shaping = TokenCache(tmp_path, token_fingerprint({**settings, "grid_size": 64}, network))
    assert token_shaping.key(subject) != base.key(subject)
    other_projection = TokenCache(
        tmp_path, token_fingerprint(settings, MultiAxisTokenizer(tiny_vit(), slice_depth=8, proj_dim=12))
    )
    assert other_projection.key(subject) != base.key(subject)


def test_no_fingerprint_before_the_weights_are_loaded(tmp_path):
    """A pretrained backbone whose weights are not loaded yet cannot key the cache (its tokens would be a random
    network's); the fingerprint is computed at the first look-up, after the encoder started and loaded them."""
    from scripts.backbones import create_backbone

    network = MultiAxisTokenizer(
        create_backbone(
            "dinov2_vits14", img_size=28, num_blocks=2, backbone_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 2}
        )
    )
    cache = TokenCache(tmp_path, lambda: token_fingerprint({}, network))  # lazy: building the cache is fine
    with pytest.raises(RuntimeError, match="weights are not loaded"):
        cache.key(_subject(tmp_path, 1.0))


def test_cache_round_trip_and_damaged_entries(tmp_path):
    cache = TokenCache(tmp_path / "cache", {"grid_size": 32})
    subject = _subject(tmp_path, 1.0)
    entry = {"tokens": torch.randn(6, 2, 2, 2), "valid": torch.rand(2, 2, 2) > 0.5}
    assert cache.load(subject) is None
    cache.save(subject, entry)
    loaded = cache.load(subject)
    torch.testing.assert_close(loaded["tokens"], entry["tokens"], rtol=0, atol=0)
    assert torch.equal(loaded["valid"], entry["valid"])
    cache.path(subject).write_bytes(b"truncated")
    assert cache.load(subject) is None  # a damaged entry is a miss, not a failure
    assert TokenCache("", {}).load(subject) is None  # disabled
    cache.save(subject, entry)
    judged = TokenCache(
        tmp_path / "cache", {"grid_size": 32}, validate=lambda e: "wrong" if e["tokens"].shape[0] != 5 else None
    )
    assert judged.load(subject) is None  # an entry the run cannot use is a miss too


def test_inputs_are_hashed_once_per_file_version(tmp_path, monkeypatch):
    import scripts.token_cache as token_cache

    hashed = []
    real = token_cache.file_digest
    monkeypatch.setattr(token_cache, "file_digest", lambda path: hashed.append(str(path)) or real(path))
    cache = TokenCache(tmp_path / "cache", {})
    subject = _subject(tmp_path, 1.0)
    first = cache.key(subject)
    cache.load(subject)
    cache.save(subject, {"tokens": torch.zeros(1)})
    cache.input_digests(subject)
    assert hashed == [subject["image"]] and cache.key(subject) == first
    os.utime(subject["image"], ns=(0, 0))  # another version of the file (here: same content, new time)
    assert cache.key(subject) == first and len(hashed) == 2


def test_preprocessing_workers_change_nothing_but_where_the_work_is_done(records, tmp_path):
    """``num_workers`` processes preprocess while the network encodes: same tokens, same results, and a subject that
    fails in a worker is reported like one that fails in the main process."""
    data = _link_cohort(records[:3], tmp_path / "data")
    (data / "broken").mkdir()
    (data / "broken" / "broken_flair.nii.gz").write_bytes(b"not an image")
    (data / "broken" / "broken_brainmask.nii.gz").write_bytes(b"not a mask")
    reports = {
        workers: _run(data, tmp_path / f"out{workers}", tmp_path / f"cache{workers}", num_workers=workers)
        for workers in (0, 2)
    }
    assert reports[0]["threshold"] == reports[2]["threshold"]
    assert [p.split(":")[0] for p in reports[0]["problems"]] == [p.split(":")[0] for p in reports[2]["problems"]] != []
    for r in records[:3]:
        a, b = (nib.load(subject_files(tmp_path / f"out{w}", r["subject"])["anomaly"]).get_fdata() for w in (0, 2))
        assert (a == b).all()
