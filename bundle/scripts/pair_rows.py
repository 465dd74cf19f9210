"""Each pair of subjects compared once, every subject's distances handed on as soon as they are complete.

Scoring a whole cohort needs, for every ordered pair (i, j), the distance from each token of i to its nearest match in
j. One comparison of i with j gives both directions (row and column minima of one distance matrix), so the cohort
costs N (N - 1) / 2 comparisons instead of N (N - 1). Subjects are taken in order: subject i is compared with the
later subjects only, its distances to the earlier ones having come from their comparisons. Its row is then complete
and leaves at once, so what is held back is only the later subjects' distances to the earlier ones: at most about
N^2 / 4 rows of tokens, never the whole N x N x T matrix. The comparisons of different subjects are independent: given
a ``map`` over worker threads (``threads.single_threaded_workers``), a few run at once, ahead of the row being handed
on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .threads import MapInOrder

__all__ = ["each_pair_once", "held_bytes"]

ToLater = Callable[[int], "tuple[torch.Tensor, torch.Tensor]"]


def each_pair_once(
    num_subjects: int, to_later: ToLater, map_in_order: MapInOrder = map
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(i, distances)`` for i = 0 .. N-1: ``(N-1, *grid)`` distances from i to every other subject, in order.

    Args:
        num_subjects: N.
        to_later: ``to_later(i)`` compares subject i with subjects i+1 .. N-1 and returns two ``(N-1-i, *grid)``
            tensors: i's distances to each of them, and each of theirs to i.
        map_in_order: how the ``to_later`` calls run: ``map`` one after the other, or a ``map`` that runs a bounded
            number ahead on other threads and hands the results on in order.
    """
    earlier: list[list[torch.Tensor]] = [[] for _ in range(num_subjects)]
    for i, (to_them, from_them) in enumerate(map_in_order(to_later, range(num_subjects))):
        for offset, distances in enumerate(from_them):
            earlier[i + 1 + offset].append(distances.clone())  # a copy: the block it came from can go
        yield i, torch.cat([*(row[None] for row in earlier[i]), to_them])  # one copy
        earlier[i] = []


def held_bytes(num_subjects: int, tokens: int, element_bytes: int = 4, ahead: int = 0) -> int:
    """Most memory ``each_pair_once`` holds: the later subjects' distances to the earlier ones at the cohort's midpoint,
    plus one subject's outgoing, incoming and yielded rows, and the outgoing and incoming rows of the ``ahead``
    comparisons that may run ahead of it."""
    return (num_subjects * num_subjects // 4 + (3 + 2 * ahead) * num_subjects) * tokens * element_bytes
