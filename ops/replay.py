"""Replay: rebuild every verification from verification.events alone and compare it with
what the live table (the verifications changelog) holds, reporting every difference.

This is the proof that the state is event-sourced: if the table were lost, folding the events
with evolve() gives it back. Events come in streams, one per life of an instance id (an id is
free again once its verification is no longer kept, and a later start begins a new life);
each stream is numbered by seq. Redelivered duplicates (same stream and seq, same event) are
skipped; a different event under a used seq, or a gap, is reported. Verifications the table
no longer keeps (past VERIFICATION_RETENTION_SECONDS) are rebuilt and counted, not compared.

exit status: 0 no difference, 1 differences found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
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
    no_longer_kept: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


Record = tuple[bytes | None, bytes | None]


async def records(bootstrap: str, topic: str, partitions: int) -> AsyncIterator[ConsumerRecord]:
    """Every committed record of ``topic`` from the beginning up to its end as of now (as a
    ``read_committed`` consumer sees them: none of an aborted transaction)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for messages in batch.values():
                for message in messages:
                    yield message
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()


async def read_all(settings: Settings, topic: str) -> AsyncIterator[Record]:
    """Every record of ``topic`` from the beginning up to its end as of now: (key, value)."""
    async for message in records(settings.kafka_bootstrap_servers, topic, settings.partitions):
        yield message.key, message.value


async def caught_up(bootstrap: str, group: str, topics: Iterable[str], partitions: int,
                    timeout: float, interval: float = 0.1,
                    give_up: Callable[[], bool] | None = None) -> None:
    """Wait until consumer ``group`` has committed every record of ``topics`` produced so far
    (then what the workers made of them is in Kafka); ``TimeoutError`` after ``timeout``.
    Returns early once ``give_up()`` is true (the workers crashed, say)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed")
    await admin.start()
    await consumer.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for topic in topics:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            ends = await consumer.end_offsets(tps)
            while True:
                committed = await admin.list_consumer_group_offsets(group, partitions=tps)
                behind = [tp for tp in tps if ends[tp] > 0 and (
                    tp not in committed or committed[tp].offset < ends[tp])]
                behind = [tp for tp in behind if tp not in committed or await _holds_records(
                    consumer, tp, committed[tp].offset, ends[tp])]
                if give_up is not None and give_up():
                    return
                if not behind:
                    break
                if loop.time() > deadline:
                    raise TimeoutError(f"workers still behind on {behind}")
                await asyncio.sleep(interval)
    finally:
        await consumer.stop()
        await admin.close()


async def _holds_records(consumer: AIOKafkaConsumer, tp: TopicPartition, start: int,
                         end: int) -> bool:
    """Whether offsets ``start`` to ``end`` (excluded) of ``tp`` hold a committed record (under
    transactions a committed offset may be followed by nothing but a commit marker)."""
    consumer.assign([tp])
    consumer.seek(tp, max(start, 0))  # -1: the group committed nothing there yet
    while await consumer.position(tp) < end:
        batch = await consumer.getmany(tp, timeout_ms=1000)
        if any(message.offset < end for message in batch.get(tp, [])):
            return True
        if not batch:
            return await consumer.position(tp) < end
    return False


Stream = tuple[str, str]  # (instance_id, life)


async def rebuild(settings: Settings, topic: str, report: Report) -> dict[Stream, Verification]:
    """Fold ``verification.events`` per stream; duplicates skipped, conflicts reported."""
    states: dict[Stream, Verification] = {}
    seen: dict[tuple[Stream, int], dict[str, Any]] = {}
    async for _key, value in read_all(settings, topic):
        record = json.loads(value or b"{}")
        seq, life = record.pop("seq"), record.pop("life", "")
        event = EVENT.validate_python(record)
        report.events += 1
        stream = (event.instance_id, life)
        earlier = seen.get((stream, seq))
        if earlier is not None:
            report.duplicates += 1
            if earlier != record:
                report.problems.append(f"{stream[0]}: two different events with seq {seq}")
            continue
        seen[(stream, seq)] = record
        state = states.get(stream) or initial_state(event.instance_id)
        if seq != state.version + 1:
            report.problems.append(f"{stream[0]}: event seq {seq} after version "
                                   f"{state.version}")
        states[stream] = evolve(state, event)
    report.rebuilt = len(states)
    return states


async def live_table(settings: Settings, changelog: str,
                     report: Report) -> dict[str, tuple[str, Verification]]:
    """The table as its changelog holds it: the last value per key, tombstones removed."""
    table: dict[str, tuple[str, Verification]] = {}
    async for key, value in read_all(settings, changelog):
        iid = (key or b"").decode()
        if iid.startswith("#"):  # not a verification: a partition's outbox
            continue
        if value is None:
            table.pop(iid, None)
        else:
            stored = json.loads(value)
            table[iid] = (stored["life"], Verification.model_validate(stored["state"]))
    report.live = len(table)
    return table


def compare(rebuilt: dict[Stream, Verification], live: dict[str, tuple[str, Verification]],
            report: Report) -> None:
    for iid, (life, state) in sorted(live.items()):
        events = rebuilt.get((iid, life))
        if events is None:
            report.problems.append(f"{iid}: in the table, not in the events")
        elif events != state:
            a, b = events.model_dump(), state.model_dump()
            fields = ", ".join(f"{k}: events={a[k]!r} table={b[k]!r}" for k in a if a[k] != b[k])
            report.problems.append(f"{iid}: differs ({fields})")
        else:
            report.matching += 1
    kept = {(iid, life) for iid, (life, _) in live.items()}
    report.no_longer_kept = sum(1 for stream, state in rebuilt.items()
                                if stream not in kept and not state.is_empty)


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
    parser.add_argument("--bootstrap-servers", metavar="HOST:PORT",
                        help="Kafka (default: $KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092)")
    args = parser.parse_args(argv)
    settings = Settings()
    if args.bootstrap_servers:
        settings = settings.model_copy(update={"kafka_bootstrap_servers": args.bootstrap_servers})
    report = asyncio.run(run(settings))
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}))
    else:
        print(f"events read:        {report.events} ({report.duplicates} redelivered duplicates)")
        print(f"aggregates rebuilt: {report.rebuilt}")
        print(f"aggregates in table: {report.live}")
        print(f"identical:          {report.matching}")
        print(f"no longer kept:     {report.no_longer_kept} (past their retention)")
        for problem in report.problems:
            print(f"DIFFERENCE {problem}")
        print("replay: no difference" if report.ok else
              f"replay: {len(report.problems)} difference(s)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
