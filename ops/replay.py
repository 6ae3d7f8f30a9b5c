"""Replay: rebuild every aggregate from ``verification.events`` alone and compare it with the
live table (the ``verifications`` changelog), reporting every difference.

This is the proof that the state is event-sourced: if the table were lost, folding the events
with ``evolve`` gives it back. Redelivered duplicates (same instance and ``seq``, same event)
are skipped; a different event under a used ``seq``, or a gap, is reported.

    phoneverify replay [--json]      exit 0: no difference, 1: differences found
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import TypeAdapter

from phoneverify.models.verification import Event, Verification, evolve, initial_state
from phoneverify.settings import Settings
from phoneverify.topics import Names

EVENT = TypeAdapter(Event)


@dataclass
class Report:
    events: int = 0
    duplicates: int = 0
    rebuilt: int = 0
    live: int = 0
    matching: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


Record = tuple[bytes | None, bytes | None]


async def read_all(settings: Settings, topic: str) -> AsyncIterator[Record]:
    """Every record of ``topic`` from the beginning up to its end as of now: (key, value)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for messages in batch.values():
                for message in messages:
                    yield message.key, message.value
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()


async def rebuild(settings: Settings, topic: str, report: Report) -> dict[str, Verification]:
    """Fold ``verification.events`` per instance; duplicates skipped, conflicts reported."""
    states: dict[str, Verification] = {}
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    async for _key, value in read_all(settings, topic):
        record = json.loads(value or b"{}")
        seq = record.pop("seq")
        event = EVENT.validate_python(record)
        report.events += 1
        iid = event.instance_id
        earlier = seen.get((iid, seq))
        if earlier is not None:
            report.duplicates += 1
            if earlier != record:
                report.problems.append(f"{iid}: two different events with seq {seq}")
            continue
        seen[(iid, seq)] = record
        state = states.get(iid) or initial_state(iid)
        if seq != state.version + 1:
            report.problems.append(f"{iid}: event seq {seq} after version {state.version}")
        states[iid] = evolve(state, event)
    report.rebuilt = len(states)
    return states


async def live_table(settings: Settings, changelog: str, report: Report) -> dict[str, Verification]:
    """The table as its changelog holds it: the last value per key, tombstones removed."""
    table: dict[str, Verification] = {}
    async for key, value in read_all(settings, changelog):
        iid = (key or b"").decode()
        if value is None:
            table.pop(iid, None)
        else:
            table[iid] = Verification.model_validate(json.loads(value)["state"])
    report.live = len(table)
    return table


def compare(rebuilt: dict[str, Verification], live: dict[str, Verification],
            report: Report) -> None:
    for iid in sorted(rebuilt.keys() | live.keys()):
        if iid not in live:
            report.problems.append(f"{iid}: in the events, not in the table")
        elif iid not in rebuilt:
            report.problems.append(f"{iid}: in the table, not in the events")
        elif rebuilt[iid] != live[iid]:
            a, b = rebuilt[iid].model_dump(), live[iid].model_dump()
            fields = ", ".join(f"{k}: events={a[k]!r} table={b[k]!r}" for k in a if a[k] != b[k])
            report.problems.append(f"{iid}: differs ({fields})")
        else:
            report.matching += 1


async def run(settings: Settings) -> Report:
    names = Names(settings.topic_prefix)
    report = Report()
    rebuilt = await rebuild(settings, names.events, report)
    changelog = f"{settings.app_id}-verifications-changelog"
    live = await live_table(settings, changelog, report)
    compare(rebuilt, live, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phoneverify replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = asyncio.run(run(Settings()))
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}))
    else:
        print(f"events read:        {report.events} ({report.duplicates} redelivered duplicates)")
        print(f"aggregates rebuilt: {report.rebuilt}")
        print(f"aggregates in table: {report.live}")
        print(f"identical:          {report.matching}")
        for problem in report.problems:
            print(f"DIFFERENCE {problem}")
        print("replay: no difference" if report.ok else
              f"replay: {len(report.problems)} difference(s)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
