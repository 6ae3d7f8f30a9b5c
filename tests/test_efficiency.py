"""The worker's efficiency levers: compiled parts checked at start, uvloop, the fetch linger.

No test here times anything against a bound: what is asserted is behaviour (what is loaded,
which loop runs, which records come in one fetch).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from phoneverify.ops import fetch_linger, speedups

from support import create_topic


def test_every_compiled_part_is_loaded_here() -> None:
    assert speedups.missing() == []


def test_aiokafka_without_its_extensions_is_named_at_start() -> None:
    # given aiokafka told not to use its C extensions (only at import: a fresh interpreter)
    code = ("import json; from phoneverify.ops import speedups; "
            "print(json.dumps(speedups.missing()))")
    env = {**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                         text=True).stdout
    # then the check says so, and why it matters
    [warning] = json.loads(out)
    assert "AIOKAFKA_NO_EXTENSIONS" in warning
    assert "slower" in warning


@pytest.mark.parametrize(("name", "loop_type"), [("uvloop", "uvloop.Loop"),
                                                  ("asyncio", "asyncio.unix_events")])
def test_event_loop_setting_chooses_the_loop(name: str, loop_type: str) -> None:
    # Faust's consumer thread makes its own loop with new_event_loop(): it must follow too.
    code = ("import asyncio, logging\n"
            "from phoneverify.agents.worker import use_event_loop\n"
            f"use_event_loop({name!r}, logging.getLogger())\n"
            "loop = asyncio.new_event_loop()\n"
            "print(type(loop).__module__ + '.' + type(loop).__qualname__)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip().startswith(loop_type)


async def _fetches_after_first(bootstrap: str, linger: float) -> list[int]:
    """One record fetched, then 5 produced one at a time 100 ms apart: the sizes of the
    fetches that bring those 5."""
    topic = f"linger-{uuid.uuid4().hex[:8]}"
    await create_topic(bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    fetch_linger.apply(linger)
    await producer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.start()
        await producer.send_and_wait(topic, b"first")
        while not (await consumer.getmany(timeout_ms=5000)).get(tp):
            pass
        sizes: list[int] = []

        async def produce() -> None:
            for i in range(5):
                await producer.send_and_wait(topic, b"%d" % i)
                await asyncio.sleep(0.1)

        sending = asyncio.create_task(produce())
        while sum(sizes) < 5:
            got = (await consumer.getmany(timeout_ms=5000)).get(tp, [])
            if got:
                sizes.append(len(got))
        await sending
        return sizes
    finally:
        fetch_linger.apply(0.0)
        await consumer.stop()
        await producer.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        await admin.delete_topics([topic])
        await admin.close()


@pytest.mark.kafka
async def test_records_arriving_during_the_linger_come_in_one_fetch(
        kafka: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "aiokafka")  # "not leader" just after creation (restored after)
    # given a fetch that brought a record, and a linger far longer than the 5 sends take
    sizes = await _fetches_after_first(kafka, linger=4.0)
    # then the next fetch waits out the linger and brings all five at once
    assert sizes == [5]


@pytest.mark.kafka
async def test_without_a_linger_each_record_comes_as_it_arrives(
        kafka: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "aiokafka")
    sizes = await _fetches_after_first(kafka, linger=0.0)
    assert len(sizes) > 1  # 100 ms apart: fetched one by one (or nearly)
