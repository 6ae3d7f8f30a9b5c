"""Group commit: agents take records in batches, and write what a batch causes in one go.

Per batch, an agent decides every record in memory, then writes its tables through
:meth:`AggregateTable.write` (one changelog record per changed key, the last value,
acknowledged by Kafka *before* the local RocksDB store is written) and its outputs through an
:class:`Outbox` (acknowledged once for the whole batch). Which comes first is the agent's
choice: see the actor and admission for why each chose its order.

The batch's input records are acknowledged to Faust after that, and Faust commits their
offsets only after flushing the producer: a crash redelivers every record whose batch did not
finish. The local store never holds a write that Kafka lacks, which is what lets a restarted
worker trust its store and replay only the changelog's tail.

Under ``PROCESSING_GUARANTEE=exactly_once`` the same calls go into Kafka transactions, one per
input partition of the batch (:mod:`phoneverify.agents.transactions`): ``batches`` hands the
agent one partition's records at a time with its transaction open, the writes and sends of
the agent go into it, and the transactions commit with their input offsets once the agent
has handled every part; the local store is written after that.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from typing import Any

import faust
from aiokafka import TopicPartition
from faust.types import TP, EventT, StreamT
from rocksdict import WriteBatch

from phoneverify.agents import fence, transactions
from phoneverify.agents.app import app
from phoneverify.ops import metrics

#: Most records in one batch, and the longest a batch waits for the rest of a burst.
BATCH_SIZE = 1000
BATCH_WITHIN = 0.005
#: Faust's RocksDB store keeps each partition's changelog offset under this key.
_OFFSET_KEY = b"__faust\0offset__"


async def batches(stream: StreamT[bytes], size: int = BATCH_SIZE,
                  within: float = BATCH_WITHIN) -> AsyncIterator[list[EventT]]:
    """The stream's records, a batch at a time, each acknowledged once the next is asked for.

    As Faust's ``Stream.take_events`` (a processor buffers what the stream's passive drainer
    takes), with two differences that matter here: with nothing to do it waits for the first
    record as long as it takes (``take_events`` wakes up every ``within``, which costs an idle
    worker a tenth of a core), and once a record is there it takes what is already fetched,
    without waiting out ``within`` (which would add that much latency to every hop).
    """
    taken: list[EventT] = []
    arrived, room = asyncio.Event(), asyncio.Event()
    room.set()

    async def buffer(value: Any) -> Any:
        while len(taken) >= size:  # full: wait until the batch is handed over
            room.clear()
            await stream.wait(room)  # type: ignore[arg-type]
        taken.append(stream.current_event)  # type: ignore[arg-type]
        arrived.set()
        return value

    stream.enable_acks = False  # acknowledged below, once handled
    stream.add_processor(buffer)
    stream._enable_passive(aiter(stream.channel))  # type: ignore[attr-defined]
    try:
        while not stream.should_stop:
            await stream.wait_for_stopped(arrived)  # type: ignore[arg-type]
            await _rest_of_burst(taken, size, within)
            batch = taken[:size]
            del taken[:size]
            if not taken:
                arrived.clear()
            room.set()
            if batch and transactions.EXACTLY_ONCE:
                async for part in _in_transactions(batch):
                    yield part
            elif batch:
                yield batch
            for event in batch:
                await stream.ack(event)
    finally:
        stream._processors.remove(buffer)  # type: ignore[attr-defined]


async def _in_transactions(batch: list[EventT]) -> AsyncIterator[list[EventT]]:
    """The batch one input partition at a time, each handled inside that partition's
    transaction; the transactions commit (concurrently, the one before committing while the
    next is handled) with their input offsets once all are handled."""
    parts: dict[int, list[EventT]] = defaultdict(list)
    for event in batch:
        parts[event.message.partition].append(event)
    commits, used = [], []
    busy = transactions.producers.busy
    for partition, events in sorted(parts.items()):
        group = transactions.group_of(events[0].message.topic)
        producer = None if group is None else transactions.producers.get(group, partition)
        if producer is None:  # fetched before this partition was revoked: not ours now
            continue
        name = f"{group}[{partition}]"
        busy.add(producer)
        used.append(producer)
        try:
            await producer.begin_transaction()
        except Exception as error:
            transactions.stop(name, error)
        txn = transactions.Transaction(producer, name)
        offsets: dict[TopicPartition, int] = {}
        for event in events:
            tp = TopicPartition(event.message.topic, partition)
            offsets[tp] = max(offsets.get(tp, 0), event.message.offset + 1)
        token = transactions.current.set(txn)
        try:
            yield events
        finally:
            transactions.current.reset(token)
        commits.append(asyncio.ensure_future(txn.commit(offsets)))
    try:
        await asyncio.gather(*commits)
    finally:
        busy.difference_update(used)


async def guarded(agent: str, work: Awaitable[None]) -> None:
    """Handle one batch; if that fails for another reason than its input (Kafka refused a
    write, say), stop the process at once: it starts again from the last commit. (Faust would
    restart the agent, which goes on past the failed batch's records; and a worker whose
    agent died keeps answering health checks while it consumes nothing.)"""
    if not transactions.EXACTLY_ONCE:  # under transactions the broker fences a zombie
        fence.check()
    try:
        await work
    except Exception:
        logging.getLogger("phoneverify").critical(
            "%s: a batch could not be handled; stopping the worker", agent, exc_info=True)
        logging.shutdown()
        os._exit(70)  # EX_SOFTWARE; a supervisor starts it again


async def _rest_of_burst(taken: list[EventT], size: int, within: float) -> None:
    """Let records already fetched join the batch: until one turn of the event loop brings
    none (the stream's drainer moves one queued record per turn), ``size``, or ``within``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while len(taken) < size and loop.time() < deadline:
        before = len(taken)
        await asyncio.sleep(0)
        if len(taken) == before:
            return


class Outbox:
    """Records sent while a batch is handled, acknowledged together by :meth:`flush`."""

    def __init__(self) -> None:
        self._acks: list[Any] = []

    async def send(self, topic: str, key: bytes | None, value: bytes | None, *,
                   partition: int | None = None, timestamp: float | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> None:
        """Hand one record to the producer, or to the transaction in progress (no round trip
        here)."""
        txn = transactions.current.get()
        if txn is not None:
            await txn.send(topic, key, value, partition, timestamp, headers)
            return
        fence.check()
        self._acks.append(await app.producer.send(topic, key, value, partition, timestamp,
                                                  headers))

    async def flush(self) -> None:
        """Wait until Kafka has acknowledged everything sent so far (raises if it refused).
        In a transaction, nothing to wait for: its commit is what makes the records count."""
        acks, self._acks = self._acks, []
        if acks:
            await asyncio.gather(*acks)


class AggregateTable(faust.Table):
    """A Faust table whose keys are read and written by partition, a batch at a time.

    Faust keeps the changelog topic, restores the RocksDB store from it (only the tail past
    the store's recorded offset), assigns partitions and routes web requests to their owner.
    Faust's own ``table[key] = value`` would write the store before Kafka has the changelog
    record, and into the partition of whatever record the stream saw last; this class writes
    explicitly to the key's partition, changelog first.
    """

    @property
    def _rocksdb(self) -> Any:
        return self.data  # faust.stores.rocksdb.Store

    def read(self, key: bytes, partition: int) -> bytes | None:
        return self._rocksdb._db_for_partition(partition).get(key)

    def items_in(self, partition: int) -> Iterator[tuple[bytes, bytes]]:
        for key, value in self._rocksdb._db_for_partition(partition).items():
            if key != _OFFSET_KEY:
                yield key, value

    async def write(self, changes: Mapping[bytes, tuple[int, bytes | None]]) -> None:
        """Set (or, with ``None``, delete) each key in its partition: changelog, then store.

        Records are sent in the mapping's order, and Kafka keeps a partition's records in the
        order they were sent: if one is durable, so is every record sent before it there."""
        if not changes:
            return
        topic = self.changelog_topic.get_topic_name()
        txn = transactions.current.get()
        if txn is not None:  # the store is written once the transaction committed
            acks = [await txn.send(topic, key, value, partition)
                    for key, (partition, value) in changes.items()]
            changes = dict(changes)
            txn.after.append(lambda: self._write_local(
                topic, changes, [ack.result() for ack in acks]))
            return
        fence.check()
        acks = [await app.producer.send(topic, key, value, partition, None, None)
                for key, (partition, value) in changes.items()]
        self._write_local(topic, changes, await asyncio.gather(*acks))

    def _write_local(self, topic: str, changes: Mapping[bytes, tuple[int, bytes | None]],
                     written: list[Any]) -> None:
        """Write ``changes`` to RocksDB, and the changelog offsets Kafka gave them."""
        local: dict[int, WriteBatch] = defaultdict(lambda: WriteBatch(raw_mode=True))
        for key, (partition, value) in changes.items():
            if value is None:
                local[partition].delete(key)
            else:
                local[partition].put(key, value)
        for partition, batch in local.items():
            self._rocksdb._db_for_partition(partition).write(batch)
        offsets: dict[int, int] = {}
        for metadata in written:
            offsets[metadata.partition] = max(metadata.offset, offsets.get(metadata.partition, -1))
        for partition, offset in offsets.items():
            self._rocksdb.set_persisted_offset(TP(topic, partition), offset)


#: RocksDB sized for small values and many partitions: Faust's defaults (a 64 MiB memtable,
#: three of them, and a 2 GiB block cache, for every partition of every table) let a worker's
#: memory grow by gigabytes before anything is flushed or evicted. With these, each partition
#: of each table holds at most 2 x 2 MiB of memtables and 4 MiB of cached blocks.
ROCKSDB = {"write_buffer_size": 2 << 20, "max_write_buffer_number": 2,
           "target_file_size_base": 8 << 20, "block_cache_size": 4 << 20,
           "block_cache_compressed_size": 1 << 20}


def aggregate_table(name: str) -> AggregateTable:
    """A table of this app keyed by bytes, with the deployment's partition count."""
    from phoneverify.agents.app import settings

    return app.tables.add(AggregateTable(  # type: ignore[return-value]
        app, name=name, key_type=bytes, value_type=bytes, partitions=settings.partitions,
        beacon=app.tables.beacon, options=dict(ROCKSDB)))


def _open_stores() -> Iterator[Any]:
    """Every open RocksDB database of the app's tables (one per partition held)."""
    for table in list(app.tables.values()):
        yield from list(getattr(table.data, "_dbs", {}).values())


metrics.watch_stores(_open_stores)
