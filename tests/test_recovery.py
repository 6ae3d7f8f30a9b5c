"""A worker's stores against the cluster: Kafka is the source of truth.

A store whose changelog offsets the cluster does not have (its topics deleted and created
again, another cluster) is set aside and rebuilt from the changelog, never a crash; a
changelog's last offset not known yet is waited for; Faust's own exactly-once mode stays off
whatever the environment says.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from phoneverify.ops import recovery

from support import ROOT, Client, Deployment, Worker, create_topic, free_port

SET_ASIDE = "set aside"


async def verified(client: Client, phone: str) -> str:
    """One verification run to its end: the tables hold it and their changelogs have offsets."""
    iid = uuid.uuid4().hex
    started = await client.ask("verification.start", {"instance_id": iid, "phone_number": phone})
    assert started["result"] == "started", started
    await client.respond(iid, await client.sms_code(iid))
    [outcome] = await client.outcomes(iid)
    assert outcome["status"] == "verified"
    return iid


async def start_again(client: Client, iid: str, phone: str) -> str:
    """The reply to a second start of ``iid``: "duplicate" while the worker keeps it."""
    reply = await client.ask("verification.start", {"instance_id": iid, "phone_number": phone})
    return reply["result"]


def free_pair() -> int:
    """A free port P with P + 1 free too (a broker and its controller)."""
    while True:
        port = free_port()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port


def set_aside_lines(worker: Worker) -> list[str]:
    return [line for line in worker.log().splitlines() if SET_ASIDE in line]


def set_aside_stores(worker: Worker) -> list[Path]:
    return sorted((worker.data_dir / recovery.SET_ASIDE_DIR).glob("*/**/*.db"))


async def delete_topics(deployment: Deployment) -> None:
    """Every topic of the deployment, the changelogs and Faust's own too, gone from Kafka."""
    app_id = deployment.env()["APP_ID"]
    admin = AIOKafkaAdminClient(bootstrap_servers=deployment.bootstrap)
    await admin.start()
    try:
        def ours(names: list[str]) -> list[str]:
            return [n for n in names if n.startswith((deployment.prefix, app_id + "-"))]

        doomed = ours(await admin.list_topics())
        assert any(name.endswith("-changelog") for name in doomed), doomed
        await admin.delete_topics(doomed)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while ours(await admin.list_topics()):
            assert loop.time() < deadline, "the topics were not deleted within 60 s"
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def test_a_store_whose_topics_were_created_again_is_set_aside_and_rebuilt(
        deployment: Deployment, start_worker) -> None:
    worker = start_worker()
    async with Client(deployment) as client:
        old = await verified(client, "+1 425 555 0181")
    worker.stop()
    await delete_topics(deployment)  # as a new cluster would be, for this store

    worker.start()  # the same DATA_DIR: its stores hold offsets the new changelogs lack

    [line] = set_aside_lines(worker)
    assert "changelog" in line and str(worker.data_dir / recovery.SET_ASIDE_DIR) in line
    assert set_aside_stores(worker)  # moved, not deleted
    async with Client(deployment) as client:
        # Kafka is the truth: the old verification is not known any more, so a start of the
        # same id is a new one; and the worker serves new ones.
        assert await start_again(client, old, "+1 425 555 0181") == "started"
        await verified(client, "+1 425 555 0182")


async def test_a_restart_on_its_own_store_sets_nothing_aside(
        deployment: Deployment, start_worker) -> None:
    worker = start_worker()
    async with Client(deployment) as client:
        old = await verified(client, "+1 425 555 0183")
        worker.stop()
        worker.start()
        assert await start_again(client, old, "+1 425 555 0183") == "duplicate"
    assert set_aside_lines(worker) == []
    assert not (worker.data_dir / recovery.SET_ASIDE_DIR).exists()


# ------------------------------------------------------------ restoring in batches


def restored(worker: Worker) -> list[int]:
    """The records each batched restore of this worker's log read, in order."""
    return [int(line.split("in batches: ")[1].split()[0]) for line in worker.log().splitlines()
            if "Done reading from changelog topics in batches" in line]


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_a_worker_on_a_new_machine_restores_in_batches_and_knows_what_was_kept(
        deployment: Deployment, start_worker, guarantee: str) -> None:
    """A worker with an empty store reads the changelogs in batches (under exactly_once they
    hold transaction markers), then knows every kept verification; restarted on its own store
    it reads nothing again."""
    deployment.settings["PROCESSING_GUARANTEE"] = guarantee
    first = start_worker("w1")
    phones = [f"+1 425 555 01{n}" for n in (87, 88, 89)]
    async with Client(deployment) as client:
        kept = [await verified(client, phone) for phone in phones]
        first.stop()
        fresh = start_worker("w2")  # its own, empty DATA_DIR: a new machine
        assert restored(fresh) and restored(fresh)[0] > 0, fresh.log()[-3000:]
        for iid, phone in zip(kept, phones, strict=True):
            assert await start_again(client, iid, phone) == "duplicate"
        await verified(client, "+1 425 555 0190")
        first_start = len(restored(fresh))
        fresh.stop()
        fresh.start()
        assert sum(restored(fresh)[first_start:]) == 0  # nothing to read again
        assert await start_again(client, kept[0], phones[0]) == "duplicate"
    assert set_aside_lines(fresh) == []


# ------------------------------------------------------- Faust's exactly-once mode stays off


def test_faust_runs_at_least_once_whatever_processing_guarantee_says(tmp_path: Path) -> None:
    env = {**os.environ, "PROCESSING_GUARANTEE": "exactly_once", "DATA_DIR": str(tmp_path),
           "CODE_HASH_KEY": "k", "API_KEY": "k"}
    shown = subprocess.run(
        [sys.executable, "-c", "from phoneverify.agents.app import app; "
         "print(app.conf.processing_guarantee.value, app.in_transaction)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert shown.stdout.split() == ["at_least_once", "False"]


async def test_with_exactly_once_in_the_environment_workers_join_and_restart(
        deployment: Deployment, start_worker) -> None:
    """Faust's own exactly-once mode read a changelog's last offset that was not known yet
    (nothing fetched) as -1, "empty", and stopped the worker whose store held more: a second
    worker joining, or a restart on its own store."""
    deployment.settings["PROCESSING_GUARANTEE"] = "exactly_once"
    first = start_worker("w1")
    async with Client(deployment) as client:
        old = await verified(client, "+1 425 555 0184")
        second = start_worker("w2")
        await verified(client, "+1 425 555 0185")
        assert first.process is not None and first.process.poll() is None, first.log()[-3000:]
        first.stop()
        first.start()
        assert await start_again(client, old, "+1 425 555 0184") == "duplicate"
        await verified(client, "+1 425 555 0186")
    assert second.process is not None and second.process.poll() is None
    assert set_aside_lines(first) == [] and set_aside_lines(second) == []


# --------------------------------------------------- a highwater not known yet is waited for


async def test_a_last_offset_not_known_yet_is_waited_for(kafka: str) -> None:
    """The changelog partition does not exist yet when the worker asks for its last offset:
    the answer is waited for, never taken for "empty"."""
    topic = f"t{uuid.uuid4().hex[:10]}.late-changelog"
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, request_timeout_ms=1000)
    await consumer.start()
    try:
        waiting = asyncio.ensure_future(recovery.known_highwaters(
            lambda missing: consumer.end_offsets(list(missing)), {tp}, retry=0.1))
        await asyncio.sleep(2.0)  # several failed asks (each times out after 1 s)
        assert not waiting.done()
        await create_topic(kafka, topic)
        producer = AIOKafkaProducer(bootstrap_servers=kafka)
        await producer.start()
        try:
            for i in range(3):
                await producer.send_and_wait(topic, b"v", key=b"k%d" % i)
        finally:
            await producer.stop()
        highwaters = await asyncio.wait_for(waiting, 60)
    finally:
        await consumer.stop()
    assert highwaters[tp] in (0, 3)  # asked as soon as it exists: empty, or all three
    assert set(highwaters) == {tp}


# ---------------------------------------------------------- a store from another cluster


@pytest.mark.slow  # starts a second broker
async def test_a_store_from_another_cluster_is_set_aside_at_start(
        deployment: Deployment, start_worker, tmp_path: Path) -> None:
    from phoneverify.ops.broker.local import DEFAULT_HOME, LocalBroker

    worker = start_worker()
    async with Client(deployment) as client:
        await verified(client, "+1 425 555 0187")
    worker.stop()

    home = tmp_path / "other-kafka"
    home.mkdir()
    (home / "libs").symlink_to((ROOT / DEFAULT_HOME).absolute() / "libs",
                               target_is_directory=True)
    other = LocalBroker(f"127.0.0.1:{free_pair()}", home)
    await asyncio.to_thread(other.start)
    try:
        moved = Worker(deployment, "w1", KAFKA_BOOTSTRAP_SERVERS=other.bootstrap)
        moved.start()
        try:
            [line] = set_aside_lines(moved)
            assert "another Kafka cluster" in line
            assert set_aside_stores(moved)
            other_cluster = Deployment(other.bootstrap, tmp_path, prefix=deployment.prefix)
            async with Client(other_cluster) as client:
                await verified(client, "+1 425 555 0188")
        finally:
            moved.stop()
    finally:
        await asyncio.to_thread(other.stop)

