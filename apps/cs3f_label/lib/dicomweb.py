"""MONAI Label's DICOMweb datastore, saying why a label cannot be stored as a DICOM SEG.

MONAI Label 0.8.5 answers a bare HTTP 500 when a label cannot become a DICOM SEG: an empty label (a DICOM SEG needs
at least one segment), or no ``itkimage2segimage`` (dcmqi) on the server. Slicer and OHIF then show "Failed" with no
reason. This datastore says which, in the answer the viewer shows.
"""

from __future__ import annotations

import logging
from typing import Any, Dict

import numpy as np
from fastapi import HTTPException
from monai.transforms import LoadImage
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

logger = logging.getLogger(__name__)

__all__ = ["CS3FDICOMWebDatastore"]


class CS3FDICOMWebDatastore(DICOMWebDatastore):
    """``DICOMWebDatastore`` whose ``save_label`` refuses what cannot be a DICOM SEG with the reason."""

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any], label_id: str = ""
    ) -> str:
        if label_tag == DefaultLabelTag.FINAL:
            try:
                flagged = int(np.count_nonzero(np.asarray(LoadImage(image_only=True)(label_filename))))
            except Exception as err:
                raise HTTPException(status_code=422, detail=f"the label of {image_id} cannot be read: {err}") from err
            if not flagged:
                raise HTTPException(
                    status_code=422,
                    detail=f"the label of {image_id} marks no voxel: a DICOM SEG needs at least one segment, so "
                    "nothing was stored on the DICOMweb server",
                )
        try:
            return super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        except OSError as err:  # FileNotFoundError among them
            logger.exception("storing the label of %s as DICOM SEG failed", image_id)
            raise HTTPException(
                status_code=500,
                detail=f"storing the label of {image_id} as DICOM SEG failed ({type(err).__name__}: {err}); dcmqi's "
                "itkimage2segimage must be on the server's PATH (pip install dcmqi)",
            ) from err
