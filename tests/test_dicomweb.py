"""The MONAI Label app on a real DICOMweb server: Orthanc on loopback, studies uploaded as DICOM series.

What a PACS user does: DICOM series are uploaded (STOW-RS), the app scores one against the series of the same kind
(modality and series description, from the DICOM metadata), a series pushed after start-up is seen within the
refresh period, every failure answers with its reason, and the label is saved back into Orthanc as a DICOM SEG
(what Slicer's Submit and OHIF's save do: ``PUT /datastore/label``), where it sits beside its series.
"""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("monailabel", reason="monailabel is not installed (pip install -r requirements.txt)")
from label_server import REQUEST_TIMEOUT_S, Server, free_port, multipart  # noqa: E402
from orthanc import Orthanc, dicom_series, needs_orthanc  # noqa: E402

from scripts.phantoms import make_phantom_cohort  # noqa: E402

pytestmark = needs_orthanc
FLAIR, T1 = "AX FLAIR", "SAG T1"
INTENSITY = {
    "backbone": "intensity",
    "backbone_kwargs": '{"patch_size":8,"reduce":2}',
    "slice_depth": "8",
    "grid_size": "32",
}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding 4 FLAIR series and 2 T1 series of phantoms (one patient and study each); a third T1 series
    is pushed by a test."""
    from dicomweb_client.api import DICOMwebClient
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("dicomweb")
    records = make_phantom_cohort(
        root / "phantoms", n_subjects=7, shape=(40, 48, 40), spacing=3.5, n_lesion_free=2, seed=6
    )
    server = Orthanc(root / "orthanc", free_port())
    server.wait_ready()
    client = DICOMwebClient(server.dicomweb)
    series = {}

    def upload(record: dict, description: str) -> str:
        image = nib.load(record["image"])
        study, uid = generate_uid(), generate_uid()
        client.store_instances(dicom_series(image, study, uid, description, patient=record["subject"]))
        shape = nib.as_closest_canonical(image).shape  # the series' own voxel order
        series[uid] = {"subject": record["subject"], "description": description, "shape": shape}
        return uid

    for index, description in ((0, FLAIR), (1, FLAIR), (5, FLAIR), (6, FLAIR), (2, T1), (3, T1)):
        upload(records[index], description)  # FLAIR: two subjects with lesions, two without
    try:
        yield {"server": server, "series": series, "upload": upload, "records": records, "root": root}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def app(pacs):
    root = pacs["root"]
    env = {
        "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": '{"Modality":"MR"}',
        "HOME": str(root / "home"),
        "MONAI_LABEL_DATASTORE_CACHE_PATH": str(root / "monailabel_cache"),
    }
    # the intensity backbone: the phantoms' bright lesions are flagged, so there are labels to store
    conf = {**INTENSITY, "cache_dir": str(root / "cs3f_cache"), "datastore_write": "true", "refresh_s": "1"}
    srv = Server(pacs["server"].dicomweb, conf, root / "server.log", env)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _of(pacs, description):
    return sorted(uid for uid, s in pacs["series"].items() if s["description"] == description)


def test_a_series_is_scored_against_the_series_of_its_kind(pacs, app):
    query, flair = _of(pacs, FLAIR)[0], _of(pacs, FLAIR)
    label, params = multipart(app.infer(query), pacs["root"], "label.nii.gz")
    assert nib.load(label).shape == pacs["series"][query]["shape"]
    assert sorted(params["references"]) == sorted(u for u in flair if u != query)  # no T1 series among them
    assert params["reference_rule"] == f"same kind (mr / {FLAIR.lower()})"
    assert set(np.unique(np.asarray(nib.load(label).dataobj))) <= {0, 1, 2}


def test_failures_answer_with_their_reason(pacs, app):
    lonely = app.infer(_of(pacs, T1)[0])  # one other T1 series: too few references
    assert lonely.status_code == 409 and "same kind (mr / sag t1)" in lonely.json()["detail"]
    unknown = app.infer("1.2.3.4.5")
    assert unknown.status_code == 404 and "unknown image id" in unknown.json()["detail"]


def test_a_series_pushed_after_start_up_is_seen(pacs, app):
    time.sleep(1.5)  # past the app's refresh period (--conf refresh_s 1)
    pushed = pacs["upload"](pacs["records"][4], T1)  # a third T1 series: now each T1 has two references
    answer = app.infer(pushed, output="json")
    assert answer.status_code == 200, answer.text[:2000]
    assert sorted(answer.json()["references"]) == [u for u in _of(pacs, T1) if u != pushed]


def _save(app, image_id: str, label) -> requests.Response:
    """What Slicer's Submit and OHIF's save send."""
    with open(label, "rb") as f:
        return requests.put(
            f"{app.url}/datastore/label",
            params={"image": image_id, "tag": "final"},
            files={"label": ("label.nii.gz", f)},
            data={"params": "{}"},
            timeout=REQUEST_TIMEOUT_S,
        )


def test_the_label_is_saved_back_as_dicom_seg(pacs, app):
    labels = {}
    for query in _of(pacs, FLAIR):
        label, _ = multipart(app.infer(query), pacs["root"], f"{query}.nii.gz")
        labels[query] = (label, int(np.count_nonzero(np.asarray(nib.load(label).dataobj))))
    query = max(labels, key=lambda q: labels[q][1])
    assert labels[query][1] > 0, "no FLAIR series has a flagged voxel: nothing to store"
    before = len(pacs["server"].series("SEG"))
    saved = _save(app, query, labels[query][0])
    assert saved.status_code == 200, saved.text[:2000]
    segs = pacs["server"].series("SEG")
    assert len(segs) == before + 1, app.tail()
    study_of = {s["0020000E"]["Value"][0]: s["0020000D"]["Value"][0] for s in pacs["server"].series()}
    assert study_of[query] in {seg["0020000D"]["Value"][0] for seg in segs}, "the SEG lies beside the series it labels"

    empty = pacs["root"] / "empty.nii.gz"
    image = nib.load(labels[query][0])
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), empty)
    refused = _save(app, query, empty)
    assert refused.status_code == 422 and "marks no voxel" in refused.json()["detail"]  # the reason, not a bare 500
    assert len(pacs["server"].series("SEG")) == before + 1
