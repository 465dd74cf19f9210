"""Refuse inputs of implausible size from their headers, before a single voxel is read or allocated.

A header may claim 10000^3 voxels, a gzip file may inflate to terabytes, and a 50 mm voxel size resampled
to 1 mm multiplies the voxel count by 125000: each would try to allocate tens of gigabytes to terabytes and
take the machine (and every other subject's results) down with it. The header says all of this up front.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform

from .transforms import CohortInputError

__all__ = ["CheckInputSized", "read_header"]

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img")


def read_header(path: str | os.PathLike) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Declared grid shape and voxel size (mm) of an image file or DICOM series folder, from headers only."""
    path = Path(path)
    if path.is_dir():  # a DICOM series: the first slice's header times the number of files
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise CohortInputError(f"{path}: the folder holds no files")
        shape, spacing = read_header(files[0])
        return (*shape[:2], len(files)), (*spacing[:2], spacing[2] if len(spacing) > 2 else 1.0)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        header = nib.load(str(path)).header  # lazy: reads (and for .gz, decompresses) the header only
        return tuple(int(n) for n in header.get_data_shape()), tuple(float(z) for z in header.get_zooms())
    import itk

    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise CohortInputError(f"{path}: no reader recognises this file")
    io.SetFileName(str(path))
    io.ReadImageInformation()
    dims = range(io.GetNumberOfDimensions())
    return tuple(int(io.GetDimensions(i)) for i in dims), tuple(float(io.GetSpacing(i)) for i in dims)


class CheckInputSized(MapTransform):
    """Refuse a file whose header declares more voxels than ``max_voxels`` (on disk, or after resampling to
    ``spacing``), or a voxel edge longer than ``max_voxel_size_mm``. Works on the file paths, so it goes
    before ``LoadImaged``.

    Args:
        max_voxels: largest voxel count allowed, both as stored and once resampled to ``spacing``.
        max_voxel_size_mm: longest voxel edge allowed (a plausible scan has voxels of a few mm at most).
        spacing: the preprocessing's target voxel size in mm (one value or one per axis).
    """

    def __init__(
        self,
        keys: KeysCollection,
        max_voxels: int,
        max_voxel_size_mm: float,
        spacing: float | Sequence[float] = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_voxels = int(max_voxels)
        self.max_voxel_size_mm = float(max_voxel_size_mm)
        self.spacing = [float(s) for s in spacing] if isinstance(spacing, Sequence) else [float(spacing)] * 3

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], (str, os.PathLike)):
                self.check(d[key])
        return d

    def check(self, path: str | os.PathLike) -> None:
        try:
            shape, zooms = read_header(path)
        except CohortInputError:
            raise
        except Exception as err:
            raise CohortInputError(f"{path}: the header cannot be read ({type(err).__name__}: {err})") from err
        stored = math.prod(shape)
        if stored > self.max_voxels:
            raise CohortInputError(
                f"{path}: the header declares {' x '.join(map(str, shape))} = {stored:,} voxels, more than "
                f"max_input_voxels ({self.max_voxels:,})"
            )
        spatial = list(zip(shape[:3], zooms[:3]))
        largest = max((abs(z) for _, z in spatial), default=0.0)
        if largest > self.max_voxel_size_mm or not all(math.isfinite(z) and abs(z) > 0 for _, z in spatial):
            raise CohortInputError(
                f"{path}: implausible voxel size {' x '.join(f'{abs(z):g}' for _, z in spatial)} mm "
                f"(each edge must be above 0 and at most max_voxel_size_mm = {self.max_voxel_size_mm:g})"
            )
        resampled = math.prod(math.ceil(n * abs(z) / s) for (n, z), s in zip(spatial, self.spacing))
        if resampled > self.max_voxels:
            raise CohortInputError(
                f"{path}: resampled to {self.spacing[0]:g} mm it would have {resampled:,} voxels, more than "
                f"max_input_voxels ({self.max_voxels:,})"
            )
