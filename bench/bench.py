"""Benchmark of the verification service: prints one table of figures.

    .venv/bin/python -m broker run -- .venv/bin/python bench/bench.py [--n 5000] [--rate 200]

(``--rate 50,200`` measures latency at several offered rates.)

1. End-to-end throughput: one worker process (``python -m phoneverify.agents.worker``, its own
   topic prefix and app id), driven from outside over aiokafka: starts -> read each SMS for its
   code -> answer it -> read the outcome. Completed verifications per second, first start to
   last outcome.
2. Latency at a fixed offered rate: response produced -> outcome received, p50/p99.
3. A plain aiokafka consume-one/produce-one loop on the same broker, and the service's
   throughput against it, counted in Kafka records handled (consumed + produced) per
   verification, measured from the topics' offsets.
4. The actor's tick path in process (``agents/deadlines.py`` and ``models.verification``) at
   1k/10k/100k pending verifications: the time per tick must not grow with what is pending.

The bench process never imports ``app`` (it creates a Faust app); ``agents.deadlines`` is pure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from phoneverify.agents.deadlines import DueIndex
from phoneverify.models.verification import (
    Expire,
    Start,
    Verification,
    decide,
    fold,
    initial_state,
)
from phoneverify.ops.broker.local import stop_process

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pyspy  # beside this file

ROOT = Path(__file__).resolve().parent.parent

DIGITS = re.compile(r"\d+")
CLIENT_TOPICS = ("verification.start", "verification.response", "verification.terminate")
#: What the worker's agents subscribe to (each record there is consumed once by the worker).
CONSUMED_TOPICS = ("verification.start", "verification.admission", "verification.admitted",
                   "verification.response", "verification.terminate", "verification.rerouted",
                   "verification.sms", "verification.sms-status")
TICK_TOPIC = "verification.tick"


def say(message: str) -> None:
    """Progress on stderr, so stdout holds only the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the worker process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``); 0 when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Deployment:
    """One isolated deployment on the broker: a unique topic prefix and app id."""

    bootstrap: str
    partitions: int
    prefix: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:8]}.")

    @property
    def app_id(self) -> str:
        return self.prefix.rstrip(".") + "-app"

    def topic(self, name: str) -> str:
        return self.prefix + name

    def owns(self, topic: str) -> bool:
        """Its topics: the contract's (prefixed) and Faust's own (changelogs, assignor)."""
        return topic.startswith((self.prefix, self.app_id + "-"))


class Worker:
    """A worker process for a deployment, logging to a file; :meth:`stop` always works."""

    def __init__(self, deployment: Deployment, tmp: Path, profile: Path | None = None,
                 **extra: str) -> None:
        self.log_path = tmp / "worker.log"
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": deployment.bootstrap,
            "TOPIC_PREFIX": deployment.prefix,
            "APP_ID": deployment.app_id,
            "DATA_DIR": str(tmp / "data"),
            "WEB_PORT": str(free_port()),
            "CODE_HASH_KEY": "bench-code-hash-key-not-secret",
            "API_KEY": "bench-api-key",
            "PARTITIONS": str(deployment.partitions),
            "RATE_LIMIT_STARTS": "1000000",
            "VERIFICATION_TIMEOUT_SECONDS": "900",  # a slow run must not expire anything
            "SMS_BACKEND": "console",
            "TICK_INTERVAL_SECONDS": "1",
            "LOG_LEVEL": "INFO",
            **extra,
        }
        profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
        self.cmd = [sys.executable, *profiler, "-m", "phoneverify.agents.worker"]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 120.0) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while "Worker]: Ready" not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.process.returncode}:\n"
                                   + self.log()[-4000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker was not ready in {timeout:.0f}s:\n"
                                   + self.log()[-4000:])
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, wait, then SIGKILL; only this process, by its pid."""
        if self.process is not None:
            stop_process(self.process, timeout)


# ---------------------------------------------------------------- Kafka helpers


async def end_offsets(bootstrap: str, deployment: Deployment) -> dict[str, int]:
    """Records written so far to each of the deployment's topics (sum over partitions)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        topics = [t for t in await admin.list_topics() if deployment.owns(t)]
        partitions = [TopicPartition(t["topic"], p["partition"])
                      for t in await admin.describe_topics(topics) for p in t["partitions"]]
        totals: dict[str, int] = dict.fromkeys(topics, 0)
        for tp, offset in (await consumer.end_offsets(partitions)).items():
            totals[tp.topic] += offset
        return totals
    finally:
        await consumer.stop()
        await admin.close()


async def delete_topics(bootstrap: str, deployment: Deployment) -> int:
    """Remove the deployment's topics from the shared broker; returns how many."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if deployment.owns(t)]
        if topics:
            await admin.delete_topics(topics)
        return len(topics)
    finally:
        await admin.close()


async def wait_for_leaders(admin: AIOKafkaAdminClient, topics: list[str],
                           timeout: float = 30.0) -> None:
    """Until every partition of ``topics`` has a leader (just after creation some do not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = await admin.describe_topics(topics)
        if all(not t["error_code"] and t["partitions"]
               and all(p["leader"] >= 0 for p in t["partitions"]) for t in described):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no leaders for {topics} after {timeout:.0f}s")


def reader(bootstrap: str, topic: str, partitions: int) -> AIOKafkaConsumer:
    """A consumer assigned every partition of ``topic`` from the start (no group, no rebalance)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100,
                                isolation_level="read_committed")  # as a client must, under
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])  # exactly_once
    return consumer


def producer(bootstrap: str) -> AIOKafkaProducer:
    """The same producer settings as the worker's (Faust: acks=-1, linger 0, 16 KiB batches)."""
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0,
                            max_batch_size=16384)


# ---------------------------------------------------------------- the outside client


@dataclass
class Run:
    """What the client saw of one batch of verifications (``perf_counter`` seconds)."""

    expected: set[str]
    started: dict[str, float] = field(default_factory=dict)
    start_replied: dict[str, float] = field(default_factory=dict)
    sms: dict[str, float] = field(default_factory=dict)
    responded: dict[str, float] = field(default_factory=dict)
    response_replied: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    verified: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def latencies_ms(self, since: dict[str, float], until: dict[str, float]) -> list[float]:
        return [(until[i] - since[i]) * 1000 for i in self.expected if i in since and i in until]


class Client:
    """Starts verifications, answers each SMS with its code, collects the outcomes."""

    def __init__(self, deployment: Deployment) -> None:
        self.d = deployment
        self.producer = producer(deployment.bootstrap)
        self.sms = reader(deployment.bootstrap, deployment.topic("verification.sms"),
                          deployment.partitions)
        self.outcomes = reader(deployment.bootstrap, deployment.topic("verification.outcome"),
                               deployment.partitions)
        self.replies = reader(deployment.bootstrap, deployment.topic("verification.replies"),
                              deployment.partitions)
        self.run: Run | None = None
        self.crc32 = False  # partition as librdkafka does by default
        self.sends: list[asyncio.Future[Any]] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Client:
        for part in (self.producer, self.sms, self.outcomes, self.replies):
            await part.start()
        self.tasks = [asyncio.create_task(self._answer()), asyncio.create_task(self._collect()),
                      asyncio.create_task(self._replies())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for part in (self.producer, self.sms, self.outcomes, self.replies):
            await part.stop()

    async def _send(self, topic: str, instance_id: str, value: dict[str, str]) -> None:
        key = instance_id.encode()
        # As librdkafka's default partitioner (confluent-kafka, kcat) would: CRC32, not murmur2.
        partition = zlib.crc32(key) % self.d.partitions if self.crc32 else None
        future = await self.producer.send(self.d.topic(topic), json.dumps(value).encode(),
                                          key=key, partition=partition)
        self.sends.append(future)

    async def _answer(self) -> None:
        """Each SMS of the current run: take the digits of its body and send them back."""
        while True:
            batches = await self.sms.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    sms = json.loads(record.value)
                    iid = sms["instance_id"]
                    if self.run is None or iid not in self.run.expected:
                        continue
                    code = DIGITS.search(sms["body"])
                    assert code, "an SMS body without a code"
                    now = time.perf_counter()
                    self.run.sms[iid] = self.run.responded[iid] = now
                    await self._send("verification.response", iid,
                                     {"instance_id": iid, "code": code.group(),
                                      "request_id": f"r-{iid}"})

    async def _replies(self) -> None:
        """When each command's reply arrived (the service answers every request_id)."""
        while True:
            batches = await self.replies.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    reply = json.loads(record.value)
                    run, iid = self.run, reply["instance_id"]
                    if run is None or iid not in run.expected:
                        continue
                    if reply["command"] == "start":
                        run.start_replied.setdefault(iid, now)
                    else:
                        run.response_replied.setdefault(iid, now)

    async def _collect(self) -> None:
        while True:
            batches = await self.outcomes.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    outcome = json.loads(record.value)
                    run, iid = self.run, outcome["instance_id"]
                    if run is None or iid not in run.expected or iid in run.finished:
                        continue
                    run.finished[iid] = now
                    run.verified += bool(outcome["verified"])
                    if len(run.finished) == len(run.expected):
                        run.done.set()

    async def drive(self, count: int, rate: float | None, timeout: float) -> Run:
        """``count`` verifications, starts as fast as possible (``rate`` None) or paced."""
        tag = uuid.uuid4().hex[:6]
        ids = [f"{tag}-{i:07d}" for i in range(count)]
        run = self.run = Run(expected=set(ids))
        began = time.perf_counter()
        for i, iid in enumerate(ids):
            if rate is not None:
                await asyncio.sleep(max(0.0, began + i / rate - time.perf_counter()))
            run.started[iid] = time.perf_counter()
            await self._send("verification.start", iid,
                             {"instance_id": iid, "phone_number": phone_number(i),
                              "request_id": f"s-{iid}"})
        await self._until_done(run, timeout)
        await asyncio.gather(*self.sends)  # surfaces any failed send
        self.sends.clear()
        return run


    async def _until_done(self, run: Run, timeout: float) -> None:
        """Until every outcome arrived; a reader that failed or a timeout raises."""
        done = asyncio.create_task(run.done.wait())
        try:
            await asyncio.wait([done, *self.tasks], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
        for task in self.tasks:
            if task.done():
                task.result()  # raises what stopped it
        if not run.done.is_set():
            raise TimeoutError(f"{len(run.finished)}/{len(run.expected)} outcomes "
                               f"({len(run.sms)} SMS) after {timeout:.0f}s")


def phone_number(i: int) -> str:
    """A distinct, possible US number per verification, typed as a person would."""
    return f"+1 {201 + i // 10_000:03d}-555-{i % 10_000:04d}"


# ---------------------------------------------------------------- 1 and 2: the service


async def idle_cpu(worker: Worker, seconds: float = 10.0) -> float:
    """The worker's CPU share with nothing to do but its timers (ticks, commits)."""
    cpu = cpu_seconds(worker.pid)
    await asyncio.sleep(seconds)
    return (cpu_seconds(worker.pid) - cpu) / seconds


@dataclass
class Throughput:
    count: int
    seconds: float
    verified: int
    worker_cpu: float  # seconds of CPU the worker process used meanwhile
    records: dict[str, int]  # written to each topic meanwhile (prefix removed)
    idle_cpu: float  # share of one core the idle worker uses

    @property
    def per_second(self) -> float:
        return self.count / self.seconds

    def per_verification(self, topics: Iterable[str]) -> float:
        return sum(self.records.get(t, 0) for t in topics) / self.count


async def throughput(client: Client, worker: Worker, count: int,
                     idle_seconds: float) -> Throughput:
    """Phase 1: ``count`` starts at once; the records written to every topic are counted."""
    d = client.d
    idle = await idle_cpu(worker, idle_seconds) if idle_seconds else 0.0
    before = await end_offsets(d.bootstrap, d)
    cpu = cpu_seconds(worker.pid)
    run = await client.drive(count, rate=None, timeout=120 + count / 10)
    seconds = max(run.finished.values()) - min(run.started.values())
    cpu = cpu_seconds(worker.pid) - cpu
    after = await end_offsets(d.bootstrap, d)
    records = {t.removeprefix(d.prefix): n - before.get(t, 0) for t, n in after.items()}
    return Throughput(count, seconds, run.verified, cpu, records, idle)


@dataclass
class Latency:
    count: int
    rate: float
    crc32: bool
    response_ms: list[float]
    start_to_sms_ms: list[float]
    start_reply_ms: list[float]
    response_reply_ms: list[float]
    verified: int
    achieved: float  # verifications / s, first start to last outcome
    worker_cpu: float  # seconds of CPU the worker process used meanwhile


async def latency(client: Client, worker: Worker, count: int, rate: float,
                  crc32: bool = False) -> Latency:
    """Phase 2: ``count`` starts paced at ``rate`` per second (partitioned by CRC32 instead of
    murmur2 with ``crc32``: most records land on another partition, and are moved)."""
    cpu = cpu_seconds(worker.pid)
    client.crc32 = crc32
    try:
        run = await client.drive(count, rate=rate, timeout=120 + count / 10)  # a loaded machine
    finally:
        client.crc32 = False
    seconds = max(run.finished.values()) - min(run.started.values())
    return Latency(count, rate, crc32, run.latencies_ms(run.responded, run.finished),
                   run.latencies_ms(run.started, run.sms),
                   run.latencies_ms(run.started, run.start_replied),
                   run.latencies_ms(run.responded, run.response_replied), run.verified,
                   count / seconds, cpu_seconds(worker.pid) - cpu)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# ---------------------------------------------------------------- 3: raw aiokafka loop


@dataclass
class Raw:
    count: int
    seconds: float
    value_bytes: int
    cpu: float  # seconds of CPU the loop (this process) used

    @property
    def per_second(self) -> float:
        return self.count / self.seconds


async def raw_loop(deployment: Deployment, count: int, value_bytes: int) -> Raw:
    """Fill a topic, then consume it and produce one record per record to another (acks=all)."""
    bootstrap, partitions = deployment.bootstrap, deployment.partitions
    source, sink = deployment.topic("raw.in"), deployment.topic("raw.out")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, partitions, 1) for t in (source, sink)])
        await wait_for_leaders(admin, [source, sink])
    finally:
        await admin.close()
    out = producer(bootstrap)
    await out.start()
    try:
        value = b"v" * value_bytes
        fills = [await out.send(source, value, key=f"{i:032d}".encode()) for i in range(count)]
        await asyncio.gather(*fills)
        return await _consume_produce(deployment, source, sink, out, count, value_bytes)
    finally:
        await out.stop()


async def _consume_produce(deployment: Deployment, source: str, sink: str,
                           out: AIOKafkaProducer, count: int, value_bytes: int) -> Raw:
    """Timed from the first records fetched until the last produced one is acknowledged."""
    consumer = AIOKafkaConsumer(bootstrap_servers=deployment.bootstrap,
                                group_id=deployment.prefix + "raw", enable_auto_commit=False,
                                auto_offset_reset="earliest")
    consumer.assign([TopicPartition(source, p) for p in range(deployment.partitions)])
    await consumer.start()
    try:
        sends: list[asyncio.Future[Any]] = []
        began = cpu = committed = 0.0
        while len(sends) < count:
            batches = await consumer.getmany(timeout_ms=1000)
            if not began and batches:
                began, cpu, committed = time.perf_counter(), time.process_time(), time.monotonic()
            for records in batches.values():
                for record in records:
                    sends.append(await out.send(sink, record.value, key=record.key))
            if time.monotonic() - committed >= 1.0:  # as often as the worker commits
                await consumer.commit()
                committed = time.monotonic()
        await asyncio.gather(*sends)
        await consumer.commit()
        seconds = time.perf_counter() - began
        return Raw(count, seconds, value_bytes, time.process_time() - cpu)
    finally:
        await consumer.stop()


# ---------------------------------------------------------------- 4: the tick path


def pending_state(instance_id: str, at: datetime, timeout: float) -> Verification:
    """A verification as the actor holds it after its start."""
    start = Start(instance_id=instance_id, phone_number="+12015550100", code_hash="0" * 64,
                  command_id=f"{instance_id}/sms/1", at=at, timeout_seconds=timeout,
                  max_attempts=4)
    state = initial_state(instance_id)
    return fold(state, decide(start, state))


def expire(keys: list[bytes], table: dict[bytes, Verification], now: datetime) -> int:
    """The actor's work per due key, without Kafka: look up, decide, evolve, store."""
    expired = 0
    for key in keys:
        state = table.get(key)
        if state is None or state.is_final:
            continue
        table[key] = fold(state, decide(Expire(instance_id=state.instance_id, at=now), state))
        expired += 1
    return expired


@dataclass
class TickTimes:
    """Totals over the timed ticks of one size (seconds)."""

    ticks: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    due_wall: float = 0.0  # of which in ``DueIndex.pop_due``

    def mean_ms(self, total: float) -> float:
        return total / self.ticks * 1000


class TickBench:
    """One partition's deadline index with ``pending`` far deadlines, ``due`` expiring a tick."""

    def __init__(self, pending: int, due: int) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)
        far = pending_state("far", self.now, 86_400)
        assert far.deadline is not None
        self.table: dict[bytes, Verification] = {}
        entries = []
        for i in range(pending):
            key = f"p{i:07d}".encode()
            self.table[key] = far
            entries.append((far.deadline.timestamp() + i / 1e6, key))
        self.deadlines = DueIndex()
        self.deadlines.build(0, entries)
        self.pending, self.due = pending, due
        self.fresh = {f"d{j:04d}".encode(): pending_state(f"d{j:04d}", self.now
                                                            - timedelta(seconds=91), 90)
                      for j in range(due)}
        self.times = TickTimes()

    def tick(self) -> None:
        for key, state in self.fresh.items():  # untimed: K verifications come due again
            self.table[key] = state
            assert state.deadline is not None
            self.deadlines.schedule(0, state.deadline.timestamp(), key)
        wall, cpu = time.perf_counter(), time.thread_time()
        keys = self.deadlines.pop_due(0, self.now.timestamp())
        popped = time.perf_counter()
        expired = expire(keys, self.table, self.now)
        self.times.wall += time.perf_counter() - wall
        self.times.cpu += time.thread_time() - cpu
        self.times.due_wall += popped - wall
        self.times.ticks += 1
        assert expired == self.due and self.deadlines.size(0) == self.pending


def tick_times(sizes: list[int], due: int, ticks: int) -> dict[int, TickTimes]:
    """Ticks of every size taken in turn, so a change in machine load hits all sizes alike."""
    benches = [TickBench(n, due) for n in sizes]
    for bench in benches:  # warm-up
        bench.tick()
        bench.times = TickTimes()
    for _ in range(ticks):
        for bench in benches:
            bench.tick()
    return {bench.pending: bench.times for bench in benches}


# ---------------------------------------------------------------- the report


def kafka_version() -> str:
    jars = sorted((ROOT / ".local/kafka/libs").glob("kafka_2.*-*.jar"))
    return jars[-1].stem.split("-", 1)[1] if jars else "unknown"


def row(label: str, value: str) -> str:
    return f"  {label:<56} {value}"


RULE, LINE = "=" * 80, "-" * 80


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min), {five:.1f} (5 min)"


@dataclass
class Counted:
    """Kafka records the worker handles per verification (phase 1, from the topics' offsets)."""

    consumed: float
    produced: float
    ticks: int

    @classmethod
    def of(cls, tp: Throughput) -> Counted:
        ticks = tp.records.get(TICK_TOPIC, 0)
        everything = (sum(tp.records.values()) - ticks) / tp.count
        return cls(consumed=tp.per_verification(CONSUMED_TOPICS),
                   produced=everything - tp.per_verification(CLIENT_TOPICS), ticks=ticks)

    @property
    def handled(self) -> float:
        return self.consumed + self.produced


def header(d: Deployment, loads: tuple[str, str]) -> list[str]:
    return [
        RULE,
        "phoneverify benchmark",
        row("machine", f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, "
                       f"{os.uname().sysname} {os.uname().release}"),
        row("load average before / after", f"{loads[0]}  /  {loads[1]}"),
        row("Kafka broker", f"{kafka_version()} (single node, KRaft, {d.bootstrap})"),
        row("partitions per topic", str(d.partitions)),
        row("worker", "1 process, SMS_BACKEND=console, LOG_LEVEL=INFO, 1 tick/s"),
    ]


def throughput_rows(tp: Throughput) -> list[str]:
    return [
        LINE,
        "1. end-to-end throughput (start -> SMS -> right code -> outcome), starts all at once",
        row("verifications", f"{tp.count} ({tp.verified} verified)"),
        row("elapsed, first start produced -> last outcome received", f"{tp.seconds:.2f} s"),
        row("completed verifications / s", f"{tp.per_second:,.0f}"),
        row("worker CPU: share of one core / per verification",
            f"{tp.worker_cpu / tp.seconds:.0%} / {tp.worker_cpu / tp.count * 1000:.2f} ms"),
        row("worker CPU when idle (ticks, commits, timers)", f"{tp.idle_cpu:.0%} of one core"),
    ]


def latency_rows(lat: Latency) -> list[str]:
    ms = lat.response_ms
    return [
        LINE,
        f"2. latency at an offered {lat.rate:.0f} starts/s ({lat.count} verifications, "
        f"{lat.verified} verified)" + (", client partitioning by CRC32 (librdkafka's default)"
                                        if lat.crc32 else ""),
        row("response produced -> outcome received, p50 / p99",
            f"{percentile(ms, 50):.1f} / {percentile(ms, 99):.1f} ms"),
        row("  mean / max", f"{statistics.fmean(ms):.1f} / {max(ms):.1f} ms"),
        row("start produced -> SMS received, p50 / p99",
            f"{percentile(lat.start_to_sms_ms, 50):.1f} / "
            f"{percentile(lat.start_to_sms_ms, 99):.1f} ms"),
        row("start produced -> its reply received, p50 / p99",
            f"{percentile(lat.start_reply_ms, 50):.1f} / "
            f"{percentile(lat.start_reply_ms, 99):.1f} ms"),
        row("response produced -> its reply received, p50 / p99",
            f"{percentile(lat.response_reply_ms, 50):.1f} / "
            f"{percentile(lat.response_reply_ms, 99):.1f} ms"),
        row("completed / s (below the offered rate: queueing counts)", f"{lat.achieved:,.0f}"),
        row("worker CPU per verification", f"{lat.worker_cpu / lat.count * 1000:.2f} ms"),
    ]


def cpu_rows(idle: float, latencies: list[Latency], tp: Throughput | None = None) -> list[str]:
    """The worker process's CPU (utime + stime from ``/proc/<pid>/stat``) per phase."""
    lines = [LINE, "5. worker CPU (user + system, /proc/<pid>/stat) per phase",
             row("phase", "per verification / share of one core"),
             row("idle (timers, ticks, commits, fetch loop)", f"{'-':>9} / {idle:.1%}")]
    for lat in latencies:
        seconds = lat.count / lat.achieved
        lines.append(row(f"steady {lat.rate:g}/s" + (" (CRC32 client)" if lat.crc32 else ""),
                         f"{lat.worker_cpu / lat.count * 1000:6.2f} ms / "
                         f"{lat.worker_cpu / seconds:.1%}"))
    if tp is not None:
        lines.append(row(f"burst of {tp.count}", f"{tp.worker_cpu / tp.count * 1000:6.2f} ms / "
                                                f"{tp.worker_cpu / tp.seconds:.1%}"))
    return lines


def raw_rows(tp: Throughput, raw: Raw) -> list[str]:
    counted = Counted.of(tp)
    # A raw record is 2 records handled (1 consumed + 1 produced); a verification is `handled`.
    equivalent = raw.per_second * 2 / counted.handled
    service_cpu = tp.worker_cpu / (tp.count * counted.handled) * 1e6
    raw_cpu = raw.cpu / (raw.count * 2) * 1e6
    return [
        LINE,
        "3. against a raw aiokafka loop: consume one, produce one (acks=all, same broker)",
        row("raw loop records / s", f"{raw.per_second:,.0f} ({raw.count} records of "
                                    f"{raw.value_bytes} B, 1 consumed + 1 produced each)"),
        row("Kafka records the worker handles per verification",
            f"{counted.handled:.1f} = {counted.consumed:.1f} consumed + "
            f"{counted.produced:.1f} produced"),
        row("  (by topic offsets in phase 1; tick records left out)",
            f"{counted.ticks} ticks in phase 1"),
        row("raw rate as verifications / s (raw/s x 2 / records)", f"{equivalent:,.0f}"),
        row("service / raw, by throughput", f"{tp.per_second / equivalent:.1%}"),
        row("CPU per record handled: worker / raw loop",
            f"{service_cpu:.0f} / {raw_cpu:.0f} µs  ({raw_cpu / service_cpu:.1%})"),
    ]


def tick_rows(ticks: dict[int, TickTimes], due: int) -> list[str]:
    count = next(iter(ticks.values())).ticks
    lines = [LINE, f"4. tick path in process: due() + decide/evolve of {due} due per tick, "
                   f"mean of {count} ticks",
             row("pending in the partition", "wall ms / CPU ms per tick  (of which due())")]
    for pending, t in ticks.items():
        lines.append(row(f"{pending:>9,}", f"{t.mean_ms(t.wall):.3f} / {t.mean_ms(t.cpu):.3f}"
                                           f"  ({t.mean_ms(t.due_wall):.3f})"))
    walls = [t.wall for t in ticks.values()]
    lines.append(row("largest / smallest mean wall time", f"{max(walls) / min(walls):.2f}x"))
    return lines


def report(args: argparse.Namespace, d: Deployment, results: Results) -> str:
    lines = [*header(d, results.loads), *throughput_rows(results.throughput),
             *(line for lat in results.latencies for line in latency_rows(lat)),
             *raw_rows(results.throughput, results.raw),
             *cpu_rows(results.throughput.idle_cpu, results.latencies, results.throughput),
             *tick_rows(results.ticks, args.tick_due), RULE]
    return "\n".join(lines)


def topic_breakdown(tp: Throughput) -> str:
    lines = ["records per verification by topic (phase 1):"]
    for topic, n in sorted(tp.records.items()):
        if n:
            lines.append(f"  {topic:<52} {n / tp.count:6.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


@dataclass
class Results:
    throughput: Throughput | None  # None: profiling the steady phases only
    latencies: list[Latency]
    raw: Raw | None
    ticks: dict[int, TickTimes]  # by pending
    loads: tuple[str, str]  # load average before and after
    idle: float = 0.0  # share of one core, when there is no throughput phase


async def measure_service(args: argparse.Namespace, d: Deployment,
                          worker: Worker) -> tuple[Throughput, list[Latency], Raw]:
    """Phases 1 to 3 against a ready worker."""
    async with Client(d) as client:
        say(f"warm-up: {args.warmup} verifications")
        await client.drive(args.warmup, rate=None, timeout=120)
        say(f"1. throughput: {args.n} verifications (idle for {args.idle_seconds:g} s first)")
        tp = await throughput(client, worker, args.n, args.idle_seconds)
        say(f"   {tp.per_second:,.0f}/s")
        lats = await latencies(args, client, worker)
    say(f"3. raw aiokafka loop: {args.raw_n} records")
    raw = await raw_loop(d, args.raw_n, args.raw_bytes)
    return tp, lats, raw


async def latencies(args: argparse.Namespace, client: Client, worker: Worker) -> list[Latency]:
    """Phase 2 at each offered rate."""
    lats = []
    for rate, crc32 in [*((rate, False) for rate in args.rate),
                        *([(args.crc32_rate, True)] if args.crc32_rate else [])]:
        count = max(10, round(rate * args.latency_seconds))
        say(f"2. latency: {count} verifications at {rate:g}/s"
            + (", partitioned by CRC32" if crc32 else ""))
        lats.append(await latency(client, worker, count, rate, crc32))
    return lats


async def profile_steady(args: argparse.Namespace, d: Deployment,
                         worker: Worker) -> tuple[float, list[Latency]]:
    """``--py-spy``: idle, then the steady phases only, with py-spy sampling the worker."""
    async with Client(d) as client:
        say(f"warm-up: {args.warmup} verifications")
        await client.drive(args.warmup, rate=None, timeout=120)
        say(f"idle for {args.idle_seconds:g} s")
        idle = await idle_cpu(worker, args.idle_seconds)
        spy = pyspy.Profile(worker.pid, args.py_spy / "profile.svg", args.py_spy / "profile.txt")
        spy.start()
        try:
            lats = await latencies(args, client, worker)
        finally:
            spy.stop()
    return idle, lats


def measure(args: argparse.Namespace, d: Deployment) -> Results:
    """Every phase; the worker is stopped (and the topics deleted) whatever happens."""
    load_before = load_average()
    if args.py_spy:
        return measure_profile(args, d, load_before)
    say("4. tick path")
    ticks = tick_times([int(n) for n in args.tick_pending.split(",")], args.tick_due, args.ticks)
    with tempfile.TemporaryDirectory(prefix="phoneverify-bench-") as tmp:
        worker = Worker(d, Path(tmp), args.profile_worker)
        try:
            say(f"starting a worker (topic prefix {d.prefix})")
            worker.start()
            tp, lats, raw = asyncio.run(measure_service(args, d, worker))
        except BaseException:
            say("failed; worker log tail:\n" + worker.log()[-3000:])
            raise
        finally:
            worker.stop()
            if not args.keep_topics:
                cleanup(d)
    return Results(tp, lats, raw, ticks, (load_before, load_average()))


def measure_profile(args: argparse.Namespace, d: Deployment, load_before: str) -> Results:
    """``--py-spy``: the steady phases only, sampled by py-spy."""
    with tempfile.TemporaryDirectory(prefix="phoneverify-bench-") as tmp:
        worker = Worker(d, Path(tmp))
        try:
            say(f"starting a worker (topic prefix {d.prefix})")
            worker.start()
            idle, lats = asyncio.run(profile_steady(args, d, worker))
        except BaseException:
            say("failed; worker log tail:\n" + worker.log()[-3000:])
            raise
        finally:
            worker.stop()
            if not args.keep_topics:
                cleanup(d)
    return Results(None, lats, None, {}, (load_before, load_average()), idle)


def profile_report(args: argparse.Namespace, d: Deployment, results: Results) -> str:
    lines = [*header(d, results.loads),
             *(line for lat in results.latencies for line in latency_rows(lat)),
             *cpu_rows(results.idle, results.latencies), LINE,
             f"6. where the worker's CPU went in the steady phases (py-spy, "
             f"{args.py_spy / 'profile.svg'})"]
    for name, share in pyspy.summary(args.py_spy / "profile.txt"):
        lines.append(row(name, "" if share != share else f"{share:.1%}"))
    return "\n".join([*lines, RULE])


def guard_cost(args: argparse.Namespace) -> dict[bool, Throughput]:
    """Phase 7: the fraud guard's cost. The throughput phase again on fresh workers and
    deployments, FRAUD_GUARD off, on, on, off (``--guard-n`` verifications in all, answered,
    in one prefix: every judgment counts in one key; the deliveries waiting have keys of their
    own, see ``bench/guard_cost.py`` for the cost as they grow). The order
    cancels a load that drifts during the run; the ratio of the two sums is the guard's cost
    (absolute figures move with the machine's load)."""
    total = args.guard_n if args.guard_n is not None else max(200, args.n // 2)
    count = max(50, total // 4)
    runs: dict[bool, list[Throughput]] = {False: [], True: []}
    for guard in (False, True, True, False):
        d = Deployment(args.bootstrap, args.partitions)
        with tempfile.TemporaryDirectory(prefix="phoneverify-bench-") as tmp:
            worker = Worker(d, Path(tmp), FRAUD_GUARD="on" if guard else "off")
            say(f"7. fraud guard {'on' if guard else 'off'}: {count} verifications")
            try:
                worker.start()
                runs[guard].append(asyncio.run(_guarded_throughput(d, worker, args.warmup,
                                                                   count)))
            except BaseException:
                say("failed; worker log tail:\n" + worker.log()[-3000:])
                raise
            finally:
                worker.stop()
                if not args.keep_topics:
                    cleanup(d)
    return {guard: _summed(tps) for guard, tps in runs.items()}


def _summed(tps: list[Throughput]) -> Throughput:
    records: dict[str, int] = {}
    for tp in tps:
        for topic, n in tp.records.items():
            records[topic] = records.get(topic, 0) + n
    return Throughput(sum(t.count for t in tps), sum(t.seconds for t in tps),
                      sum(t.verified for t in tps), sum(t.worker_cpu for t in tps), records,
                      sum(t.idle_cpu for t in tps) / len(tps))


async def _guarded_throughput(d: Deployment, worker: Worker, warmup: int,
                              count: int) -> Throughput:
    async with Client(d) as client:
        await client.drive(warmup, rate=None, timeout=120)
        return await throughput(client, worker, count, 0)


def guard_rows(results: dict[bool, Throughput]) -> list[str]:
    off, on = results[False], results[True]

    def cpu(tp: Throughput) -> float:
        return tp.worker_cpu / tp.count * 1000

    def records(tp: Throughput) -> float:
        return sum(tp.records.values()) / tp.count

    return [
        LINE,
        "7. the fraud guard's cost (phase 1 again on fresh workers: FRAUD_GUARD off, on, on, off)",
        row("verifications / s, off -> on", f"{off.per_second:,.0f} -> {on.per_second:,.0f} "
                                            f"({on.per_second / off.per_second:.2f}x)"),
        row("worker CPU per verification, off -> on",
            f"{cpu(off):.2f} -> {cpu(on):.2f} ms ({cpu(on) / cpu(off):.2f}x)"),
        row("records per verification, off -> on",
            f"{records(off):.1f} -> {records(on):.1f} (verification.guard: "
            f"{on.records.get('verification.guard', 0) / on.count:.1f})"),
    ]


def rates(text: str) -> list[float]:
    return [float(rate) for rate in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="verifications for throughput")
    parser.add_argument("--warmup", type=int, default=200, help="verifications before timing")
    parser.add_argument("--rate", type=rates, default=[50.0, 200.0],
                        help="offered starts/s for latency (comma-separated for several)")
    parser.add_argument("--latency-seconds", type=float, default=60.0,
                        help="how long each latency phase offers its rate")
    parser.add_argument("--crc32-rate", type=float, default=50.0,
                        help="offered starts/s for the latency of a CRC32-partitioning client "
                             "(0: skip)")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="how long the idle worker's CPU is measured")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--raw-n", type=int, default=50_000, help="records for the raw loop")
    parser.add_argument("--raw-bytes", type=int, default=200, help="raw record value size")
    parser.add_argument("--tick-pending", default="1000,10000,100000")
    parser.add_argument("--tick-due", type=int, default=100, help="expiring per tick")
    parser.add_argument("--ticks", type=int, default=200, help="ticks timed per size")
    parser.add_argument("--bootstrap",
                        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    parser.add_argument("--profile-worker", type=Path, default=None,
                        help="run the worker under cProfile, stats written to this file")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="only the steady phases, sampled by py-spy: DIR/profile.svg (a "
                             "flame graph) and DIR/profile.txt (collapsed stacks)")
    parser.add_argument("--before", metavar="GIT_REF", default=None,
                        help="before / after in one run: a second worker runs the code of "
                             "GIT_REF (bench/compare.py); latency phases and a burst of --n")
    parser.add_argument("--before-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the before worker (repeatable)")
    parser.add_argument("--keep-topics", action="store_true", help="leave the topics on the broker")
    parser.add_argument("--guard-n", type=int, default=None,
                        help="verifications for the fraud guard's cost, off then on (default "
                             "half of --n; 0: skip)")
    return parser.parse_args(argv)


def cleanup(d: Deployment) -> None:
    """Delete the bench's topics from the (maybe shared) broker; a failure is only reported."""
    try:
        say(f"deleted {asyncio.run(delete_topics(d.bootstrap, d))} topics")
    except Exception as error:
        say(f"could not delete the topics with prefix {d.prefix}: {error!r}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    assert "app" not in sys.modules  # the bench must not build a Faust app of its own
    # Producer retries just after a topic is created ("not leader") are expected; errors raise.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    if args.before:
        import compare  # beside this file

        print(compare.run(args))
        return 0
    d = Deployment(args.bootstrap, args.partitions)
    results = measure(args, d)
    if results.throughput is None:
        print(profile_report(args, d, results))
        return 0
    guard = guard_cost(args) if args.guard_n != 0 else None
    print(report(args, d, results))
    if guard is not None:
        print("\n".join([*guard_rows(guard), RULE]))
    print(topic_breakdown(results.throughput))
    return 0


if __name__ == "__main__":
    sys.exit(main())
