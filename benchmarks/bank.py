"""Reference banks measured: one study at a time against a bank, against the cohort mode on the same data.

    python benchmarks/bank.py                     # both experiments, DINOv2 ViT-S/14 at 224^3
    python benchmarks/bank.py --only brats        # or t1

* ``t1`` (preset ``mixed_t1``: every subject registered to the first IXI subject): a bank of the 10 healthy IXI
  T1 subjects scores each of the 2 MSLUB T1 volumes alone (voxel metrics against their lesions); each IXI subject
  is scored alone against a bank of the other 9 (its flagged fraction is a false-positive rate). The subject AUROC
  ranks the 2 MS patients against the 10 held-out healthy subjects.
* ``brats`` (preset ``brats_flair``): each of the 4 cases alone against a bank of the other 3 (leave-one-out),
  pooled like the accuracy table, beside the cohort mode (every case against the other 3, one run) in this run.

Seconds per study are the median wall time of one single-study run, building the bundle's components (network,
weights, bank) included, with the study's tokens in the token cache (every subject is encoded once first), and once
without it (encoding included). Writes
``benchmarks/results/bank.md`` and ``bank.json``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))

from monai.bundle import ConfigParser  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from scripts.data import cohort_datalist  # noqa: E402
from scripts.evaluation import GroundTruthEvaluation  # noqa: E402
from scripts.outputs import atomic_path, write_json  # noqa: E402
from scripts.run_report import RunReport, versions, weights_record  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "bundle" / "configs"


def parser_for(preset: str, args: argparse.Namespace, extra: tuple[str, ...] = (), **overrides) -> ConfigParser:
    """The bundle config with a preset on top, as ``benchmarks/accuracy.py`` runs it (same token cache)."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), *map(str, extra), str(ROOT / "configs" / f"{preset}.json")])
    parser.update(
        {
            "bundle_root": str(ROOT / "bundle"),
            "dataset_dir": str((ROOT / parser["dataset_dir"]).resolve()),
            "backbone": args.backbone,
            "grid_size": args.grid_size,
            "matching": "window",
            "tokenization": "coarse",
            "progress": False,
            "write_overview": False,
            "overwrite": True,
            "fallback_backbone": None,
            "cache_dir": str(Path(args.work_dir) / "token_cache"),
            **overrides,
        }
    )
    return parser


def subjects_of(preset: str, args: argparse.Namespace) -> list[dict]:
    parser = parser_for(preset, args)
    return [
        s
        for s in cohort_datalist(
            parser["dataset_dir"], parser["image_pattern"], parser["mask_pattern"], parser.get("require_mask", True)
        )
        if "error" not in s
    ]


def build_bank(preset: str, references: list[dict], path: Path, args: argparse.Namespace) -> float:
    """Build a bank of ``references`` at ``path``; returns the seconds it took."""
    start = time.perf_counter()
    # build_bank.json turns the token cache off (the bank keeps the tokens); parser_for turns it on again to reuse them
    parser = parser_for(preset, args, (CONFIGS / "build_bank.json",), datalist=references, reference_bank=str(path))
    path.unlink(missing_ok=True)
    parser.get_parsed_content("bank_builder").run()
    return time.perf_counter() - start


def warm_token_cache(preset: str, subjects: list[dict], work: Path, args: argparse.Namespace) -> None:
    """Encode every subject once (into the token cache), so that the timed single-study runs find their tokens."""
    build_bank(preset, subjects, work / "all_subjects.pt", args)
    (work / "all_subjects.pt").unlink()


def score_alone(preset: str, query: dict, bank: Path, out: Path, args: argparse.Namespace, cached: bool = True):
    """One study alone against the bank; returns its scores.csv row, the seconds, and the encoder."""
    parser = parser_for(preset, args, datalist=[query], reference_bank=str(bank), output_dir=str(out))
    if not cached:
        parser["cache_dir"] = ""
    start = time.perf_counter()
    evaluator = parser.get_parsed_content("evaluator")
    report = evaluator.run()
    return report.subjects[0], time.perf_counter() - start, evaluator.network.encoder


def evaluate(preset: str, rows: list[dict], out: Path, encoder, args: argparse.Namespace) -> dict:
    parser = parser_for(preset, args)
    evaluation = GroundTruthEvaluation(
        parser["dataset_dir"], parser["label_pattern"], str(out), parser["mask_pattern"], figures=False, verbose=False
    )
    return evaluation.evaluate(RunReport(subjects=rows, output_dir=str(out)), encoder)


def t1(args: argparse.Namespace) -> dict:
    work = Path(args.work_dir) / "bank_t1"
    subjects = subjects_of("mixed_t1", args)
    healthy = [s for s in subjects if "IXI" in s["subject"]]
    patients = [s for s in subjects if "IXI" not in s["subject"]]
    rows, seconds, banks_s = [], [], []
    warm_token_cache("mixed_t1", subjects, work, args)
    banks_s.append(build_bank("mixed_t1", healthy, work / "bank_ixi.pt", args))
    for query in patients:
        row, s, encoder = score_alone("mixed_t1", query, work / "bank_ixi.pt", work / "out", args)
        rows.append(row)
        seconds.append(s)
    for query in healthy:
        others = [s for s in healthy if s is not query]
        banks_s.append(build_bank("mixed_t1", others, work / "bank_loo.pt", args))
        row, s, encoder = score_alone("mixed_t1", query, work / "bank_loo.pt", work / "out", args)
        rows.append(row)
        seconds.append(s)
    _, cold_s, _ = score_alone("mixed_t1", patients[0], work / "bank_ixi.pt", work / "out_cold", args, cached=False)
    summary = evaluate("mixed_t1", rows, work / "out", encoder, args)
    by_subject = {r["subject"]: r for r in summary["subjects"]}
    scores = {r["subject"]: r["subject_score"] for r in rows}
    return {
        "experiment": "t1",
        "bank": "10 healthy IXI T1 (for each IXI subject: the other 9)",
        "patients": {p["subject"]: _metrics(by_subject[p["subject"]], scores) for p in patients},
        "healthy_flagged_fraction": {h["subject"]: by_subject[h["subject"]]["flagged_fraction"] for h in healthy},
        "subject_auroc": float(
            roc_auc_score([s in {p["subject"] for p in patients} for s in scores], list(scores.values()))
        ),
        "seconds_per_study_cached": float(np.median(seconds)),
        "seconds_per_study_encoding": cold_s,
        "seconds_per_bank_build": float(np.mean(banks_s[1:])) if len(banks_s) > 1 else banks_s[0],
        "weights": weights_record(encoder),
    }


def brats(args: argparse.Namespace) -> dict:
    work = Path(args.work_dir) / "bank_brats"
    cases = subjects_of("brats_flair", args)
    rows, seconds = [], []
    warm_token_cache("brats_flair", cases, work, args)
    for query in cases:
        build_bank("brats_flair", [c for c in cases if c is not query], work / "bank_loo.pt", args)
        row, s, encoder = score_alone("brats_flair", query, work / "bank_loo.pt", work / "out", args)
        rows.append(row)
        seconds.append(s)
    banked = evaluate("brats_flair", rows, work / "out", encoder, args)
    parser = parser_for("brats_flair", args, output_dir=str(work / "cohort"))
    cohort_report = parser.get_parsed_content("evaluator").run()
    cohort = evaluate("brats_flair", cohort_report.subjects, work / "cohort", encoder, args)
    return {
        "experiment": "brats",
        "bank": "leave-one-out: each case against the other 3",
        "bank_pooled": {
            k: banked["pooled"][k]
            for k in ("auroc", "average_precision", "best_dice", "dice_at_threshold", "flagged_fraction")
        },
        "cohort_pooled": {
            k: cohort["pooled"][k]
            for k in ("auroc", "average_precision", "best_dice", "dice_at_threshold", "flagged_fraction")
        },
        "seconds_per_study_cached": float(np.median(seconds)),
        "weights": weights_record(encoder),
    }


def _metrics(row: dict, scores: dict) -> dict:
    return {
        "auroc": row["auroc"],
        "average_precision": row["average_precision"],
        "best_dice": row["best_dice"],
        "flagged_fraction": row["flagged_fraction"],
        "subject_score": scores[row["subject"]],
    }


def _f(x: float, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def render(results: list[dict], command: str) -> str:
    lines = [
        "# Reference banks: one study at a time",
        "",
        f"Command: `{command}`",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions().items())}",
        "",
    ]
    for r in results:
        w = r.get("weights") or {}
        lines += [f"Weights: `{Path(w.get('file', '')).name}` (sha256 `{w.get('sha256', '')[:16]}…`)", ""]
        if r["experiment"] == "t1":
            lines += [
                "## T1: MS patients and held-out healthy subjects against a bank of healthy IXI subjects",
                "",
                f"Bank: {r['bank']}.",
                "",
                "| subject | voxel AUROC | AP | best Dice | flagged | subject score |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {s} | {_f(m['auroc'])} | {_f(m['average_precision'])} | {_f(m['best_dice'])} | "
                f"{100 * m['flagged_fraction']:.2f} % | {_f(m['subject_score'], 4)} |"
                for s, m in r["patients"].items()
            ]
            flagged = list(r["healthy_flagged_fraction"].values())
            lines += [
                "",
                f"Held-out healthy IXI subjects (each against the other 9): flagged fraction {100 * np.mean(flagged):.2f} % "
                f"on average, {100 * max(flagged):.2f} % at most. Subject AUROC (2 MS patients against the 10 "
                f"healthy): {_f(r['subject_auroc'])}.",
                "",
                "The 2 MS patients come from another dataset than the bank (MSLUB: MNI space, skull-stripped; IXI: "
                "native space, other scanners), so what sets them apart here includes the site, not only the lesions.",
                "",
                f"Seconds per study (median): {r['seconds_per_study_cached']:.1f} with its tokens cached (building the "
                f"bundle's components, loading the bank, scoring against it, writing), "
                f"{r['seconds_per_study_encoding']:.1f} encoding included; building a bank of 9 from cached tokens: "
                f"{r['seconds_per_bank_build']:.1f} s.",
                "",
            ]
        else:
            lines += [
                "## BraTS FLAIR: leave-one-out banks against the cohort mode",
                "",
                "| mode | AUROC | AP | best Dice | Dice @ thr | flagged |",
                "|---|---|---|---|---|---|",
            ]
            for mode in ("cohort", "bank"):
                p = r[f"{mode}_pooled"]
                lines.append(
                    f"| {mode} ({'one run, each case against the other 3' if mode == 'cohort' else r['bank']}) | "
                    f"{_f(p['auroc'])} | {_f(p['average_precision'])} | {_f(p['best_dice'])} | "
                    f"{_f(p['dice_at_threshold'])} | {100 * p['flagged_fraction']:.2f} % |"
                )
            lines += [
                "",
                "Voxel scores are the same in both modes (each case is scored against the same 3 references); the "
                "operating threshold is not: the bank's comes from its 3 references only, the cohort's from all 4.",
                "",
                f"Seconds per study against its bank (median, tokens cached, as above): "
                f"{r['seconds_per_study_cached']:.1f}.",
                "",
            ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=["t1", "brats"], choices=["t1", "brats"])
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--grid_size", type=int, default=224)
    ap.add_argument("--work_dir", default="/tmp/cs3f_accuracy", help="shared with benchmarks/accuracy.py (token cache)")
    args = ap.parse_args()
    results = [{"t1": t1, "brats": brats}[name](args) for name in args.only]
    command = shlex.join(["python", "benchmarks/bank.py", *sys.argv[1:]])
    write_json({"command": command, "versions": versions(), "results": results}, RESULTS / "bank.json")
    with atomic_path(RESULTS / "bank.md") as tmp:
        tmp.write_text(render(results, command) + "\n")
    print(render(results, command))


if __name__ == "__main__":
    main()
