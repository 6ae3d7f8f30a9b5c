"""The worker's fetch takes records only of the partitions Faust reads (ops/faust_fixes.py, 5).

aiokafka's ``Fetcher.fetched_records(partitions)`` returns the records of *every* partition
when ``partitions`` is empty, and Faust hands it its live set of active partitions, which a
recovery empties while a fetch waits. Records taken that way were dropped by Faust: a restart
that restored a changelog tail left starts and codes sent before it unhandled (the kill test's
timeouts).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.types import TP

from phoneverify.ops import faust_fixes
from phoneverify.ops.faust_fixes import ActivePartitions

from support import create_topic


async def _buffered(consumer: AIOKafkaConsumer, tps: set[TopicPartition]) -> None:
    """Wait until aiokafka has fetched (not yet handed out) records of every one of ``tps``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not tps <= set(consumer._fetcher._records):
        assert loop.time() < deadline, "aiokafka fetched nothing in 30 s"
        await asyncio.sleep(0.05)


async def test_a_fetch_takes_records_of_the_active_partitions_only(kafka: str) -> None:
    topic = f"t{uuid.uuid4().hex[:10]}.fetch"
    await create_topic(kafka, topic, 2)
    first, second = TopicPartition(topic, 0), TopicPartition(topic, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    try:
        for partition in (0, 1):
            for i in range(3):
                await producer.send_and_wait(topic, b"v%d" % i, partition=partition)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([first, second])
        await consumer.seek_to_beginning(first, second)
        fetcher = consumer._fetcher
        await _buffered(consumer, {first, second})

        live: set[TP] = set()  # Faust's set as a recovery leaves it: nothing active
        assert await fetcher.fetched_records(ActivePartitions(live), timeout=0.3) == {}
        live.add(TP(topic, 0))  # resumed while a fetch waits: read from then on
        taken = await fetcher.fetched_records(ActivePartitions(live), timeout=5)
        assert set(taken) == {first} and len(taken[first]) == 3
        assert await consumer.position(second) == 0  # nothing of it taken

        # What the view guards against: aiokafka reads an empty set as every partition.
        assert set(await fetcher.fetched_records(set(), timeout=5)) == {second}
    finally:
        await consumer.stop()


async def test_faust_hands_its_fetch_a_live_view_of_its_active_partitions() -> None:
    seen: list[Any] = []

    async def fetch(self: Any, consumer: Any, active: Any, **kwargs: Any) -> dict[Any, Any]:
        seen.append(active)
        return {}

    live = {TP("t", 0)}
    await faust_fixes._only_active_partitions(fetch)(None, None, live, timeout=1.0)
    await faust_fixes._only_active_partitions(fetch)(None, None, None, timeout=1.0)
    view, client_only = seen
    assert view and TP("t", 0) in view and TP("t", 1) not in view
    live.clear()  # paused while the fetch waits
    assert view and TP("t", 0) not in view  # never empty, so never "every partition"
    assert client_only is None  # a client-only app reads every partition, as before

    faust_fixes.apply()
    assert getattr(AIOKafkaConsumerThread._fetch_records, faust_fixes._PATCHED)
