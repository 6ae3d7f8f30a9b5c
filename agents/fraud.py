"""The fraud guard's stage (rule 20), keyed by prefix, country or client address.

Reads ``verification.guard`` and ``verification.fraud`` (co-partitioned: both keyed by the
prefix ``+1425555``, the country ``US``, or ``ip:<address>``) and keeps each key's state
(:mod:`phoneverify.models.fraud`) in the ``guard`` table:

- **deliveries and conclusions** from the actor, keyed by the number's prefix: each
  verification's deliveries wait for their answer under a key of their own
  (``waiting:<instance_id>``, in the prefix's partition) and are judged (converted, or not)
  into the prefix's counts per time bucket; the judgments of a batch are forwarded to the
  prefix's country (``Judged``), and a prefix or country that converts too little is blocked:
  a ``FraudBlock`` on ``verification.fraud``. A tick judges deliveries left unanswered for
  ``FRAUD_ANSWER_SECONDS`` (its cost follows the deliveries due) and ends blocks whose time is
  over;
- **operators' blocks and unblocks**, read back from ``verification.fraud`` (the guard's own
  records come back too and change nothing);
- **starts and resends carrying a client address** (from intake and the actor): admitted
  ones go on to admission (by number), those over ``HTTP_STARTS_PER_IP`` are answered
  ``rate_limited`` with the seconds until one would be admitted.

Every worker also follows ``verification.fraud`` from its beginning (:data:`blocks`): intake
refuses starts to a prefix or country blocked there.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime
from typing import Annotated

from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import EventT, StreamT
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from phoneverify.agents.app import app, names, settings
from phoneverify.agents.batch import AggregateTable, Outbox, aggregate_table, batches, guarded
from phoneverify.agents.deadlines import DueIndex
from phoneverify.agents.records import dead_letter, describe, tick_time
from phoneverify.models import fraud
from phoneverify.models.fraud import (
    ADDRESS,
    WAITING,
    Address,
    Concluded,
    Delivered,
    FraudBlock,
    Judged,
    Judgment,
    Level,
    Waiting,
    Watch,
)
from phoneverify.models.messages import Admission, PhoneDelivery, PhoneStart
from phoneverify.ops import metrics
from phoneverify.topics import partition_for

log = logging.getLogger("phoneverify")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
policy = settings.fraud_policy

_REQUEST: TypeAdapter[Delivered | Concluded | Judged | PhoneStart | PhoneDelivery] = \
    TypeAdapter(Annotated[Delivered | Concluded | Judged | PhoneStart | PhoneDelivery,
                          Field(discriminator="type")], config={"strict": True})

inputs = app.topic(names.guard, names.fraud, key_type=bytes, value_type=bytes,
                   key_serializer="raw", value_serializer="raw")
guard_table: AggregateTable = aggregate_table("guard")
due = DueIndex()
app.on_partitions_assigned.connect(due.forget_all)
app.on_partitions_revoked.connect(due.forget_all)


def level_of(key: str) -> Level | None:
    """A table key's level: a prefix, a country, or (None) a client address or a
    verification's deliveries waiting for their answer."""
    if key.startswith((ADDRESS, WAITING)):
        return None
    return "prefix" if key.startswith("+") else "country"


def _model(key: str) -> type[Watch] | type[Address] | type[Waiting]:
    if key.startswith(ADDRESS):
        return Address
    return Waiting if key.startswith(WAITING) else Watch


def _due(key: str, state: BaseModel) -> datetime | None:
    if isinstance(state, Address):
        return fraud.address_due(state, settings.http_ip_window_seconds)
    if isinstance(state, Waiting):
        return fraud.waiting_due(state, policy)
    assert isinstance(state, Watch)
    return fraud.next_due(state, policy)


def _empty(state: BaseModel) -> bool:
    return not state.starts if isinstance(state, Address) else state.is_empty  # type: ignore[attr-defined]


class States:
    """The keys one batch reads and changes (written once, at the end)."""

    def __init__(self) -> None:
        self.changed: dict[str, tuple[int, BaseModel]] = {}

    def get(self, key: str, partition: int) -> BaseModel:
        if key in self.changed:
            return self.changed[key][1]
        raw = guard_table.read(key.encode(), partition)
        model = _model(key)
        return model.model_validate_json(raw) if raw is not None else model()

    def put(self, key: str, partition: int, state: BaseModel) -> None:
        self.changed[key] = (partition, state)

    async def write(self) -> None:
        await guard_table.write({
            key.encode(): (partition, None if _empty(state) else state.model_dump_json().encode())
            for key, (partition, state) in self.changed.items()})
        for key, (partition, state) in self.changed.items():
            when = _due(key, state)
            if when is not None:
                due.schedule(partition, when.timestamp(), key.encode())


class Batch:
    """One batch: decided in memory; outputs first, then the table (a batch handled again
    after a crash publishes the same blocks again, and counts its judgments twice at most)."""

    def __init__(self) -> None:
        self.outbox, self.states = Outbox(), States()
        #: Judgments to forward, per country: (judged, converted), latest time.
        self.forward: dict[str, tuple[Judgment, datetime]] = {}
        self.blocked: list[Level] = []

    async def run(self, records: list[EventT]) -> None:
        for event in records:
            try:
                await self.take(event)
            except (ValidationError, ValueError, OverflowError) as error:
                await dead_letter(self.outbox, event, describe(error))
        for country, (judgment, at) in self.forward.items():
            record = Judged(judged=judgment.judged, converted=judgment.converted, at=at)
            await self.outbox.send(names.guard, country.encode(), record.to_bytes(),
                                   partition=partition_for(country.encode(),
                                                           settings.partitions))
        await self.outbox.flush()
        await self.states.write()
        for level in self.blocked:
            metrics.fraud_blocks.labels(level).inc()

    async def take(self, event: EventT) -> None:
        message = event.message
        raw_key, partition = message.key or b"", message.partition
        if raw_key == b"tick":
            if message.topic == names.guard:
                await self.tick(partition, tick_time(event))
            return
        key = raw_key.decode("utf-8", "replace")
        if message.topic == names.fraud:
            self.operator(key, partition, FraudBlock.from_bytes(message.value))
            return
        request = _REQUEST.validate_json(message.value or b"")
        if isinstance(request, PhoneStart | PhoneDelivery):
            await self.address(key, partition, request)
        elif isinstance(request, Judged):
            if not _COUNTRY.fullmatch(key):
                raise ValueError("record key must be a country (ISO region code)")
            await self.count(key, partition, "country",
                             Judgment(request.judged, request.converted), request.at)
        elif settings.fraud_guard and not fraud.is_safe(request.phone_number, policy):
            if key != fraud.prefix_of(request.phone_number):
                raise ValueError("record key must be the number's prefix")
            # The verification's deliveries wait under a key of their own: a record costs
            # the same however many wait in the prefix.
            waiting_key = WAITING + request.instance_id
            waiting = self.waiting(waiting_key, partition)
            if isinstance(request, Delivered):
                country = waiting.country or fraud.country_of(request.phone_number)
                self.states.put(waiting_key, partition,
                                fraud.deliver(waiting, key, country, request.at))
            elif not waiting.is_empty:
                after, judgment = fraud.conclude(waiting, request.verified)
                self.states.put(waiting_key, partition, after)
                await self.judged(waiting, partition, judgment, request.at)

    def watch(self, key: str, partition: int) -> Watch:
        state = self.states.get(key, partition)
        assert isinstance(state, Watch)
        return state

    def waiting(self, key: str, partition: int) -> Waiting:
        state = self.states.get(key, partition)
        assert isinstance(state, Waiting)
        return state

    async def judged(self, waiting: Waiting, partition: int, judgment: Judgment,
                     at: datetime) -> None:
        """Count a verification's judged deliveries for its prefix (in the same partition),
        and forward them to its country (summed, once per batch)."""
        if not judgment.judged:
            return
        await self.count(waiting.prefix, partition, "prefix", judgment, at)
        if waiting.country is not None:
            before, when = self.forward.get(waiting.country, (Judgment(), at))
            self.forward[waiting.country] = (before + judgment, max(when, at))

    async def count(self, key: str, partition: int, level: Level, judgment: Judgment,
                    at: datetime) -> None:
        watch = fraud.count(self.watch(key, partition), judgment, at, policy)
        await self.judge(key, partition, level, watch, at)

    async def judge(self, key: str, partition: int, level: Level, watch: Watch,
                    now: datetime) -> None:
        watch, block = fraud.judge(watch, level, key, now, policy)
        self.states.put(key, partition, watch)
        if block is not None:
            log.warning("fraud guard: %s %s blocked until %s: %d of %d deliveries converted "
                        "in the last %g s", level, key, block.blocked_until, block.converted,
                        block.judged, policy.window)
            await self.publish(block)
            self.blocked.append(level)

    async def publish(self, record: FraudBlock) -> None:
        key = record.key.encode()
        await self.outbox.send(names.fraud, key, record.to_bytes(),
                               partition=partition_for(key, settings.partitions))

    def operator(self, key: str, partition: int, record: FraudBlock) -> None:
        """A record of ``verification.fraud``: an operator's, or the guard's own."""
        if record.key != key:
            raise ValueError("record key must be the block's key")
        watch = self.watch(key, partition)
        after = fraud.apply(watch, record)
        if after != watch:
            self.states.put(key, partition, after)
            if record.blocked and record.by == "operator":
                self.blocked.append(record.level)
                log.warning("fraud guard: %s %s blocked by an operator until %s",
                            record.level, key, record.blocked_until)
            elif not record.blocked:
                log.warning("fraud guard: %s %s unblocked by an operator", record.level, key)

    async def address(self, key: str, partition: int, asked: PhoneStart | PhoneDelivery
                      ) -> None:
        """A start or resend that names its client's address: on to the number's admission,
        or refused (over the address's limit; a resend to a blocked prefix before it counts).
        """
        if not key.startswith(ADDRESS) or key[len(ADDRESS):] != asked.client_ip:
            raise ValueError("record key must be ip: and the record's client_ip")
        delivery = isinstance(asked, PhoneDelivery)
        iid = asked.instance_id.encode()
        common = {"instance_id": asked.instance_id, "requested_at": asked.requested_at,
                  "origin": asked.origin, "kind": "delivery" if delivery else "start",
                  "request_id": None if delivery else asked.request_id}
        blocked = refused(asked.phone_number, asked.requested_at) if delivery else None
        if blocked is not None:  # intake refused blocked starts already
            verdict = Admission(verdict="blocked_number", detail=blocked, **common)
            await self.outbox.send(names.admitted, iid, verdict.to_bytes(),
                                   partition=partition_for(iid, settings.partitions))
            return
        address = self.states.get(key, partition)
        assert isinstance(address, Address)
        limit, window = settings.http_starts_per_ip, settings.http_ip_window_seconds
        retry, after = fraud.admit_address(address, asked.origin, asked.requested_at, limit,
                                           window)
        self.states.put(key, partition, after)
        if retry is None:
            await self.outbox.send(names.admission, asked.phone_number.encode(),
                                   asked.to_bytes())
            return
        what = "codes requested" if delivery else "verifications started"
        verdict = Admission(
            verdict="rate_limited", retry_after=retry,
            detail=f"too many {what} from {asked.client_ip}: at most {limit} starts and "
                   f"resends in {window:g} s", **common)
        await self.outbox.send(names.admitted, iid, verdict.to_bytes(),
                               partition=partition_for(iid, settings.partitions))

    async def tick(self, partition: int, now: datetime) -> None:
        """Judge what went unanswered, end blocks, forget what left the windows."""
        if not due.ready(partition):
            due.build(partition, _due_entries(partition))
        for raw in due.pop_due(partition, now.timestamp()):
            key = raw.decode()
            state = self.states.get(key, partition)
            level = level_of(key)
            if isinstance(state, Address):
                self.states.put(key, partition, fraud.prune_address(
                    state, now, settings.http_ip_window_seconds))
                continue
            if isinstance(state, Waiting):
                if state.is_empty:
                    continue  # concluded since, and deleted
                waiting, judgment = fraud.expire(state, now, policy)
                if judgment.judged:
                    self.states.put(key, partition, waiting)
                    await self.judged(state, partition, judgment, now)
                elif (when := fraud.waiting_due(state, policy)) is not None:
                    due.schedule(partition, when.timestamp(), raw)  # popped before its time
                continue
            assert isinstance(state, Watch) and level is not None
            watch, record = fraud.lift(state, level, key, now, policy)
            if record is not None:
                log.info("fraud guard: the block of %s %s ended", level, key)
                await self.publish(record)
            await self.judge(key, partition, level, fraud.prune(watch, now, policy), now)


def _due_entries(partition: int) -> list[tuple[float, bytes]]:
    entries = []
    for key, raw in guard_table.items_in(partition):
        name = key.decode()
        when = _due(name, _model(name).model_validate_json(raw))
        if when is not None:
            entries.append((when.timestamp(), key))
    return entries


@app.agent(inputs, concurrency=1)
async def guard(stream: StreamT[bytes]) -> None:
    async for records in batches(stream):
        await guarded("fraud guard", Batch().run(records))


# ---------------------------------------------------------------- every worker's view


class Blocks:
    """The last record of each key of ``verification.fraud``, as this worker has read it."""

    def __init__(self) -> None:
        self.records: dict[str, FraudBlock] = {}
        #: Set once the topic was read to the end it had when the worker started.
        self.loaded = asyncio.Event()

    def in_force(self, now: datetime | None = None) -> list[FraudBlock]:
        now = now or datetime.now(UTC)
        return sorted((r for r in self.records.values() if r.in_force(now)),
                      key=lambda r: (r.level, r.key))


blocks = Blocks()
metrics.watch_fraud_blocks(lambda: [block.level for block in blocks.in_force()])


@app.task
async def follow_blocks() -> None:
    """Read ``verification.fraud`` from its beginning, then follow it, into :data:`blocks`."""
    while True:
        try:
            await _follow()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("fraud guard: reading %s failed; again in 1 s", names.fraud,
                        exc_info=True)
            await asyncio.sleep(1.0)


async def _follow() -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_wait_ms=100, isolation_level="read_committed")
    try:  # a worker stopped while this starts closes it too (else: "Unclosed AIOKafkaConsumer")
        await consumer.start()
        partitions = [TopicPartition(names.fraud, p) for p in range(settings.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        while True:
            fetched = await consumer.getmany(timeout_ms=1000)
            for records in fetched.values():
                for record in records:
                    try:
                        block = FraudBlock.from_bytes(record.value)
                    except (ValidationError, ValueError):
                        continue  # the guard's stage dead-letters it
                    blocks.records[block.key] = block
            if not blocks.loaded.is_set():
                positions = [await consumer.position(tp) for tp in ends]
                if all(at >= end for at, end in zip(positions, ends.values(), strict=True)):
                    blocks.loaded.set()
    finally:
        await consumer.stop()


def refused(phone: str, at: datetime) -> str | None:
    """Why a start to ``phone`` at ``at`` is refused by a block in force, or None."""
    if not settings.fraud_guard:
        return None
    block = fraud.blocking(phone, blocks.records, at, policy)
    return None if block is None else fraud.refusal(block, at)
