"""Thread-count choice: measured on the run's own units of work, with results independent of the count."""

from __future__ import annotations

import os
import time

import pytest
import torch

from scripts import threads
from scripts.scoring import mutual_scores
from scripts.threads import FastestThreadCount, physical_cores, torch_threads


def test_physical_cores_within_the_cpus_this_process_may_use():
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


def test_torch_threads_restores_the_previous_count():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_fastest_thread_count_times_each_candidate_once_then_keeps_the_fastest():
    """A unit that is slow with 2 threads (a loaded machine): after one unit that warms up, 2 and 1 are tried once
    each, then 1 is kept."""
    seen = []

    def unit() -> int:
        seen.append(torch.get_num_threads())
        time.sleep(0.2 if torch.get_num_threads() == 2 else 0.01)
        return len(seen)

    run = FastestThreadCount((2, 1))
    assert run.chosen is None
    assert [run(unit) for _ in range(6)] == [1, 2, 3, 4, 5, 6]  # every result is returned, no unit runs twice
    assert seen == [2, 2, 1, 1, 1, 1]
    assert run.chosen == 1 and set(run.seconds) == {1, 2}


def test_the_warm_up_unit_is_not_timed():
    """A process's first unit is slow whatever the count (one-time costs): timing it would pick the other count."""
    seen = []

    def unit() -> None:
        time.sleep(0.2 if not seen else 0.01 if torch.get_num_threads() == 2 else 0.05)
        seen.append(torch.get_num_threads())

    run = FastestThreadCount((2, 1))
    for _ in range(4):
        run(unit)
    assert seen == [2, 2, 1, 2] and run.chosen == 2


@pytest.mark.parametrize("matching", ["window", "global"])
def test_scores_do_not_depend_on_the_thread_count(matching):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(6, 16, 8, 8, 8, generator=g)
    valid = torch.rand(6, 8, 8, 8, generator=g) > 0.2
    with torch_threads(2):
        two = mutual_scores(tokens, valid, 0.3, matching, 1)
    with torch_threads(1):
        one = mutual_scores(tokens, valid, 0.3, matching, 1)
    assert torch.equal(two.nan_to_num(), one.nan_to_num())


def test_scoring_has_each_thread_count_make_its_first_vector_math_call_on_throwaway_data(monkeypatch):
    """The scores' square roots are never a thread's first VML call (see ``threads.ready_vector_math``): scoring
    readies the count it runs with, once."""
    g = torch.Generator().manual_seed(0)
    tokens, valid = torch.randn(4, 8, 4, 4, 4, generator=g), torch.ones(4, 4, 4, 4, dtype=torch.bool)
    monkeypatch.setattr(threads, "_VECTOR_MATH_READY", set())
    calls = []
    real_ones = torch.ones
    monkeypatch.setattr(torch, "ones", lambda *size, **kw: calls.append(size) or real_ones(*size, **kw))
    with torch_threads(2):
        mutual_scores(tokens, valid, 0.3, "window", 1)
        mutual_scores(tokens, valid, 0.3, "global", 1)
    with torch_threads(1):
        mutual_scores(tokens, valid, 0.3, "window", 1)
    threads.ready_vector_math(torch.device("meta"))  # not a CPU: no VML, nothing to ready
    assert threads._VECTOR_MATH_READY == {1, 2}
    assert calls == [(2 * 2048,), (2048,)]
