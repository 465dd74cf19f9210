"""The performance benchmark's own parts: its naive reference scores what CS3F scores, and a measurement runs."""

from __future__ import annotations

import importlib.util
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY_VIT_SETTINGS
from scripts import scoring
from scripts.scoring import mutual_scores

PERF = Path(__file__).resolve().parents[1] / "benchmarks" / "perf.py"


@pytest.fixture(scope="module")
def perf():
    spec = importlib.util.spec_from_file_location("perf", PERF)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("matching", ["window", "global"])
def test_naive_reference_equals_mutual_scores(perf, matching):
    tokens, valid = perf.cohort(5, grid=6)
    naive = torch.stack([perf.naive_scores(tokens, valid, 0.3, matching, 1, i) for i in range(5)])
    torch.testing.assert_close(
        naive, mutual_scores(tokens, valid, 0.3, matching, 1), rtol=1e-4, atol=1e-4, equal_nan=True
    )
    assert torch.isfinite(naive).any() and torch.isnan(naive).any()  # scored tokens and the masked-out ones


def test_one_measurement_reports_time_and_memory(perf):
    default = scoring.BLOCK_BYTES
    row = perf.measure_scoring(n=4, matching="window", impl="cs3f", budget_mb=16, queries=1, grid=6, block_mb=1)
    assert row["s_per_subject"] > 0 and row["working_mb"] >= 0 and row["block_mb"] == 1
    assert row["tokens_mb"] == pytest.approx(4 * perf.CHANNELS * 6**3 * 4 / 2**20)
    assert scoring.BLOCK_BYTES == default, "the block size of the sweep must not leak out of a measurement"


def test_matmul_ceiling_is_positive(perf):
    assert perf.matmul_flops("cpu", torch.float32, seconds=0.05, size=64) > 0


def test_musc_peer_equals_global_scoring_when_both_average_as_many_subjects(perf):
    """The peer (MuSc's compute_scores_fast, reimplemented) and CS3F's global matching answer the same question."""
    n, grid, c = 8, (3, 4, 2), 5
    tokens = torch.randn(n, c, *grid, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(n, *grid, dtype=torch.bool)
    k = int(0.3 * (n - 1))
    z = tokens.flatten(2).transpose(1, 2)
    musc = torch.stack([perf.musc_scores(z, i, 0.3) for i in range(n)])
    cs3f = mutual_scores(tokens, valid, (k - 0.5) / (n - 1), "global").flatten(1)
    torch.testing.assert_close(cs3f, musc, rtol=1e-5, atol=1e-5)


def test_peer_table_reports_the_load_ratio(perf):
    rows = [
        {
            "shape": "3d",
            "n": 8,
            "impl": impl,
            "competitors": load,
            "s_per_subject": s * (2 if load else 1),
            "s_per_subject_range": [s, s],
            "working_mb": 1.0,
            "checksum": 1.0,
            "gflops_distances": 1.0,
            "matmul_gflops": 100.0,
            "read_gb_s": 10.0,
            "threads": 1,
        }
        for load in (0, 2)
        for impl, s in (("musc", 1.0), ("global", 0.25), ("window", 0.02))
    ]
    text = "\n".join(perf.peer_markdown(rows))
    assert "| 16^3 x 64 | 8 | quiet | 1.000" in text and "2 busy processes" in text
    assert "global 1.00, window 1.00" in text  # load costs both the same here
    # 27 neighbours x 2 x 64 FLOPs x 4096 tokens x 7 others / 2 at 100 GFLOP/s: 0.495 ms; 20 ms is 40.4 times that
    assert "| 40.4x |" in text
    # over the bound: 27 FLOPs per 4 bytes x 10 GB/s / 100 GFLOP/s = 0.68; the tiled products, 64 for 27: 1.6
    assert (
        "Quiet (100 GFLOP/s of matmul, 10 GB/s read), over the memory bound: 16^3 x 64: the compute floor 0.7x, "
        in text
    )
    assert "window's tiled products at the full matmul rate 1.6x, so within 2x of the memory bound is possible" in text
    # 6.75 x 10 / 40 = 1.7 can still be within 2x of the bound, 6.75 x 10 / 30 = 2.25 cannot; the tiled products
    # (16 x 10 / 40 = 4) are out of reach at both
    at_40 = "\n".join(perf.peer_markdown([{**row, "matmul_gflops": 40.0} for row in rows]))
    assert "is possible in float32 and out of reach for the tiled formulation" in at_40
    at_30 = "\n".join(perf.peer_markdown([{**row, "matmul_gflops": 30.0} for row in rows]))
    assert "is out of reach in float32 and out of reach for the tiled formulation" in at_30


def test_window_floor_counts_the_neighbours_a_thin_grid_has(perf):
    """MuSc's 2D shape is one token thick: a window of radius 1 holds 9 positions there, not 27."""
    assert perf.window_neighbours((16, 16, 16), radius=1) == 27 and perf.window_neighbours((37, 37, 1), radius=1) == 9
    assert perf.window_neighbours((37, 37, 1), radius=2) == 25 and perf.window_neighbours((2, 5, 1), radius=2) == 15
    row = {"shape": "musc_2d", "n": 16, "matmul_gflops": 100.0, "read_gb_s": 10.0}
    # 9 x 2 x 1024 x 1369 x 15 / 2 FLOPs at 100 GFLOP/s; the tiled products: 4 x 4 region positions of 38 x 38 padded
    assert perf.window_floor_s(row) == pytest.approx(9 * 2 * 1024 * 1369 * 7.5 / 1e11)
    assert perf.tiled_products_s(row) == pytest.approx(16 * 2 * 1024 * 38 * 38 * 7.5 / 1e11)


def test_peer_measurement_times_runs_or_measures_memory(perf, monkeypatch):
    """A timed process takes the median of repeated runs (one run of a few ms is mostly noise) and measures no
    memory; the memory process measures one run and reports no time."""
    monkeypatch.setattr(perf, "PEER_SECONDS", 0.35)
    clock = itertools.count(step=0.1)  # every run takes 0.1 s on this clock
    with monkeypatch.context() as patched:
        patched.setattr(perf.time, "perf_counter", lambda: next(clock))
        timed = perf.measure_peer("3d", 5, "window", 16, threads=1)
    assert timed["runs"] == 4 and timed["s_per_subject"] == pytest.approx(0.1 / 5) and math.isnan(timed["working_mb"])
    memory = perf.measure_peer("3d", 5, "window", 16, threads=1, memory=True)
    assert memory["runs"] == 0 and math.isnan(memory["s_per_subject"]) and memory["working_mb"] >= 0
    assert memory["checksum"] == timed["checksum"]  # the same scores either way


def test_cohort_part_times_the_bundles_own_encoding_and_scoring(perf):
    """The cohort row (the GPU's 100-subject figure) times what the bundle computes, with its defaults: the scores
    are the inferer's own for the same cohort."""
    row = perf.measure_cohort(3, dict(TINY_VIT_SETTINGS))
    network, inferer, _ = perf.bundle_network_and_inferer(dict(TINY_VIT_SETTINGS))
    volumes, masks = perf.synthetic_volumes(3, TINY_VIT_SETTINGS["grid_size"])
    assert not torch.equal(volumes[0], volumes[1]) and not volumes[0][~masks[0]].any()  # subjects differ; no brain, 0
    assert row["checksum"] == pytest.approx(float(inferer(volumes, network, masks).double().nansum()), rel=1e-6)
    assert row["total_s"] == pytest.approx(row["encoding_s"] + row["scoring_s"]) and row["scoring_s"] > 0
    assert row["slices_per_s"] == pytest.approx(3 * 3 * 32 / row["encoding_s"])  # three axes of 32 slices each
    assert (row["device"], row["dtype"], row["matching"], row["slice_batch"]) == ("cpu", "fp32", "window", 32)
    assert "features of blocks [0, 1] of 2, random weights" in row["backbone"]


def test_a_cohort_of_fewer_subjects_than_the_bundle_takes_is_refused_before_any_work(tmp_path):
    cmd = [sys.executable, str(PERF), "--only", "cohort", "--cohort_subjects", "2", "--results", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2
    assert "--cohort_subjects: at least 3 subjects make a cohort, got 2" in done.stderr.splitlines()[-1]
    assert not any(tmp_path.iterdir())


def test_cohort_bar_is_judged_only_on_the_run_it_is_for(perf):
    """The issue's bar is 100 subjects in under 10 s on one H100: other rows are reported, not judged."""
    row = {"device": "NVIDIA H100 80GB HBM3", "n": 100, "total_s": 8.0, "backbone": "ViT"}
    assert perf._cohort_target(row).endswith("on one H100: met.  ")
    assert perf._cohort_target({**row, "total_s": 12.0}).endswith("on one H100: missed.  ")
    for other in ({"n": 20}, {"device": "NVIDIA H200"}, {"device": "cpu"}):
        assert perf._cohort_target({**row, **other}).endswith("not this row.  ")


def test_each_part_names_the_machine_and_bundle_it_was_measured_with(perf):
    """Parts are re-run apart, on whatever machine was lent: the report says which measured each one."""
    result = {
        "commands": {"peer": "python benchmarks/perf.py --only peer", "demo": "python benchmarks/perf.py --only demo"},
        "measured_on": {"peer": {"device": "machine B", "bundle": "0.9.2"}},
        "device": "machine B",
        "versions": {"bundle": "0.9.2"},
    }
    text = perf.markdown(result)
    assert "--only peer` (machine B, bundle 0.9.2)" in text
    assert "--only demo` (device and bundle not recorded" in text


def test_vector_math_benchmark_counts_the_processes_whose_two_scorings_differed():
    spec = importlib.util.spec_from_file_location("vector_math", PERF.parent / "vector_math.py")
    vector_math = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vector_math)
    same = {"same": True, "max_rel": 0.0}
    as_the_bundle = vector_math.child("on")  # a fresh process, as the bundle runs
    assert as_the_bundle == {"mode": "on", "workers": same, "intra-op": same}
    rows = [
        {"mode": "off", "workers": same, "intra-op": same},
        {"mode": "off", "workers": same, "intra-op": {"same": False, "max_rel": 2.9e-4}},
        {"mode": "on", "workers": same, "intra-op": same},
    ]
    table = vector_math.markdown(rows, "python benchmarks/vector_math.py", {"torch": "x"})
    assert "| off | intra-op | 2 | 1 | 2.9e-04 |" in table and "| off | workers | 2 | 0 | 0.0e+00 |" in table
    assert "| on | intra-op | 1 | 0 | 0.0e+00 |" in table
