"""Exactly once (``PROCESSING_GUARANTEE=exactly_once``): each batch in Kafka transactions.

Under ``exactly_once`` the records an agent takes (:func:`phoneverify.agents.batch.batches`)
are split by input partition, and each partition's part is one transaction: its changelog
records (:meth:`AggregateTable.write <phoneverify.agents.batch.AggregateTable.write>`), its
outputs (:class:`Outbox <phoneverify.agents.batch.Outbox>`) and its input offsets
(``send_offsets_to_transaction``) commit together or not at all. The local RocksDB store is
written only once the transaction committed. A consumer reading ``read_committed`` sees each
record once; one reading ``read_uncommitted`` may also see those of aborted transactions.

Fencing. aiokafka has only ``TxnOffsetCommit`` v0 (no KIP-447: the broker does not check the
consumer group's generation), so, as Kafka Streams' ``exactly_once`` (v1) and Faust do, each
input partition of each agent has its own transactional producer, with a transactional id
derived from the partition: ``<app id>-<agent's first input topic>-<partition>``. A worker
that is assigned a partition starts that producer *before* it reads the partition's committed
offset and before the tables' recovery reads their changelogs
(:data:`phoneverify.ops.faust_fixes.ON_ASSIGNED`): the broker then bumps the id's
epoch, which aborts the previous owner's open transaction (or lets one already committing
finish first) and fences its producer. So the offset read is final, and a previous owner
that comes back (a zombie, frozen past its session) fails its next send or commit with
``ProducerFenced``: it writes nothing more and exits (:data:`EXIT_FENCED`; a supervisor
starts it again, and it rejoins the group).

Every agent's input topics are transactional under ``exactly_once``: Faust commits none of
their offsets (a commit of Faust's landing after a transaction's would move the group back),
so every agent must take its records through ``batches``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import InvalidProducerEpoch, ProducerFenced
from faust.types import TP

from phoneverify.agents.app import app, settings
from phoneverify.ops import faust_fixes

log = logging.getLogger("phoneverify")

#: Whether this worker commits its batches in transactions.
EXACTLY_ONCE = settings.processing_guarantee == "exactly_once"
#: The exit status of a worker whose producer the broker fenced (EX_TEMPFAIL, as the clock
#: fence of :mod:`phoneverify.agents.fence`: another worker owns its partitions now).
EXIT_FENCED = 75
#: Longest a transaction's commit, or the start of a partition's producer, may take before
#: the worker gives up and exits (aiokafka can wait forever on a coordinator that died:
#: aio-libs/aiokafka#905, #1134); its open transaction is aborted by the next owner.
LIMIT = 30.0
#: Errors by which the broker says another producer holds the transactional id now.
FENCED = (ProducerFenced, InvalidProducerEpoch)

#: The transaction of the partition an agent is handling now (set by ``batches``).
current: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar(
    "transaction", default=None)


class Transaction:
    """One input partition's part of a batch: its records, offsets and local writes."""

    def __init__(self, producer: AIOKafkaProducer, name: str) -> None:
        self.producer = producer
        self.name = name
        self.acks: list[asyncio.Future[Any]] = []
        #: Run once the transaction committed (the local store's writes).
        self.after: list[Callable[[], None]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes | None,
                   partition: int | None = None, timestamp: float | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[Any]:
        """Hand one record to the transaction (no round trip here)."""
        ack = await self.producer.send(
            topic, value, key=key, partition=partition, headers=headers,
            timestamp_ms=None if timestamp is None else int(timestamp * 1000))
        self.acks.append(ack)
        return ack

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit the records and ``offsets`` (the next offset to read, per partition), then
        run the local writes. Any failure stops the process (see :func:`stop`)."""
        try:
            await asyncio.wait_for(self._commit(offsets), LIMIT)
        except Exception as error:
            stop(self.name, error)
        for write in self.after:
            write()

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.acks:
            await asyncio.gather(*self.acks)
        await self.producer.send_offsets_to_transaction(offsets, app.conf.id)
        await self.producer.commit_transaction()
        # Faust's stall detector reads when each partition was last committed.
        thread = getattr(app.consumer, "_thread", None)
        committed_at = getattr(thread, "tp_last_committed_at", None)
        if committed_at is not None:
            now = time.monotonic()
            for tp in offsets:
                committed_at[TP(tp.topic, tp.partition)] = now


def stop(name: str, error: BaseException) -> None:
    """Exit at once: 75 if the broker fenced this producer, else 70 (a supervisor starts the
    worker again; the open transaction is aborted by the partition's next owner)."""
    fenced = isinstance(error, FENCED)
    if fenced:
        log.critical("%s: fenced by the broker (%s): another worker owns this partition now, "
                     "so this one writes nothing more and exits (a supervisor starts it "
                     "again; nothing is lost)", name, type(error).__name__)
    else:
        log.critical("%s: a transaction could not be committed; stopping the worker", name,
                     exc_info=error)
    logging.shutdown()
    os._exit(EXIT_FENCED if fenced else 70)


def group_of(topic: str) -> str | None:
    """The agent group (its first input topic, without the prefix) that reads ``topic``."""
    return _groups().get(topic)


_topic_groups: dict[str, str] = {}


def _groups() -> dict[str, str]:
    """Topic -> its agent's group, from the app's agents (built once they are registered)."""
    if not _topic_groups:
        for agent in app.agents.values():
            topics = sorted(getattr(agent.channel, "topics", ()) or ())
            if topics:
                group = topics[0].removeprefix(settings.topic_prefix)
                _topic_groups.update({topic: group for topic in topics})
        faust_fixes.TRANSACTIONAL_TOPICS.update(_topic_groups)
    return _topic_groups


class Producers:
    """The transactional producers of the partitions this worker owns, one per agent and
    input partition."""

    def __init__(self) -> None:
        self._producers: dict[tuple[str, int], AIOKafkaProducer] = {}
        #: Producers with a transaction in progress (a revoked one is stopped after it).
        self.busy: set[AIOKafkaProducer] = set()
        self._retiring: asyncio.Future[None] | None = None

    def transactional_id(self, group: str, partition: int) -> str:
        return f"{app.conf.id}-{group}-{partition}"

    def get(self, group: str, partition: int) -> AIOKafkaProducer | None:
        return self._producers.get((group, partition))

    async def assign(self, assigned: Iterable[TP]) -> None:
        """Start the producers of newly assigned partitions (fencing their previous owners,
        whose open transactions end first); stop those of partitions no longer assigned."""
        groups = _groups()
        wanted = {(groups[tp.topic], tp.partition) for tp in assigned if tp.topic in groups}
        gone = {key: self._producers.pop(key) for key in set(self._producers) - wanted}
        new = sorted(wanted - set(self._producers))
        if gone:
            self._retiring = asyncio.ensure_future(self._retire(list(gone.values())))
        if not new:
            return
        try:
            producers = await asyncio.wait_for(
                asyncio.gather(*(self._start(*key) for key in new)), LIMIT)
        except Exception as error:
            stop("transactions", error)
        self._producers.update(zip(new, producers, strict=True))
        log.info("exactly once: transactional producers ready for %d partitions (%s)",
                 len(new), ", ".join(f"{g}[{p}]" for g, p in new))

    async def _start(self, group: str, partition: int) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap_servers.split(","),
            transactional_id=self.transactional_id(group, partition),
            client_id=f"{app.conf.id}-txn", acks="all", enable_idempotence=True,
            request_timeout_ms=int(app.conf.broker_request_timeout * 1000))
        await producer.start()  # InitProducerId: fences the previous owner
        return producer

    async def _retire(self, producers: list[AIOKafkaProducer]) -> None:
        for producer in producers:
            for _ in range(int(LIMIT * 10)):  # its transaction ends, or fails
                if producer not in self.busy:
                    break
                await asyncio.sleep(0.1)
            try:
                await producer.stop()
            except Exception:
                log.debug("stopping a revoked partition's producer", exc_info=True)

    async def stop_all(self) -> None:
        producers, self._producers = list(self._producers.values()), {}
        await self._retire(producers)


producers = Producers()


async def _on_assigned(assigned: set[TP]) -> None:
    await producers.assign(assigned)


if EXACTLY_ONCE:
    faust_fixes.ON_ASSIGNED.append(_on_assigned)

    @app.on_before_shutdown.connect
    async def _stop_producers(sender: Any, **kwargs: Any) -> None:
        await producers.stop_all()
