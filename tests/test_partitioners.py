"""Clients this project did not write, with their own default partitioners.

librdkafka (confluent-kafka, kcat) partitions by CRC32 of the key by default
(``consistent_random``), not by murmur2 as Java and aiokafka do, so many of their records land
on another partition than the service's. The service moves each such record to its own
partition before it touches state; nothing is lost and nothing is split across partitions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from phoneverify.models.codes import draw_code
from phoneverify.ops.replay import run as replay
from phoneverify.topics import partition_for

from support import TEST_CODE_KEY, Client, Deployment

confluent_kafka = pytest.importorskip("confluent_kafka")

N = 40


async def changelog_partitions(deployment: Deployment) -> dict[bytes, set[int]]:
    """For each key of the verifications changelog, the partitions it has records on."""
    topic = f"{deployment.env()['APP_ID']}-verifications-changelog"
    partitions = int(deployment.env()["PARTITIONS"])
    consumer = AIOKafkaConsumer(bootstrap_servers=deployment.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        found: dict[bytes, set[int]] = defaultdict(set)
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    found[record.key].add(tp.partition)
        return found
    finally:
        await consumer.stop()


def produce(producer, topic: str, value: dict[str, str]) -> None:
    producer.produce(topic, json.dumps(value).encode(), key=value["instance_id"].encode())


async def test_confluent_kafka_with_its_default_partitioner_loses_nothing(
        deployment: Deployment, start_worker) -> None:
    # The codes of half the verifications go out only once a worker has stopped and another
    # has started: on a loaded machine (the whole suite) that took longer than the default
    # 90 s window, and they expired (an outcome, not a loss, but the test failed). This test
    # is about partitioning, not about time: the window outlasts it.
    deployment.settings["VERIFICATION_TIMEOUT_SECONDS"] = "3600"
    start_worker("a")
    b = start_worker("b")
    producer = confluent_kafka.Producer({"bootstrap.servers": deployment.bootstrap})
    partitions = int(deployment.env()["PARTITIONS"])
    ids = [f"ck-{uuid.uuid4().hex[:12]}" for _ in range(N)]
    misrouted = sum(1 for iid in ids if partition_for(iid.encode(), partitions)
                    != _crc32_partition(iid.encode(), partitions))
    assert misrouted > N // 4  # the test means something: many land on another partition
    for i, iid in enumerate(ids):
        produce(producer, deployment.topic("verification.start"),
                {"instance_id": iid, "phone_number": f"+1 425 555 {1000 + i}"})
    assert producer.flush(30) == 0
    async with Client(deployment) as client:
        await client.read("verification.sms", lambda r: len({s["instance_id"] for s in r}) == N,
                          timeout=60)
        # A restart in between: one worker goes, the other takes its partitions, it comes back.
        b.stop()
        for iid in ids[: N // 2]:
            produce(producer, deployment.topic("verification.response"),
                    {"instance_id": iid, "code": draw_code(TEST_CODE_KEY.encode(), iid, 4)})
        assert producer.flush(30) == 0
        start_worker("b-again")
        for iid in ids[N // 2: -5]:
            produce(producer, deployment.topic("verification.response"),
                    {"instance_id": iid, "code": draw_code(TEST_CODE_KEY.encode(), iid, 4)})
        for iid in ids[-5:]:
            produce(producer, deployment.topic("verification.terminate"),
                    {"instance_id": iid, "reason": "changed my mind"})
        assert producer.flush(30) == 0
        outcomes = await client.read(
            "verification.outcome", lambda r: len({o["instance_id"] for o in r}) == N,
            timeout=90)
        first = {o["instance_id"]: o for o in outcomes}
        ends = {i: (first[i]["status"], first[i]["reason"]) for i in ids}
        assert {ends[i] for i in ids[:-5]} == {("verified", "code_matched")}, ends
        assert {ends[i] for i in ids[-5:]} == {("terminated", "terminated")}, ends
        moved = await client.read_all("verification.rerouted")
        assert len(moved) >= misrouted // 2
    split = {key: parts for key, parts in (await changelog_partitions(deployment)).items()
             if len(parts) > 1}
    assert split == {}
    report = await replay(deployment.app_settings())
    assert report.problems == []
    assert report.matching == N


def _crc32_partition(key: bytes, partitions: int) -> int:
    """librdkafka's consistent partitioner: CRC32 of the key, modulo the partitions."""
    import zlib

    return zlib.crc32(key) % partitions


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed (apt: kcat)")
async def test_kcat_starts_and_answers(deployment: Deployment, start_worker) -> None:
    start_worker()
    ids = [f"kcat-{n}-{uuid.uuid4().hex[:6]}" for n in range(8)]

    def kcat(topic: str, lines: list[str]) -> None:
        subprocess.run(["kcat", "-P", "-b", deployment.bootstrap, "-t",
                        deployment.topic(topic), "-K", "|"], input="\n".join(lines) + "\n",
                       text=True, check=True, timeout=30)

    kcat("verification.start", [
        f'{iid}|{{"instance_id": "{iid}", "phone_number": "+1 425 555 {2000 + n}"}}'
        for n, iid in enumerate(ids)])
    async with Client(deployment) as client:
        for iid in ids:
            await client.sms_code(iid)
        kcat("verification.response", [
            f'{iid}|{{"instance_id": "{iid}", "code": '
            f'"{draw_code(TEST_CODE_KEY.encode(), iid, 4)}"}}' for iid in ids])
        outcomes = await client.read(
            "verification.outcome", lambda r: len({o["instance_id"] for o in r}) == len(ids))
    assert {o["status"] for o in outcomes} == {"verified"}

