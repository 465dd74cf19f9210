"""Does a fresh process score a cohort the same twice? torch's first CPU ``sqrt`` on each thread, with and without
``threads.warm_up_vector_math``.

    python benchmarks/vector_math.py        # 10 to 20 min on 2 CPU cores

torch's CPU ``sqrt`` appears to run on MKL's vector math (VML). With torch 2.14.1, when two threads made their first
call at once, right after a batched matrix product and a reduction, one thread's half of the result came back with up
to 3e-4 relative error, the same call repeated exact; the bundle's scoring therefore has every thread make its first
call on throwaway data (``scripts/threads.py``). Each child process here scores one small cohort with window matching
and two threads, twice on the bundle's two paths: the whole cohort on two single-threaded workers (``workers``), then
every subject on its own on two intra-op threads (``intra-op``); first it turns that warm-up off (``off``) or leaves it
on (``on``), and reports whether each path's two scorings agree to the bit. Children alternate between the two modes,
so that both see the same machine. Run it again
after a torch or MKL upgrade: if ``off`` never differs any more, the warm-up can go. Writes
``benchmarks/results/vector_math.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))

from scripts import scoring, threads  # noqa: E402
from scripts.threads import torch_threads  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODES = ("off", "on")


PATHS = {"workers": None, "intra-op": list(range(6))}  # the whole cohort, or every subject on its own


def score_twice(mode: str) -> dict:
    """In this (fresh) process: score the cohort of ``tests/test_threads.py`` twice on each path with two threads; do
    the two scorings agree?"""
    if mode == "off":
        threads.warm_up_vector_math = lambda count: None
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(6, 16, 8, 8, 8, generator=g)
    valid = torch.rand(6, 8, 8, 8, generator=g) > 0.2
    row = {"mode": mode}
    for path, subjects in PATHS.items():
        with torch_threads(2):
            first, second = (
                scoring.mutual_scores(tokens, valid, 0.3, "window", 1, subjects=subjects) for _ in range(2)
            )
        difference = (first - second).abs().nan_to_num() / second.abs().nan_to_num().clamp(min=1e-12)
        row[path] = {"same": torch.equal(first.nan_to_num(), second.nan_to_num()), "max_rel": float(difference.max())}
    return row


def child(mode: str) -> dict:
    """``score_twice(mode)`` in a fresh process: the first call of each thread is the one in question."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def markdown(rows: list[dict], command: str, info: dict[str, str]) -> str:
    """The results table: per mode and path, how many processes' two scorings differed, and by how much at most."""
    lines = [
        "# A fresh process's first CPU square root on each thread",
        "",
        f"Command: `{command}`  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
        "Each child process scores one cohort (6 subjects, 8^3 tokens of 16 channels, window matching) with two "
        "threads, twice on each path, and compares the two scorings bit for bit: `workers`, the whole cohort on two "
        "single-threaded workers; `intra-op`, every subject on its own on two intra-op threads. `off`: the bundle's "
        "warm-up of the threads' vector math (`threads.warm_up_vector_math`) turned off; `on`: as the bundle runs.",
        "",
        "| warm-up | path | processes | scorings differed | largest relative difference |",
        "|---|---|---|---|---|",
    ]
    for mode in MODES:
        for path in PATHS:
            mine = [r[path] for r in rows if r["mode"] == mode]
            differed = sum(not r["same"] for r in mine)
            largest = max((r["max_rel"] for r in mine), default=0.0)
            lines.append(f"| {mode} | {path} | {len(mine)} | {differed} | {largest:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=60, help="child processes per mode")
    ap.add_argument("--out", type=Path, default=RESULTS / "vector_math")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(score_twice(args.child)))
        return
    if args.processes < 1:
        ap.error(
            f"--processes must be at least 1 (a results file with no process would replace the measured one), got {args.processes}"
        )
    rows = []
    for k in range(args.processes):
        for mode in MODES:
            rows.append(child(mode))
        outcome = ", ".join(
            f"{r['mode']} {path} {'same' if r[path]['same'] else 'DIFFERED'}" for r in rows[-2:] for path in PATHS
        )
        print(f"{k + 1}/{args.processes}: {outcome}", flush=True)
    # imported here, not at the top: MONAI's import would slow every child down
    from scripts.outputs import atomic_path, write_json
    from scripts.run_report import versions

    command = ("python benchmarks/vector_math.py " + shlex.join(sys.argv[1:])).strip()
    info = versions()
    write_json({"command": command, "versions": info, "rows": rows}, args.out.with_suffix(".json"))
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(rows, command, info))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
