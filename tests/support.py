"""Test support: worker processes against the real broker, and a Kafka client that waits.

Every wait has a deadline and polls a condition; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from phoneverify.ops.broker.local import stop_process
from phoneverify.ops.replay import caught_up, read_all
from phoneverify.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TEST_CODE_KEY = "test-code-hash-key-not-secret"
READY = "Worker]: Ready"  # the line Faust logs when a worker has recovered and runs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Deployment:
    """One isolated deployment on the shared broker: its own topic prefix and app id."""

    bootstrap: str
    tmp: Path
    settings: dict[str, str] = field(default_factory=dict)
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}.")

    def env(self, **extra: str) -> dict[str, str]:
        base = {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "TOPIC_PREFIX": self.prefix,
            "APP_ID": self.prefix.rstrip(".") + "-app",
            "CODE_HASH_KEY": TEST_CODE_KEY,
            "API_KEY": "test-api-key",
            "PARTITIONS": "4",
            "TICK_INTERVAL_SECONDS": "0.2",
            # Every HTTP test comes from 127.0.0.1: the limit per client address stays on
            # (its stage is in every start's path) but far away; test_fraud_http tests it.
            "HTTP_STARTS_PER_IP": "100000",
        }
        return {**os.environ, **base, **self.settings, **extra}

    def topic(self, name: str) -> str:
        return self.prefix + name

    def app_settings(self) -> Settings:
        """The service's settings for this deployment, for in-process tools such as replay."""
        env = self.env()
        return Settings(kafka_bootstrap_servers=self.bootstrap, topic_prefix=env["TOPIC_PREFIX"],
                        app_id=env["APP_ID"], partitions=int(env["PARTITIONS"]))


class Worker:
    """A worker process (``python -m phoneverify.agents.worker``), stopped by its fixture."""

    def __init__(self, deployment: Deployment, name: str = "w1", **extra: str) -> None:
        self.deployment = deployment
        self.name = name
        self.web_port = free_port()
        self.data_dir = deployment.tmp / f"data-{name}"
        self.log_path = deployment.tmp / f"worker-{name}.log"
        self.env = deployment.env(WEB_PORT=str(self.web_port), DATA_DIR=str(self.data_dir),
                                  **extra)
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self) -> Worker:
        """Start the process and return at once (``start`` waits until it is ready)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "phoneverify.agents.worker"], cwd=ROOT, env=self.env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        return self

    def start(self, timeout: float = 90.0) -> Worker:
        """Launch, and wait until this run is ready (a restart appends to the same log)."""
        before = self.log().count(READY)
        self.launch()
        wait_until(lambda: self._alive_and(READY, before), timeout, f"worker {self.name} ready")
        return self

    def _alive_and(self, text: str, seen: int = 0) -> bool:
        """True once ``text`` is in the log more than ``seen`` times; raises if it exited."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited with {self.process.returncode}:\n"
                               + self.log()[-4000:])
        return self.log().count(text) > seen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.process is not None:
            stop_process(self.process, timeout, sig)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def stop_all(workers: list[Worker], timeout: float = 30.0) -> None:
    """Stop every worker still running, all at once: each is signalled (SIGTERM) before any is
    waited for (a worker takes seconds to stop; one after the other, they add up)."""
    running = [w for w in workers if w.process is not None and w.process.poll() is None]
    for worker in running:
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
    for worker in running:
        assert worker.process is not None
        try:
            worker.process.wait(timeout)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


class Client:
    """A plain aiokafka producer and reader of this deployment's topics, as an outsider."""

    def __init__(self, deployment: Deployment) -> None:
        self.d = deployment
        self.producer = AIOKafkaProducer(bootstrap_servers=deployment.bootstrap, acks="all")

    async def __aenter__(self) -> Client:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def send(self, topic: str, value: dict[str, Any] | bytes | str,
                   key: str | bytes | None = None) -> None:
        if isinstance(value, dict):
            raw = json.dumps(value).encode()
        else:
            raw = value.encode() if isinstance(value, str) else value
        if key is None and isinstance(value, dict):
            key = value.get("instance_id")
        if isinstance(key, str):
            key = key.encode()
        await self.producer.send_and_wait(self.d.topic(topic), raw, key=key)

    async def start(self, phone: str = "+1 425-555-0100", instance_id: str | None = None) -> str:
        iid = instance_id or uuid.uuid4().hex
        await self.send("verification.start", {"instance_id": iid, "phone_number": phone})
        return iid

    async def respond(self, instance_id: str, code: str) -> None:
        await self.send("verification.response", {"instance_id": instance_id, "code": code})

    async def ask(self, topic: str, value: dict[str, Any], timeout: float = 30.0,
                  key: str | None = None) -> dict[str, Any]:
        """Send a command with a new request_id and return its one Reply (read from the
        replies topic, so this also proves it is there)."""
        request_id = uuid.uuid4().hex
        await self.send(topic, {**value, "request_id": request_id}, key=key)
        return await self.reply(value["instance_id"], request_id, timeout)

    async def reply(self, instance_id: str, request_id: str,
                    timeout: float = 30.0) -> dict[str, Any]:
        records = await self.read(
            "verification.replies",
            lambda r: any(x.get("request_id") == request_id for x in r), timeout,
            key=instance_id)
        return next(r for r in records if r.get("request_id") == request_id)

    async def replies(self, instance_id: str, request_id: str) -> list[dict[str, Any]]:
        """Every reply to ``request_id`` so far (one, or identical copies after a crash)."""
        return [r for r in await self.read_all("verification.replies", key=instance_id)
                if r.get("request_id") == request_id]

    async def read(self, topic: str, until: Callable[[list[dict[str, Any]]], bool],
                   timeout: float = 30.0, key: str | None = None) -> list[dict[str, Any]]:
        """Read ``topic`` from the beginning until ``until(records)`` holds; returns them."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.d.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest",
                                    isolation_level="read_committed")
        await consumer.start()
        try:
            name = self.d.topic(topic)
            partitions = range(int(self.d.env()["PARTITIONS"]))
            consumer.assign([TopicPartition(name, p) for p in partitions])
            await consumer.seek_to_beginning()
            records: list[dict[str, Any]] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not until(records):
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(f"{topic}: condition not met in {timeout}s with "
                                       f"{len(records)} records; the last: {records[-3:]}")
                batch = await consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000))
                for messages in batch.values():
                    for message in messages:
                        if key is None or message.key == key.encode():
                            records.append(_decode(message.value))
            return records
        finally:
            await consumer.stop()

    async def read_all(self, topic: str, key: str | None = None) -> list[dict[str, Any]]:
        """Every record of ``topic`` (for ``key``) up to its end as of now."""
        return [_decode(v) for v in await self.read_raw(self.d.topic(topic), key)]

    async def read_raw(self, full_name: str, key: str | None = None) -> list[bytes | None]:
        """Raw values of a topic named in full, up to its end as of now."""
        wanted = None if key is None else key.encode()
        return [value async for k, value in read_all(self.d.app_settings(), full_name)
                if wanted is None or k == wanted]

    async def outcomes(self, instance_id: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        return await self.read("verification.outcome", lambda r: len(r) >= 1, timeout,
                               key=instance_id)

    async def sms_code(self, instance_id: str, timeout: float = 30.0) -> str:
        [sms] = await self.read("verification.sms", lambda r: len(r) >= 1, timeout,
                                key=instance_id)
        match = re.search(r"\d+", sms["body"])
        assert match, sms
        return match.group()


def _decode(raw: bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return {"_raw": raw}
    return value if isinstance(value, dict) else {"_value": value}


# Pipeline order: when a stage's inputs are all committed, everything it produced is on the
# next stage's topics (Faust flushes its producer before it commits).
PIPELINE = ("verification.start", "verification.resend", "verification.admission",
            "verification.admitted",
            "verification.response", "verification.terminate", "verification.rerouted",
            "verification.sms", "verification.sms-status")


async def quiesce(deployment: Deployment, timeout: float = 30.0) -> None:
    """Wait until the workers have processed and committed every record produced so far."""
    await caught_up(deployment.bootstrap, deployment.env()["APP_ID"],
                    [deployment.topic(topic) for topic in PIPELINE],
                    int(deployment.env()["PARTITIONS"]), timeout)


async def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    """Create one topic (replication 1) on the test broker."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
