"""A real Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``) on loopback, and DICOM series to put in it.

Orthanc 1.10 has no bind-address option: the DICOM port is off and ``RemoteAccessAllowed`` is false, so only this
machine's own connections are answered.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
from label_server import wait_until_answers

ORTHANC = shutil.which("Orthanc") or shutil.which("orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
needs_orthanc = pytest.mark.skipif(
    ORTHANC is None or not DICOMWEB_PLUGIN.is_file(),
    reason="Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)",
)


class Orthanc:
    """An Orthanc server in a folder of its own, answering on ``127.0.0.1:port`` only."""

    def __init__(self, folder: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.dicomweb = f"{self.url}/dicom-web"
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "CS3F-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": port,
            "DicomServerEnabled": False,  # no DICOM port: nothing listens beyond HTTP
            "RemoteAccessAllowed": False,  # HTTP answers this machine only
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = folder / "orthanc.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [ORTHANC, str(folder / "orthanc.json")], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout_s: float = 60) -> None:
        wait_until_answers(self.proc, f"{self.url}/system", timeout_s, "Orthanc", lambda: self.log.read_text()[-3000:])

    def series(self, modality: str | None = None) -> list[dict]:
        """The series it holds (QIDO-RS), optionally of one modality."""
        query = {"Modality": modality} if modality else {}
        found = requests.get(f"{self.dicomweb}/series", params=query, timeout=30)
        return found.json() if found.status_code == 200 and found.content else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def dicom_series(image, study_uid: str, series_uid: str, description: str, patient: str, modality: str = "MR") -> list:
    """A NIfTI image (nibabel) as one axial DICOM series in its own place in the patient: pydicom datasets of MR
    Image Storage, one per slice, with ImagePositionPatient and ImageOrientationPatient from the image's affine."""
    import nibabel as nib
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ras = nib.as_closest_canonical(image)
    spacing = [float(z) for z in ras.header.get_zooms()[:3]]
    volume = np.asarray(ras.dataobj, dtype=np.float32)[::-1, ::-1, :]  # LPS: x to the left, y to the back
    values = np.clip(np.round(volume / max(float(volume.max()), 1e-6) * 2000), 0, 4095).astype(np.uint16)
    frame_of_reference = generate_uid()
    corner = ras.affine @ np.array([volume.shape[0] - 1, volume.shape[1] - 1, 0, 1.0])  # LPS voxel (0, 0, 0), in RAS
    slices = []
    for k in range(values.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128  # a DICOM file (Part 10), as a modality sends it
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientName = ds.PatientID = patient
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate, ds.StudyTime, ds.Modality, ds.SeriesDescription = "20260101", "120000", modality, description
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.FrameOfReferenceUID = frame_of_reference
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(-corner[0]), float(-corner[1]), float(corner[2] + k * spacing[2])]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = spacing[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = values.shape[1], values.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.ascontiguousarray(values[:, :, k].T).tobytes()  # rows run along y, columns along x
        slices.append(ds)
    return slices
