"""The performance benchmark's own parts: its naive reference scores what CS3F scores, and a measurement runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

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
