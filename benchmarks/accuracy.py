"""Accuracy table: the evaluation workflow over the real-data presets, backbones, matching and tokenization modes.

    python benchmarks/accuracy.py                       # all presets whose data is present, default grid
    python benchmarks/accuracy.py --presets brats_flair --backbones intensity random --grid_size 112

Writes ``benchmarks/results/accuracy.md`` and ``accuracy.json`` with the exact command, the versions and
the machine. Pretrained backbones are included only where their weights are found (never downloaded
here); untrained ones are marked as such in the table.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))

from monai.bundle import ConfigParser  # noqa: E402

from scripts.backbones import DINOV2, WeightsNotFoundError, find_weights  # noqa: E402
from scripts.evaluation import CohortEvaluator  # noqa: E402
from scripts.outputs import atomic_path, write_json  # noqa: E402
from scripts.workflow import versions as run_versions  # noqa: E402

PRESETS = ("brats_flair", "mslub_flair", "ixi_t1", "mixed_t1")
FIELDS = ("auroc", "average_precision", "best_dice", "dice_at_threshold")


def available_backbones(requested: list[str]) -> tuple[list[str], list[str]]:
    """The requested backbones that can run here, and why the others cannot."""
    usable, skipped = [], []
    for name in requested:
        if name in DINOV2:
            try:
                find_weights(name, models_dir=ROOT / "bundle" / "models", allow_download=False)
            except WeightsNotFoundError:
                skipped.append(f"{name}: no pretrained weights on this machine (offline)")
                continue
        usable.append(name)
    return usable, skipped


def run_one(preset: str, backbone: str, matching: str, tokenization: str, args: argparse.Namespace) -> dict:
    parser = ConfigParser()
    parser.read_config([str(ROOT / "bundle/configs/inference.json"), str(ROOT / "bundle/configs/evaluate.json"),
                        str(ROOT / f"configs/{preset}.json")])
    out = Path(args.work_dir) / f"{preset}-{backbone}-{matching}-{tokenization}"
    parser.update({
        "bundle_root": str(ROOT / "bundle"), "output_dir": str(out), "overwrite": True, "progress": False,
        "write_overview": False, "eval_figures": False, "backbone": backbone, "matching": matching,
        "tokenization": tokenization, "cache_dir": str(Path(args.work_dir) / "token_cache"),
        **({"grid_size": args.grid_size} if args.grid_size else {}),
    })
    if not (ROOT / parser["dataset_dir"]).exists() and not Path(parser["dataset_dir"]).exists():
        raise FileNotFoundError(parser["dataset_dir"])
    parser["dataset_dir"] = str((ROOT / parser["dataset_dir"]).resolve())
    start = time.perf_counter()
    report = parser.get_parsed_content("runner").run()
    evaluator: CohortEvaluator = parser.get_parsed_content("evaluator")
    summary = evaluator.evaluate(report, parser.get_parsed_content("network").encoder)
    return {
        "preset": preset, "backbone": backbone, "pretrained": summary["backbone"]["pretrained"], "matching": matching,
        "tokenization": tokenization, "grid_size": parser["grid_size"], "seconds": time.perf_counter() - start,
        "pooled": summary["pooled"], "subject_auroc": summary["subject_auroc"],
        "subjects": {r["subject"]: {k: r[k] for k in FIELDS} for r in summary["subjects"]},
    }


def markdown(results: list[dict], skipped: list[str], command: str, versions: dict) -> str:
    lines = [
        "# Accuracy (pooled voxel metrics inside the masks)",
        "",
        f"Command: `{command}`  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}",
        "",
        "Backbones marked *untrained* are NOT DINOv2: `intensity` is the raw-intensity baseline, `random` a",
        "randomly initialised ViT (mechanics only).",
        "",
        "| preset | backbone | matching | tokenization | AUROC | AP | best Dice | Dice @ thr | subject AUROC | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r["pooled"]
        name = r["backbone"] + ("" if r["pretrained"] else " (*untrained*)")
        lines.append(
            f"| {r['preset']} | {name} | {r['matching']} | {r['tokenization']} | {p['auroc']:.3f} | "
            f"{p['average_precision']:.3f} | {p['best_dice']:.3f} | {p['dice_at_threshold']:.3f} | "
            f"{r['subject_auroc']:.3f} | {r['seconds']:.0f} |"
        )
    per_subject = [r for r in results if any(s.startswith("patient") for s in r["subjects"])]
    if per_subject:
        lines += ["", "## MSLUB subjects (small MS lesions: patient07 has 1,300 lesion voxels)", "",
                  "| backbone | matching | tokenization | subject | AUROC | AP | best Dice |", "|---|---|---|---|---|---|---|"]
        for r in per_subject:
            for sid, m in r["subjects"].items():
                if sid.startswith("patient"):
                    lines.append(f"| {r['backbone']} | {r['matching']} | {r['tokenization']} | {sid} | {m['auroc']:.3f} | "
                                 f"{m['average_precision']:.3f} | {m['best_dice']:.3f} |")
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--backbones", nargs="+", default=["intensity", "random", *DINOV2])
    ap.add_argument("--matching", nargs="+", default=["window", "global"])
    ap.add_argument("--tokenization", nargs="+", default=["coarse", "coarse_to_fine"])
    ap.add_argument("--grid_size", type=int, default=None, help="override the bundle's grid (e.g. 112 for speed)")
    ap.add_argument("--work_dir", default="/tmp/cs3f_accuracy")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    backbones, skipped = available_backbones(args.backbones)
    results = []
    for preset, backbone, matching, tokenization in itertools.product(args.presets, backbones, args.matching, args.tokenization):
        try:
            results.append(run_one(preset, backbone, matching, tokenization, args))
        except FileNotFoundError as err:
            skipped.append(f"{preset}: data or preset not available ({err})")
    command = "python " + shlex.join(["benchmarks/accuracy.py", *sys.argv[1:]])
    versions = {**run_versions(), "machine": platform.machine()}
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json({"command": command, "versions": versions, "results": results, "skipped": sorted(set(skipped))},
               results_dir / "accuracy.json")
    with atomic_path(results_dir / "accuracy.md") as tmp:
        tmp.write_text(markdown(results, sorted(set(skipped)), command, versions))
    print((results_dir / "accuracy.md").read_text())


if __name__ == "__main__":
    main()
