"""A per-partition index of deadlines, so a tick costs time in the verifications that expire.

In memory only: it is rebuilt from the table the first time a partition ticks after a
rebalance. Entries are never removed early; a verification that concluded before its deadline
is popped at its deadline and skipped (one dictionary look-up).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from datetime import datetime
from typing import Any


class Deadlines:
    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[datetime, bytes]]] = {}

    def ready(self, partition: int) -> bool:
        return partition in self._heaps

    def rebuild(self, entries: Iterable[tuple[int, datetime, bytes]], partitions: int) -> None:
        """Index every partition at once from ``(partition, deadline, key)`` entries."""
        heaps: dict[int, list[tuple[datetime, bytes]]] = {p: [] for p in range(partitions)}
        for partition, deadline, key in entries:
            heaps[partition].append((deadline, key))
        for heap in heaps.values():
            heapq.heapify(heap)
        self._heaps = heaps

    def add(self, partition: int, deadline: datetime, key: bytes) -> None:
        heap = self._heaps.get(partition)
        if heap is not None:  # not yet built: the rebuild will find it in the table
            heapq.heappush(heap, (deadline, key))

    def due(self, partition: int, now: datetime) -> list[bytes]:
        """Pop and return the keys whose deadline is at or before ``now``."""
        heap = self._heaps.get(partition, [])
        keys = []
        while heap and heap[0][0] <= now:
            keys.append(heapq.heappop(heap)[1])
        return keys

    def pending(self, partition: int) -> int:
        return len(self._heaps.get(partition, []))

    def forget_all(self, *args: Any, **kwargs: Any) -> None:
        """After a rebalance: every partition is rebuilt from the table at its next tick."""
        self._heaps.clear()
