"""CPU threads for torch ops, chosen deliberately rather than left to the default.

Big matrix products (the encoder, global matching) use every physical core. Scoring runs many medium-sized ops, each
ending at a barrier where all threads wait for the slowest: on a machine shared with other busy processes a thread
that loses its core stalls every op, and two threads can be slower than one (``benchmarks/perf.py --only peer``
measured it for 0.8.1: window scoring 3x slower with two threads than with one next to two busy processes, 1.7x
faster on a quiet machine). Which count is faster depends on the load at the time, so :class:`FastestThreadCount`
measures it on the run's own work: after one unit that warms up, the next units run once under each candidate, the
rest under the fastest. Results do not depend on the thread count (tested).

Where the work is many independent units (a whole cohort's comparisons, one subject against the later ones), the
threads are better spent as :func:`single_threaded_workers`: each unit runs on one worker thread, so the threads meet
once per unit instead of at every op's barrier.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

__all__ = [
    "physical_cores",
    "torch_threads",
    "FastestThreadCount",
    "warm_up_vector_math",
    "ready_vector_math",
    "single_threaded_workers",
    "calls_ahead",
]

logger = logging.getLogger(__name__)
Item = TypeVar("Item")
Result = TypeVar("Result")
MapInOrder = Callable[[Callable[[Item], Result], Iterable[Item]], Iterator[Result]]
_VECTOR_MATH_READY: set[int] = set()  # intra-op thread counts whose threads have made their first VML call
_WARM_UP_PER_THREAD = 2048  # elements; each of two threads was seen taking half of a 2560-element sqrt


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads share a core's arithmetic units)."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:  # no topology exposed (some containers): count every CPU
            return len(cpus)
    return max(1, len(cores))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the body with ``count`` intra-op threads, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def warm_up_vector_math(count: int) -> None:
    """Square roots of throwaway data, split among ``count`` intra-op threads: each makes its first VML call on them."""
    torch.ones(_WARM_UP_PER_THREAD * count).sqrt_()


def ready_vector_math(device: torch.device) -> None:
    """Have every intra-op thread make its first call into MKL's vector math (VML) now, on throwaway data (CPU only).

    torch's CPU ``sqrt`` runs on VML (MKL 2024.2 inside torch 2.14.1), split among the intra-op threads. Measured: in
    1-8 % of fresh processes, the first ``sqrt`` with two threads, after a batched matrix product and a reduction,
    computed one thread's half of 2560 distances with up to 3e-4 relative error (about the accuracy of VML's
    enhanced-performance mode), the same call repeated exact; the scores then depended on the process. Once per
    thread count, microseconds.
    """
    count = torch.get_num_threads()
    if device.type == "cpu" and count not in _VECTOR_MATH_READY:
        warm_up_vector_math(count)
        _VECTOR_MATH_READY.add(count)


def _start_worker() -> None:
    """A worker thread's first step: torch on this thread alone, its first vector-math call on throwaway data (as
    :func:`ready_vector_math` does for intra-op threads; a new thread has never made one)."""
    torch.set_num_threads(1)
    warm_up_vector_math(1)


def calls_ahead(count: int) -> int:
    """How many calls :func:`single_threaded_workers` with ``count`` workers may run ahead of the result last taken
    (what their results add to the memory held): none for the builtin ``map`` of one worker."""
    return count if count > 1 else 0


@contextlib.contextmanager
def single_threaded_workers(count: int) -> Iterator[MapInOrder]:
    """A ``map`` that runs its calls on ``count`` worker threads, each running torch on one thread; results in order.

    Independent units of medium-sized ops (a subject compared with the later ones) split among intra-op threads wait at
    every op's barrier for the slowest thread; on worker threads they only meet when a result is taken. Measured
    (2 cores, 32 subjects of 16^3 x 64 tokens, each subject against the later ones, ms per subject, 2 intra-op threads
    against 2 workers): window 8.8-9.7 and 8.7-9.3 on a quiet machine, 36-41 and 18 next to 2 busy processes; global
    460-482 and 423-545 quiet, 2717 and 891 loaded (``benchmarks/perf.py --only peer`` has the whole scoring). Results
    are the same to the bit.

    At most ``count`` calls run ahead of the result last taken, so memory stays bounded. While open, the calling thread
    also runs torch on one thread (its work on each result would otherwise compete with the workers); on exit torch's
    thread count is restored for the whole process (a new thread starts from the count last set on any thread). With
    ``count`` 1, the builtin ``map`` and nothing changed. Calls run in the caller's inference mode and grad mode.
    """
    if count <= 1:
        yield map
        return
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def in_callers_mode(function: Callable[[Item], Result], item: Item) -> Result:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return function(item)

    def map_in_order(function: Callable[[Item], Result], items: Iterable[Item]) -> Iterator[Result]:
        running: collections.deque[Future[Result]] = collections.deque()
        for item in items:
            running.append(pool.submit(in_callers_mode, function, item))
            if len(running) > calls_ahead(count):
                yield running.popleft().result()
        while running:
            yield running.popleft().result()

    with torch_threads(1):
        pool = ThreadPoolExecutor(count, thread_name_prefix="cs3f-worker", initializer=_start_worker)
        try:
            yield map_in_order
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class FastestThreadCount:
    """Run repeated units of work (say, the scoring of each token group) under the fastest of a few thread counts.

    The first unit runs under the first candidate and is not timed: it also pays what a process pays once (lazily
    loaded kernels, the thread pool, memory touched for the first time; measured: a first window scoring of 8 subjects
    took 37-45 ms with 2 threads, the later ones 24-31 ms, and 37-46 ms with 1 thread, so timing it chose 1 thread
    about one time in five). The next units run once under each candidate and are timed; every later unit runs under
    the fastest. No work is repeated: the trial units' results are the results. Meant for units of similar cost.

    Args:
        candidates: thread counts to try, in order (default: all physical cores, then one).
    """

    def __init__(self, candidates: Sequence[int] | None = None) -> None:
        self.candidates = list(dict.fromkeys(candidates or (physical_cores(), 1)))
        self.seconds: dict[int, float] = {}
        self.warmed_up = False

    @property
    def chosen(self) -> int | None:
        """The fastest count once every candidate was timed, else ``None``."""
        if len(self.seconds) < len(self.candidates):
            return None
        return min(self.seconds, key=self.seconds.__getitem__)

    def __call__(self, unit: Callable[[], Result]) -> Result:
        if not self.warmed_up:
            self.warmed_up = True
            with torch_threads(self.candidates[0]):
                return unit()
        untried = [count for count in self.candidates if count not in self.seconds]
        count = untried[0] if untried else self.chosen
        with torch_threads(count):
            start = time.perf_counter()
            result = unit()
            if untried:
                self.seconds[count] = time.perf_counter() - start
                if len(untried) == 1:
                    timings = ", ".join(f"{c} threads {s:.3f} s" for c, s in self.seconds.items())
                    logger.info("scoring threads: %d (first units: %s)", self.chosen, timings)
        return result
