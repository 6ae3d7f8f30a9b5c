"""Restoring tables in batches: a worker without its store reads its changelogs in large
fetches and writes each fetch to RocksDB as one write batch, before Faust's own recovery looks.

Faust restores a table one record at a time: each fetched changelog record goes through the
consumer's handoff to the conductor (decoding, an event, a queue), then a queue wait and a
``need_recovery`` check in ``Recovery._slurp_changelogs``; only the final write to RocksDB is
batched. A profile of a restore put about 95% of the time in that per-record plumbing
(``docs/restore.md``), which held a restore to a few thousand records a second.

:func:`apply` wraps Faust's ``Recovery._build_offsets``: once Faust has worked out, for each
active changelog partition, the offset its store holds (and ``ops/recovery.py`` has set aside
a store ahead of the cluster), the partitions behind their changelog's end are read here, with
a consumer of their own (``read_committed``, assigned, no group), from the offset after the
store's to the end Faust measured. Each fetch of a partition is one ``WriteBatch`` holding its
records (a ``None`` value deletes the key, as Faust's restore does) and the partition's
changelog offset, so the store and its offset move together. At the end each partition's
offset is the changelog's last (the last record's, or a transaction marker's after it), and
Faust, which reads its start offsets from what was just written, finds nothing left to
restore. Standby partitions (followed all along) are left to Faust.

The worker stays not ready meanwhile (``/readyz`` 503: Faust's recovery is under way). Faust
bounds each step of its recovery by ``broker_request_timeout``; a restore that runs past half
of it keeps what it wrote and starts Faust's recovery over, which goes on from there.
If Kafka refuses the batched reads, Faust's own restore reads the rest.
``RESTORE_BATCH=false`` leaves restoring to Faust alone.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from faust.tables.recovery import Recovery
from faust.types import TP
from rocksdict import WriteBatch

log = logging.getLogger("phoneverify")

#: Most bytes fetched per partition and per request (Kafka's defaults: 1 MiB, 50 MiB).
PARTITION_FETCH_BYTES = 8 << 20
FETCH_BYTES = 64 << 20
#: A partition store's memtable while it is restored (the table's own, a few MiB, is set back
#: after): fewer flushes and compactions, about a quarter less CPU per record in a trial.
RESTORE_WRITE_BUFFER = 16 << 20
#: How often progress is logged.
SAY_EVERY = 5.0

_PATCHED = "_phoneverify_batched_restore"


def _bootstrap(recovery: Recovery) -> list[str]:
    return [f"{url.host}:{url.port or 9092}" for url in recovery.app.conf.broker]


async def restore(recovery: Recovery, behind: dict[TP, tuple[int, int]],
                  destination: MutableMapping[TP, int | None], budget: float) -> bool:
    """Read each partition of ``behind`` (``tp: (last offset held, last offset to read)``)
    into its table's store, noting progress in ``destination``. Returns False if ``budget``
    seconds ran out first (what was read is kept)."""
    stores = {tp: recovery.tp_to_table[tp].data for tp in behind}
    ends = {TopicPartition(tp.topic, tp.partition): last + 1 for tp, (_, last) in behind.items()}
    tps = {TopicPartition(tp.topic, tp.partition): tp for tp in behind}
    total = sum(last - held for held, last in behind.values())
    consumer = AIOKafkaConsumer(
        bootstrap_servers=_bootstrap(recovery), client_id=f"{recovery.app.conf.id}-restore",
        enable_auto_commit=False, isolation_level="read_committed",
        auto_offset_reset="earliest", max_partition_fetch_bytes=PARTITION_FETCH_BYTES,
        fetch_max_bytes=FETCH_BYTES, fetch_max_wait_ms=100)
    await consumer.start()
    began = said = time.monotonic()
    cpu = time.process_time()
    read = 0
    dbs = {tp: stores[tp]._db_for_partition(tp.partition) for tp in behind}
    for db in dbs.values():
        db.set_options({"write_buffer_size": str(RESTORE_WRITE_BUFFER)})
    log.info("Restoring state from changelog topics in batches: %d offsets to read in %d "
             "partitions", total, len(behind))
    try:
        consumer.assign(list(tps))
        for ktp, tp in tps.items():
            consumer.seek(ktp, max(behind[tp][0] + 1, 0))
        left = set(tps)
        while left:
            fetched = await consumer.getmany(*left, timeout_ms=500)
            for ktp, records in fetched.items():
                store, end = stores[tps[ktp]], ends[ktp]
                batch, last = WriteBatch(raw_mode=True), None
                for record in records:
                    if record.offset >= end:
                        break
                    if record.value is None:
                        batch.delete(record.key)
                    else:
                        batch.put(record.key, record.value)
                    last = record.offset
                    read += 1
                if last is not None:
                    batch.put(store.offset_key, str(last).encode())
                    dbs[tps[ktp]].write(batch)
                    destination[tps[ktp]] = last
            for ktp in list(left):
                if await consumer.position(ktp) >= ends[ktp]:  # past records, markers, aborts
                    left.discard(ktp)
                    tp = tps[ktp]
                    stores[tp].set_persisted_offset(tp, ends[ktp] - 1)
                    destination[tp] = ends[ktp] - 1
            now = time.monotonic()
            if left and now - began > budget:
                log.info("restoring in batches: %d of %d records in %.1f s; going on in a new "
                         "round of recovery", read, total, now - began)
                return False
            if left and now - said >= SAY_EVERY:
                said = now
                log.info("restoring in batches: %d of %d records (%.0f/s)", read, total,
                         read / (now - began))
    finally:
        await consumer.stop()
        for tp, db in dbs.items():
            db.set_options({"write_buffer_size": str(stores[tp].rocksdb_options.write_buffer_size)})
            db.flush()  # the large memtables go now, not when the next writes fill them
    seconds, cpu = time.monotonic() - began, time.process_time() - cpu
    log.info("Done reading from changelog topics in batches: %d records in %.2f s (%.0f "
             "records/s; the process' CPU %.2f s, %.0f records per CPU second)", read, seconds,
             read / seconds if seconds else 0.0, cpu, read / cpu if cpu else 0.0)
    return True


def _batched(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Faust's ``Recovery._build_offsets``, then, for the active partitions, :func:`restore`
    of every partition behind its changelog's end."""

    @functools.wraps(method)
    async def wrapper(self: Recovery, consumer: Any, tps: set[TP],
                      destination: MutableMapping[TP, int | None], title: str) -> None:
        await method(self, consumer, tps, destination, title)
        if title != "active" or not _enabled:
            return
        behind = {}
        for tp in tps:
            held, last = destination.get(tp), self.active_highwaters.get(tp)
            if held is not None and last is not None and held < last:
                behind[tp] = (held, last)
        if not behind:
            return
        budget = float(self.app.conf.broker_request_timeout) / 2
        try:
            if not await restore(self, behind, destination, budget):
                self.signal_recovery_start.set()  # Faust starts over from what is stored now
        except KafkaError as error:  # Faust's restore reads the rest, from what was written
            log.warning("restoring in batches failed (%r): Faust's restore reads the rest",
                        error)

    setattr(wrapper, _PATCHED, True)
    return wrapper


_enabled = True


def apply(enabled: bool = True) -> None:
    """Patch Faust's ``Recovery`` once (a second call only changes ``enabled``); after
    :func:`phoneverify.ops.recovery.apply`, so its check of the stored offsets runs first."""
    global _enabled
    _enabled = enabled
    if not getattr(Recovery._build_offsets, _PATCHED, False):
        Recovery._build_offsets = _batched(Recovery._build_offsets)  # type: ignore[method-assign]
