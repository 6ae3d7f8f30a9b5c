"""A per-partition index of due times, so a tick costs time in the keys that are due.

An aggregate is *due* when a tick must look at it: a pending verification at its deadline, a
held command at the end of its grace, a concluded verification when its retention ends, a
number when something leaves its windows. In memory only: a partition's index is rebuilt
from its table the first time it ticks after a rebalance.

Each key is indexed once, at its earliest due time: a key whose due time moves later stays
where it is, is popped then, and is scheduled again by its owner; so the index holds about one
entry per key, however often keys change.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any


class DueIndex:
    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[float, bytes]]] = {}
        self._indexed: dict[int, dict[bytes, float]] = {}

    def ready(self, partition: int) -> bool:
        return partition in self._heaps

    def build(self, partition: int, entries: Iterable[tuple[float, bytes]]) -> None:
        """Index a partition from ``(due, key)`` entries (epoch seconds), one per key."""
        indexed = {key: due for due, key in entries}
        heap = [(due, key) for key, due in indexed.items()]
        heapq.heapify(heap)
        self._heaps[partition], self._indexed[partition] = heap, indexed

    def schedule(self, partition: int, due: float, key: bytes) -> None:
        """Make sure ``key`` is popped at ``due`` or earlier."""
        heap = self._heaps.get(partition)
        if heap is None:  # not yet built: the build will find the key in the table
            return
        indexed = self._indexed[partition]
        if indexed.get(key, float("inf")) > due:
            indexed[key] = due
            heapq.heappush(heap, (due, key))

    def pop_due(self, partition: int, now: float) -> list[bytes]:
        """Pop and return the keys due at or before ``now``."""
        heap = self._heaps.get(partition, [])
        indexed = self._indexed.get(partition, {})
        keys = []
        while heap and heap[0][0] <= now:
            due, key = heapq.heappop(heap)
            if indexed.get(key) == due:  # else a stale entry: the key moved earlier
                del indexed[key]
                keys.append(key)
        return keys

    def size(self, partition: int) -> int:
        return len(self._indexed.get(partition, {}))

    def forget_all(self, *args: Any, **kwargs: Any) -> None:
        """After a rebalance: every partition is rebuilt from its table at its next tick."""
        self._heaps.clear()
        self._indexed.clear()
