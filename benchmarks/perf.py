"""Performance figures: slice encoding throughput, scoring throughput and memory against a naive reference,
growth with the cohort size N, and the demo end to end with a cold and a warm token cache.

    python benchmarks/perf.py                 # everything (about 10 min on 2 CPU cores)
    python benchmarks/perf.py --only scoring  # one part: encoding | scoring | demo

Writes ``benchmarks/results/perf.json`` and ``perf.md`` with the device, the versions and the command.
Memory is the peak resident memory of a fresh process per measurement (CPU) or the CUDA allocator peak,
minus what the process held once the tokens were in memory: the working memory of the computation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))

import torch  # noqa: E402

from scripts.outputs import atomic_path, write_json  # noqa: E402
from scripts.scoring import mutual_scores, num_closest, window_offsets  # noqa: E402
from scripts.workflow import versions  # noqa: E402

GRID, CHANNELS = 16, 64  # a 224^3 volume, patch 14, default projection


def peak_flops() -> tuple[float, str]:
    """The peak FP32 (CPU) or BF16 dense (CUDA) FLOP/s this device can reach, and how it was derived."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        known = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
        for key, value in known.items():
            if key in name:
                return value, f"{name}: {value / 1e12:.0f} TFLOP/s dense BF16 (vendor figure)"
        return float("nan"), f"{name}: peak unknown"
    mhz = max(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    flags = open("/proc/cpuinfo").read()
    per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags and " fma" in flags else 8
    cores = os.cpu_count() or 1
    peak = cores * mhz * 1e6 * per_cycle
    return peak, f"{cores} cores x {mhz:.0f} MHz x {per_cycle} FP32 FLOP/cycle (FMA) = {peak / 1e9:.0f} GFLOP/s"


def vit_flops(model: torch.nn.Module, tokens: int) -> float:
    """Forward FLOPs of a ViT on one image: 2 x multiply-adds of the linear layers plus attention."""
    dim, depth = model.embed_dim, len(model.blocks)
    params = sum(p.numel() for b in model.blocks for p in b.parameters() if p.dim() == 2)
    return 2 * params * tokens + depth * 4 * tokens * tokens * dim


def bench_encoding(args: argparse.Namespace) -> list[dict]:
    from scripts.backbones import create_backbone

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak, peak_note = peak_flops()
    rows = []
    for arch, label in (("vit_small_patch14_dinov2", "ViT-S/14"), ("vit_base_patch14_dinov2", "ViT-B/14")):
        for size in args.slice_sizes:
            encoder = create_backbone("random", img_size=size, backbone_kwargs={"arch": arch}).to(device)
            batch = torch.rand(args.slice_batch, 1, size, size, device=device)
            amp = device == "cuda"
            with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                encoder(batch)  # warm-up
                if device == "cuda":
                    torch.cuda.synchronize()
                start, done = time.perf_counter(), 0
                while time.perf_counter() - start < args.seconds:
                    encoder(batch)
                    done += batch.shape[0]
                if device == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            per_slice = vit_flops(encoder.model, (size // 14) ** 2 + 1)
            rows.append({
                "backbone": label, "slice_px": size, "dtype": "bf16" if amp else "fp32", "slices_per_s": done / elapsed,
                "gflop_per_slice": per_slice / 1e9, "fraction_of_peak": done / elapsed * per_slice / peak,
                "peak": peak_note, "device": device,
            })
            print(rows[-1], flush=True)
    return rows


def naive_scores(tokens: torch.Tensor, valid: torch.Tensor, alpha: float, matching: str, radius: int, i: int) -> torch.Tensor:
    """Reference: torch.cdist of all tokens of subject i against all tokens of all others at once."""
    n, c, *grid = tokens.shape
    flat = tokens.flatten(2).transpose(1, 2)  # (N, T, C)
    others = [j for j in range(n) if j != i]
    d = torch.cdist(flat[i], flat[others].reshape(-1, c)).view(flat.shape[1], len(others), -1)  # (T, M, T)
    d = d.masked_fill(~valid[others].flatten(1)[None], float("inf"))
    if matching == "window":
        pos = torch.stack(torch.meshgrid(*(torch.arange(s) for s in grid), indexing="ij"), -1).view(-1, 3)
        near = (pos[:, None] - pos[None]).abs().amax(-1) <= radius  # (T, T)
        d = d.masked_fill(~near[:, None], float("inf"))
    nearest = d.amin(-1).T  # (M, T)
    k = num_closest(alpha, n)
    s = nearest.topk(k, dim=0, largest=False).values.mean(0)
    return torch.where(valid[i].flatten(), s, torch.nan).view(*grid)


def cohort(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, CHANNELS, GRID, GRID, GRID, generator=g)
    axis = torch.linspace(-1, 1, GRID)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    valid = (x**2 + y**2 + z**2 < 0.95).expand(n, -1, -1, -1).contiguous()  # a brain-like ball
    return tokens, valid


def measure_scoring(n: int, matching: str, impl: str, budget_mb: float, queries: int) -> dict:
    """One measurement, in this (fresh) process: seconds per scored subject and working memory."""
    tokens, valid = cohort(n)
    if torch.cuda.is_available():
        tokens, valid = tokens.cuda(), valid.cuda()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.inference_mode():
        if impl == "cs3f":
            out = mutual_scores(tokens, valid, 0.3, matching, 1, int(budget_mb * 2**20), list(range(queries)))
        else:
            out = torch.stack([naive_scores(tokens, valid, 0.3, matching, 1, i) for i in range(queries)])
    elapsed = time.perf_counter() - start
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    checksum = float(torch.nan_to_num(out, nan=0.0).double().sum())
    return {"n": n, "matching": matching, "impl": impl, "s_per_subject": elapsed / queries,
            "working_mb": max(0, peak - base) / 2**20, "tokens_mb": tokens.numel() * 4 / 2**20, "checksum": checksum}


def bench_scoring(args: argparse.Namespace) -> list[dict]:
    rows = []
    for matching in ("window", "global"):
        for n in args.cohort_sizes:
            for impl in ("cs3f", "naive"):
                if impl == "naive" and n > args.naive_max_n:
                    continue
                cmd = [sys.executable, __file__, "--measure", json.dumps(
                    {"n": n, "matching": matching, "impl": impl, "budget_mb": args.budget_mb, "queries": args.queries})]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                rows.append(json.loads(out))
                print(rows[-1], flush=True)
    return rows


def bench_demo(args: argparse.Namespace) -> list[dict]:
    out_dir = Path(args.work_dir) / "demo"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           "['bundle/configs/inference.json','bundle/configs/demo.json']", "--demo_dir", repr(str(out_dir)),
           "--progress", "false"]
    rows = []
    subprocess.run(["rm", "-rf", str(out_dir)], check=True)
    for label in ("cold cache", "warm cache"):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
        elapsed = time.perf_counter() - start
        run = json.loads((out_dir / "outputs" / "run.json").read_text())
        subjects = run["subjects_written"]
        rows.append({"run": label, "wall_s": elapsed, "s_per_subject": elapsed / subjects, "subjects": subjects,
                     "stages_s": run["timings_s"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                     "backbone": run["backbone"]["used"]})
        print(rows[-1], flush=True)
    return rows


def markdown(result: dict) -> str:
    commands = result.get("commands", {})
    lines = ["# Performance", "", *(f"Command ({part}): `{cmd}`  " for part, cmd in commands.items()),
             f"Device: {result['device']}  ",
             f"Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}", ""]
    if result.get("encoding"):
        lines += ["## Slice encoding (random-initialised weights: same FLOPs as DINOv2)", "",
                  "| backbone | slice px | dtype | slices/s | GFLOP/slice | fraction of peak |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['backbone']} | {r['slice_px']} | {r['dtype']} | {r['slices_per_s']:.1f} | {r['gflop_per_slice']:.2f} | "
                  f"{100 * r['fraction_of_peak']:.1f} % |" for r in result["encoding"]]
        lines += ["", f"Peak: {result['encoding'][0]['peak']}.", ""]
    if result.get("scoring"):
        lines += ["## Scoring one group (16^3 tokens, 64 channels, alpha 0.3) per scored subject", "",
                  "| matching | N | CS3F s/subject | naive s/subject | speed-up | CS3F working MB | naive working MB | same result |",
                  "|---|---|---|---|---|---|---|---|"]
        by = {(r["matching"], r["n"], r["impl"]): r for r in result["scoring"]}
        for (matching, n, impl), r in by.items():
            if impl != "cs3f":
                continue
            naive = by.get((matching, n, "naive"))
            lines.append(
                f"| {matching} | {n} | {r['s_per_subject']:.3f} | {naive['s_per_subject']:.3f} | "
                f"{naive['s_per_subject'] / r['s_per_subject']:.1f}x | {r['working_mb']:.0f} | {naive['working_mb']:.0f} | "
                f"{abs(r['checksum'] - naive['checksum']) <= 1e-3 * abs(naive['checksum'])} |"
                if naive else f"| {matching} | {n} | {r['s_per_subject']:.3f} | - | - | {r['working_mb']:.0f} | - | - |")
        lines.append("")
    if result.get("demo"):
        lines += ["## Demo cohort end to end", "", "| run | wall s | s/subject | peak RSS MB | backbone |", "|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['wall_s']:.1f} | {r['s_per_subject']:.2f} | {r['peak_rss_mb']:.0f} | {r['backbone']} |"
                  for r in result["demo"]]
        cold, warm = result["demo"][0]["wall_s"], result["demo"][-1]["wall_s"]
        lines += ["", f"Warm-cache speed-up: {cold / warm:.2f}x.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["encoding", "scoring", "demo"], nargs="+", default=["encoding", "scoring", "demo"])
    ap.add_argument("--slice_sizes", type=int, nargs="+", default=[224])
    ap.add_argument("--slice_batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--cohort_sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--naive_max_n", type=int, default=16)
    ap.add_argument("--queries", type=int, default=2, help="subjects scored per measurement")
    ap.add_argument("--budget_mb", type=float, default=256)
    ap.add_argument("--work_dir", default="/tmp/cs3f_perf")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure_scoring(**json.loads(args.measure))))
        return
    results = Path(args.results)
    # a run of some parts keeps the others' earlier figures; each part records the command that made it
    result = json.loads((results / "perf.json").read_text()) if (results / "perf.json").is_file() else {}
    result.update({"versions": versions(), "device": peak_flops()[1]})
    commands = result.setdefault("commands", {})
    for part in args.only:
        result[part] = {"encoding": bench_encoding, "scoring": bench_scoring, "demo": bench_demo}[part](args)
        commands[part] = "python " + shlex.join(["benchmarks/perf.py", *sys.argv[1:]])
    write_json(result, results / "perf.json")
    with atomic_path(results / "perf.md") as tmp:
        tmp.write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
