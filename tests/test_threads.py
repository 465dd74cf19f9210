"""Thread-count choice: measured on the run's own units of work, with results independent of the count."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from scripts import threads
from scripts.scoring import mutual_scores
from scripts.threads import FastestThreadCount, physical_cores, single_threaded_workers, torch_threads


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
    """One thread compares the subjects one after the other, 2 or 3 compare them on as many workers: the same bits."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(6, 16, 8, 8, 8, generator=g)
    valid = torch.rand(6, 8, 8, 8, generator=g) > 0.2
    scores = {}
    for count in (1, 2, 3):
        with torch_threads(count):
            scores[count] = mutual_scores(tokens, valid, 0.3, matching, 1).nan_to_num()
    assert torch.equal(scores[2], scores[1]) and torch.equal(scores[3], scores[1])


def test_single_threaded_workers_hand_results_on_in_order_running_a_bounded_number_ahead():
    started, taken = [], []

    def unit(i: int) -> tuple[int, int, bool]:
        started.append(i)
        time.sleep(0.02 * (i % 3 == 0))  # later units finish first
        return i, torch.get_num_threads(), torch.is_inference_mode_enabled()

    with torch.inference_mode(), single_threaded_workers(2) as map_in_order:
        assert torch.get_num_threads() == 1  # the caller's own work on each result leaves the cores to the workers
        for i, threads_in_unit, inference in map_in_order(unit, range(10)):
            assert len(started) <= i + 1 + 2  # never more than 2 ahead of the result taken
            taken.append(i)
            assert threads_in_unit == 1 and inference  # one intra-op thread each, in the caller's inference mode
    assert taken == list(range(10)) and sorted(started) == list(range(10))


def test_single_threaded_workers_restore_the_thread_count_for_threads_started_later():
    """A new thread starts from the count last set on any thread (a MONAI Label request's thread, say)."""

    def count_in_a_new_thread() -> int:
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return seen[0]

    with torch_threads(2):
        with single_threaded_workers(2) as map_in_order:
            list(map_in_order(lambda i: torch.ones(4).sum(), range(4)))
        assert torch.get_num_threads() == 2 and count_in_a_new_thread() == 2


def test_single_threaded_workers_pass_a_units_error_on_and_stop():
    def unit(i: int) -> int:
        if i == 3:
            raise ValueError("subject 3 is broken")
        return i

    taken = []
    with pytest.raises(ValueError, match="subject 3"):
        with single_threaded_workers(2) as map_in_order:
            taken.extend(map_in_order(unit, range(100)))
    assert taken == [0, 1, 2]


def test_one_worker_is_the_builtin_map_with_nothing_changed():
    with torch_threads(2), single_threaded_workers(1) as map_in_order:
        assert map_in_order is map and torch.get_num_threads() == 2


def test_every_thread_that_scores_makes_its_first_vector_math_call_on_throwaway_data(monkeypatch):
    """The scores' square roots are never a thread's first VML call (see ``threads.ready_vector_math``): the calling
    thread readies each intra-op count once, every worker thread readies itself."""
    g = torch.Generator().manual_seed(0)
    tokens, valid = torch.randn(4, 8, 4, 4, 4, generator=g), torch.ones(4, 4, 4, 4, dtype=torch.bool)
    monkeypatch.setattr(threads, "_VECTOR_MATH_READY", set())
    first_sqrt: dict[tuple[threading.Thread, int], int] = {}  # (thread, its intra-op count) -> elements of its first
    real_sqrt = torch.Tensor.sqrt_

    def recorded_sqrt(self: torch.Tensor) -> torch.Tensor:
        first_sqrt.setdefault((threading.current_thread(), torch.get_num_threads()), self.numel())
        return real_sqrt(self)

    monkeypatch.setattr(torch.Tensor, "sqrt_", recorded_sqrt)
    warm_ups = []  # (thread, intra-op count) of every warm-up
    real_warm_up = threads.warm_up_vector_math

    def recorded_warm_up(count: int) -> None:
        warm_ups.append((threading.current_thread(), count))
        real_warm_up(count)

    monkeypatch.setattr(threads, "warm_up_vector_math", recorded_warm_up)
    with torch_threads(2):
        for matching in ("window", "global"):
            mutual_scores(tokens, valid, 0.3, matching, 1)  # the whole cohort: on 2 workers
        mutual_scores(tokens, valid, 0.3, "window", 1, subjects=[0, 1])  # one at a time: on 2 intra-op threads
    with torch_threads(1):
        mutual_scores(tokens, valid, 0.3, "window", 1, subjects=[0, 1])
    threads.ready_vector_math(torch.device("meta"))  # not a CPU: no VML, nothing to ready
    assert threads._VECTOR_MATH_READY == {1, 2}
    workers = {thread for thread, _ in first_sqrt if thread.name.startswith("cs3f-worker")}
    assert len(workers) == 4  # two per whole-cohort scoring, each new
    assert {(thread, count) for thread, count in first_sqrt if thread not in workers} == {
        (threading.main_thread(), 2),
        (threading.main_thread(), 1),
    }
    assert all(elements == 2048 * count for (_, count), elements in first_sqrt.items())
    main = [count for thread, count in warm_ups if thread is threading.main_thread()]
    # each count once, not once per scoring: 1 beside the workers, then 2 for one subject at a time
    assert main == [1, 2]
    assert sorted(thread.name for thread, count in warm_ups if thread in workers and count == 1) == sorted(
        thread.name for thread in workers
    )  # and each worker once, when it starts
