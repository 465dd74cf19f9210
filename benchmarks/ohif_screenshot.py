"""OHIF, driven in headless Chromium: a CS3F anomaly overlay on a DICOM series, saved as a screenshot.

    python benchmarks/ohif_screenshot.py                       # writes benchmarks/results/ohif_anomaly.png

What a radiologist does, end to end on this machine (loopback only): Orthanc (Debian's ``orthanc`` and
``orthanc-dicomweb``) receives 8 phantom brain FLAIR series by STOW-RS; the CS3F MONAI Label app serves that
DICOMweb server; OHIF, as MONAI Label serves it at ``/ohif/``, opens the series of the phantom with the largest
planted lesions, connects its MONAI Label panel to the app, and runs ``anomaly``; the overlay is photographed.

Needs ``chromium`` and ``chromium-driver`` (Debian) and ``selenium`` (requirements.txt). With the pretrained
DINOv2 ViT-S/14 at 168^3 (the demo's settings) it takes about 10 minutes on 2 CPU cores, most of it encoding the
8 series; ``--backbone intensity --wait_s 60`` checks the plumbing in about 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bundle")]

from label_server import Server, free_port  # noqa: E402
from orthanc import Orthanc, dicom_series  # noqa: E402

from scripts.phantoms import make_phantom_cohort  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def browser(width: int = 1600, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--enable-unsafe-swiftshader",
        "--use-angle=swiftshader",
        "--ignore-gpu-blocklist",
    ):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)


def run_anomaly_in_ohif(app_url: str, study_uid: str, out: Path, wait_s: float) -> list[str]:
    """Open the study in OHIF's MONAI Label mode, point its panel at the app, run ``anomaly``, save a screenshot.
    Returns the browser's error messages."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(f"{app_url}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
        wait = WebDriverWait(driver, 60)
        wait.until(ec.presence_of_element_located((By.ID, "monailabelServerURL")))
        time.sleep(5)  # the viewports load the series
        for button in driver.find_elements(By.XPATH, "//button[contains(., 'Confirm and Hide')]"):
            button.click()  # OHIF's "investigational use only" banner
        server = wait.until(ec.element_to_be_clickable((By.ID, "monailabelServerURL")))
        server.send_keys(Keys.CONTROL + "a")
        server.send_keys(app_url + "/")
        driver.find_element(By.XPATH, "//input[@id='monailabelServerURL']/ancestor::tr//button").click()
        wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Run']"))).click()
        time.sleep(wait_s)  # the study is encoded, scored against its references, and the label drawn
        driver.save_screenshot(str(out))
        return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--grid_size", type=int, default=168)
    ap.add_argument("--wait_s", type=float, default=300, help="how long OHIF is given to run it")
    ap.add_argument("--out", default=str(RESULTS / "ohif_anomaly.png"))
    args = ap.parse_args()
    from dicomweb_client.api import DICOMwebClient
    from pydicom.uid import generate_uid

    work = Path(tempfile.mkdtemp(prefix="cs3f_ohif_"))
    records = make_phantom_cohort(work / "phantoms", n_subjects=8, n_lesion_free=2, seed=0)  # the demo's cohort
    pacs = Orthanc(work / "orthanc", free_port())
    app = None
    try:
        pacs.wait_ready()
        client = DICOMwebClient(pacs.dicomweb)
        studies = {}
        for record in records:
            study, series = generate_uid(), generate_uid()
            client.store_instances(
                dicom_series(nib.load(record["image"]), study, series, "AX FLAIR", record["subject"])
            )
            studies[record["subject"]] = (study, series)
        planted = {r["subject"]: int(np.count_nonzero(np.asarray(nib.load(r["label"]).dataobj))) for r in records}
        shown = max(planted, key=planted.get)
        env = {"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": '{"Modality":"MR"}', "HOME": str(work / "home")}
        conf = {"backbone": args.backbone, "grid_size": str(args.grid_size), "cache_dir": str(work / "cache")}
        app = Server(pacs.dicomweb, conf, work / "server.log", env)
        app.wait_ready()
        errors = run_anomaly_in_ohif(app.url, studies[shown][0], Path(args.out), args.wait_s)
        answer = app.infer(studies[shown][1], output="json").json()  # the same study: its stored answer
        summary = {
            "shown": shown,
            "series": studies[shown][1],
            "planted_voxels": planted[shown],
            "flagged_ml": answer.get("lesion_volume_ml"),
            "subject_score": answer.get("subject_score"),
            "references": len(answer.get("references", [])),
            "browser_errors": errors,
            "screenshot": args.out,
            "backbone": args.backbone,
            "grid_size": args.grid_size,
        }
        print(json.dumps(summary, indent=2))
    finally:
        if app is not None:
            app.stop()
        pacs.stop()


if __name__ == "__main__":
    main()
