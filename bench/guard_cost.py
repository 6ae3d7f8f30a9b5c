"""The fraud guard stage's cost per record as its state grows (rule 20's worst case).

A pumping run makes one prefix hold many deliveries waiting for their answer. This drives the
stage's own batch code (:class:`phoneverify.agents.fraud.Batch`: parse, decide, write) with an
in-memory table and outbox, one record per batch (the worst case: a run of a few records a
second arrives one at a time), and prints the time per record:

- ``one prefix``: every delivery to the same prefix, never answered, so the number waiting
  there grows to ``--n``;
- ``spread``: each delivery to a prefix of its own (what honest traffic looks like);
- the tick that finds them all unanswered (its cost should follow the deliveries due).

    .venv/bin/python -m bench.guard_cost --n 10000

No broker is needed; the figures are ratios inside one run (absolute times vary with load).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from phoneverify.agents.app import names, settings  # the app first: it imports its agents
from phoneverify.models.fraud import Delivered, prefix_of
from phoneverify.models.messages import Tick
from phoneverify.topics import partition_for

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
stage: Any = importlib.import_module("phoneverify.agents.fraud")


class MemoryTable:
    """The guard table's three calls, in memory (values kept as the bytes the stage writes)."""

    def __init__(self) -> None:
        self.data: dict[int, dict[bytes, bytes]] = defaultdict(dict)

    def read(self, key: bytes, partition: int) -> bytes | None:
        return self.data[partition].get(key)

    def items_in(self, partition: int) -> Iterator[tuple[bytes, bytes]]:
        yield from list(self.data[partition].items())

    async def write(self, changes: Mapping[bytes, tuple[int, bytes | None]]) -> None:
        for key, (partition, value) in changes.items():
            if value is None:
                self.data[partition].pop(key, None)
            else:
                self.data[partition][key] = value


class MemoryOutbox:
    def __init__(self) -> None:
        self.sent = 0

    async def send(self, topic: str, key: bytes | None, value: bytes | None, **_: Any) -> None:
        self.sent += 1

    async def flush(self) -> None:
        pass


def record(key: bytes, value: bytes, at: datetime) -> Any:
    partition = partition_for(key, settings.partitions)
    return SimpleNamespace(message=SimpleNamespace(
        key=key, value=value, topic=names.guard, partition=partition, offset=0,
        timestamp=at.timestamp(), headers=()))


def delivered(phone: str, n: int) -> Any:
    at = T0 + timedelta(milliseconds=10 * n)  # all inside the answer window
    value = Delivered(instance_id=f"pump-{n}", phone_number=phone, at=at).to_bytes()
    return record(prefix_of(phone).encode(), value, at)


async def run(records: list[Any], bounds: list[int]) -> list[float]:
    """Each record as a batch of its own; the mean seconds per record between the bounds."""
    at = [time.perf_counter()]
    for n, event in enumerate(records, start=1):
        await stage.Batch().run([event])
        if n in bounds:
            at.append(time.perf_counter())
    return [(t1 - t0) / (n1 - n0) for t0, t1, n0, n1
            in zip(at, at[1:], bounds, bounds[1:], strict=False)]


async def tick_all(at: datetime) -> float:
    """One tick on every partition at ``at``; the time it took."""
    began = time.perf_counter()
    for partition in range(settings.partitions):
        value = Tick(partition=partition, now=at).to_bytes()
        event = SimpleNamespace(message=SimpleNamespace(
            key=b"tick", value=value, topic=names.guard, partition=partition, offset=0,
            timestamp=at.timestamp(), headers=()))
        await stage.Batch().run([event])
    return time.perf_counter() - began


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="deliveries per run")
    args = parser.parse_args()
    logging.getLogger("phoneverify").setLevel(logging.ERROR)  # not a line per block
    if not settings.fraud_guard:
        raise SystemExit("FRAUD_GUARD is off: nothing to measure")
    stage.Outbox = MemoryOutbox
    bounds = [0, *sorted({m for m in (100, 1_000, 10_000, 100_000) if m < args.n} | {args.n})]
    print(f"fraud guard stage, one record per batch, {args.n} deliveries never answered "
          f"(FRAUD_ANSWER_SECONDS={settings.fraud_answer_seconds:g})")
    for name, phone in (("one prefix", lambda n: f"+44740012{n % 10_000:04d}"),
                        ("spread", lambda n: f"+447{n:06d}0000")):
        stage.guard_table = MemoryTable()
        stage.due.forget_all()
        times = await run([delivered(phone(n), n) for n in range(args.n)], bounds)
        ranges = ", ".join(f"{lo + 1}-{hi}: {t * 1e6:.0f}" for lo, hi, t in
                           zip(bounds, bounds[1:], times, strict=False))
        print(f"  {name:<11} µs per delivery record (by deliveries so far) {ranges}")
        took = await tick_all(T0 + timedelta(seconds=settings.fraud_answer_seconds + 60))
        print(f"  {name:<11} the tick that judges all {args.n} unanswered: {took:.2f} s "
              f"({took / args.n * 1e6:.0f} µs per delivery)")

if __name__ == "__main__":
    asyncio.run(main())
