"""Per-subject overview figure: three orthogonal slices through the most anomalous region.

Uses `matplotlib.figure.Figure` with the Agg canvas directly instead of pyplot, so importing or calling
this never changes the global matplotlib backend or figure registry of the host process. ``SaveOverviewd`` is
the figure as a step of the postprocessing, next to ``SaveImaged``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from monai.config import KeysCollection
from monai.transforms import LoadImage, MapTransform, Orientation
from scipy import ndimage

from .outputs import atomic_path, readable, subject_files
from .values import as_bool

HEAT_SMOOTHING_VOXELS = 2.0  # makes the chosen point the centre of a region, not a single hot voxel
# one meaning per colour, in every figure of the bundle
HEAT_CMAP = "inferno"
FLAGGED_COLOUR = "cyan"  # outline of the voxels flagged at the operating threshold (the prediction)
TRUTH_COLOUR = "magenta"  # outline of the ground truth (evaluation figures)
CROSS_COLOUR = "lime"


def save_overview(
    image: np.ndarray,
    heat: np.ndarray,
    path: str | Path,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
    flagged: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    scale: float | None = None,
    threshold: float | None = None,
) -> tuple[int, int, int]:
    """Save axial/coronal/sagittal slices of RAS `image` with `heat` overlaid; return the voxel shown.

    The slices cross at the argmax of the gaussian-smoothed heat map and are drawn in radiological
    convention (patient right on screen left; anterior up in axial, superior up in coronal/sagittal).
    ``scale`` is the top of the heat colour scale: pass the cohort's, so that a healthy subject's map does not
    look as hot as a lesion's (default: this map's own maximum). ``threshold`` is marked on the colour bar.
    ``flagged`` and ``truth`` are outlined in ``FLAGGED_COLOUR`` and ``TRUTH_COLOUR``; a legend says so.
    """
    image, heat = np.asarray(image, dtype=np.float32), np.asarray(heat, dtype=np.float32)
    outlines = {name: m for name, m in (("flagged", flagged), ("truth", truth)) if m is not None}
    if image.ndim != 3 or image.shape != heat.shape or any(np.shape(m) != image.shape for m in outlines.values()):
        raise ValueError(
            f"image, heat and outline masks must be 3D arrays of one shape, got {image.shape}, {heat.shape}"
            + "".join(f", {name} {np.shape(m)}" for name, m in outlines.items())
        )
    heat = np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0)
    smoothed = ndimage.gaussian_filter(heat, HEAT_SMOOTHING_VOXELS)
    point = tuple(int(i) for i in np.unravel_index(np.argmax(smoothed), heat.shape))

    finite = image[np.isfinite(image)]
    low, high = np.percentile(finite, (1, 99)) if finite.size else (0.0, 1.0)
    grey = Normalize(float(low), float(high) if high > low else float(low) + 1.0)
    top = float(scale if scale is not None else heat.max())
    if threshold is not None and np.isfinite(threshold):
        top = max(top, 1.05 * float(threshold))  # the threshold always shows on the colour bar
    heat_norm = Normalize(0.0, max(top, 1e-6))
    heat_cmap = matplotlib.colormaps[HEAT_CMAP]
    colours = {"flagged": FLAGGED_COLOUR, "truth": TRUTH_COLOUR}

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    views = _slices(image, point, spacing)
    heats = _slices(heat, point, spacing)
    contours = {name: _slices(np.asarray(m, dtype=np.float32), point, spacing) for name, m in outlines.items()}
    for index, (ax, view, hot) in enumerate(zip(axes, views, heats)):
        ax.imshow(view["data"], cmap="gray", norm=grey, origin="lower", aspect=view["aspect"], interpolation="nearest")
        ax.imshow(
            np.ma.masked_less_equal(hot["data"], 0.0),
            cmap=heat_cmap,
            norm=heat_norm,
            alpha=0.55,
            origin="lower",
            aspect=view["aspect"],
            interpolation="nearest",
        )
        for name, views_of_mask in contours.items():
            contour = views_of_mask[index]["data"]
            if 0 < contour.max() and contour.min() < 1:
                ax.contour(contour, levels=[0.5], colors=colours[name], linewidths=0.8)
        col, row = view["cross"]
        ax.axvline(col, color=CROSS_COLOUR, linewidth=0.6, alpha=0.7)
        ax.axhline(row, color=CROSS_COLOUR, linewidth=0.6, alpha=0.7)
        ax.set_title(view["title"], fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        for (x, y), letter in zip(((0.02, 0.5), (0.98, 0.5), (0.5, 0.98), (0.5, 0.02)), view["letters"]):
            ax.text(x, y, letter, transform=ax.transAxes, color="yellow", fontsize=9, ha="center", va="center")
    bar = fig.colorbar(
        ScalarMappable(norm=heat_norm, cmap=heat_cmap),
        ax=list(axes),
        shrink=0.8,
        label="anomaly score" + (" (cohort scale)" if scale is not None else " (this subject's scale)"),
    )
    legend = [f"heat: {HEAT_CMAP}, 0 to {heat_norm.vmax:.3g}"]
    if threshold is not None and np.isfinite(threshold):
        bar.ax.axhline(float(threshold), color=FLAGGED_COLOUR, linewidth=1.5)
        legend.append(f"threshold {threshold:.3g} (line on the colour bar)")
    legend += [
        f"{colours[name]} outline: {'flagged at the threshold' if name == 'flagged' else 'ground truth'}"
        for name in outlines
    ]
    legend.append(f"{CROSS_COLOUR} cross: the most anomalous region")
    fig.supxlabel("  |  ".join(legend), fontsize=8)  # laid out with the axes, never over an image
    if title:
        fig.suptitle(title)

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    return point


def _slices(volume: np.ndarray, point: tuple[int, int, int], spacing: Sequence[float]) -> list[dict]:
    """Axial, coronal and sagittal 2D arrays through `point`, oriented for display with origin="lower".

    Each dict holds `data` (rows run up the screen, columns left to right), `aspect` (row / column mm),
    `cross` (column, row of `point`), `title` and the `letters` at the left, right, top and bottom edges.
    """
    i, j, k = point
    nx, ny, _ = volume.shape
    sx, sy, sz = (float(s) for s in spacing)
    return [
        {
            "data": volume[::-1, :, k].T,
            "aspect": sy / sx,
            "cross": (nx - 1 - i, j),
            "title": f"axial z={k}",
            "letters": "RLAP",
        },
        {
            "data": volume[::-1, j, :].T,
            "aspect": sz / sx,
            "cross": (nx - 1 - i, k),
            "title": f"coronal y={j}",
            "letters": "RLSI",
        },
        {
            "data": volume[i, ::-1, :].T,
            "aspect": sz / sy,
            "cross": (ny - 1 - j, k),
            "title": f"sagittal x={i}",
            "letters": "APSI",
        },
    ]


class SaveOverviewd(MapTransform):
    """Write ``<subject>_overview.png`` into ``output_dir``: the subject's input image (read again from
    ``source_key``, a path) with the heat map ``keys`` and the flagged voxels ``mask_key`` over it, all in RAS.

    The cohort's colour scale (``scale_key``) and threshold (``threshold_key``) travel in the data dictionary, like
    the subject's ``subject_score`` and ``lesion_volume_ml`` that title the figure. With ``enabled`` false
    (``--write_overview false``) it passes the data on and writes nothing.
    """

    def __init__(
        self,
        keys: KeysCollection = "anomaly",
        output_dir: str | os.PathLike = ".",
        mask_key: str = "anomaly_mask",
        source_key: str = "source",
        subject_key: str = "subject",
        threshold_key: str = "threshold",
        scale_key: str = "heat_scale",
        enabled: bool = True,
    ) -> None:
        super().__init__(keys)
        self.enabled = as_bool(enabled, "write_overview")
        if len(self.keys) != 1:
            raise ValueError("SaveOverviewd draws exactly one heat map")
        self.output_dir = output_dir
        self.mask_key = mask_key
        self.source_key = source_key
        self.subject_key = subject_key
        self.threshold_key = threshold_key
        self.scale_key = scale_key
        self.load = LoadImage(image_only=True, ensure_channel_first=True)
        self.to_ras = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.enabled:
            return d
        image, heat, flagged = (
            self.to_ras(x) for x in (self.load(d[self.source_key]), d[self.keys[0]], d[self.mask_key])
        )
        subject = d[self.subject_key]
        scale, threshold = d.get(self.scale_key), d.get(self.threshold_key)
        save_overview(
            image.as_tensor()[0].numpy(),
            heat.as_tensor()[0].numpy(),
            subject_files(self.output_dir, subject)["overview"],
            spacing=[float(v) for v in image.pixdim[:3]],
            flagged=flagged.as_tensor()[0].numpy() > 0,
            scale=float(scale) if scale is not None else None,
            threshold=float(threshold) if threshold is not None else None,
            title=f"{readable(subject)}: score {d['subject_score']:.4g}, flagged {d['lesion_volume_ml']:.2f} ml",
        )
        return d
