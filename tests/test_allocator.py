"""The allocator setting: freed memory is kept while encoding and scoring, and handed back afterwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scripts import allocator, scoring
from scripts.allocator import _LIBC, keep_freed_memory
from scripts.inferer import CohortInferer

pytestmark = pytest.mark.skipif(_LIBC is None, reason="glibc's mallopt is only on Linux with glibc")
BLOCK_MB = 256


def _resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _touch_and_free() -> None:
    block = np.ones(BLOCK_MB << 18)  # 256 MB of float64, every page written
    del block


def test_freed_memory_is_kept_inside_and_returned_after():
    _LIBC.malloc_trim(0)
    before = _resident_mb()
    _touch_and_free()
    assert _resident_mb() - before < BLOCK_MB / 4, "outside the block, glibc returns a large block at once"
    with keep_freed_memory():
        with keep_freed_memory():  # nested (a server encoding inside a request): the outermost block decides
            _touch_and_free()
        kept = _resident_mb() - before
        assert kept > BLOCK_MB * 3 / 4, f"freed memory was returned inside the block ({kept:.0f} MB kept)"
    assert _resident_mb() - before < BLOCK_MB / 4, "the memory kept was not handed back on leaving the block"


@pytest.mark.parametrize(("matching", "kept"), [("window", True), ("global", False)])
def test_window_scoring_keeps_freed_memory_while_it_runs(monkeypatch, matching, kept):
    """Window matching's temporaries are reused, not faulted in again, in every group of a run; global matching is
    left to glibc (its blocks, kept, fragmented the heap among the rows held back between pairs)."""
    seen = []
    real = scoring.mean_of_closest
    monkeypatch.setattr(scoring, "mean_of_closest", lambda d, k: seen.append(allocator._depth) or real(d, k))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 2 * 6, 3, 4, 5, generator=g)  # two groups of 6 channels
    valid = torch.ones(4, 3, 4, 5, dtype=torch.bool)
    scoring.mutual_scores(tokens[:, :6], valid, matching=matching)
    assert seen == [int(kept)] * 4 and allocator._depth == 0
    seen.clear()
    CohortInferer(matching=matching, progress=False).score(tokens, valid, num_groups=2)
    assert seen == [2 * int(kept)] * 8 and allocator._depth == 0, "the groups of one run do not share one block"
