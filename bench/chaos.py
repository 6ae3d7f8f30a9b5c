"""Fault suite: each scenario runs under a steady load of verifications, injects its faults,
and checks what came out. Prints one table.

    .venv/bin/python bench/chaos.py [--quick] [--only 1,4] [--rate 50] [--port 59092]

(``make chaos``; ``make chaos ARGS=--quick`` for the short form CI runs; ``--guarantee
exactly_once`` or ``both`` runs the workers with ``PROCESSING_GUARANTEE`` so.)

Scenarios:

1. ``broker-kill``: a 3-node KRaft cluster (RF 3, min.insync.replicas 2), one worker; SIGKILL of
   the broker that leads the most of the deployment's partitions, later its restart.
2. ``broker-restart``: a single broker, one worker; SIGTERM of the only broker, an outage,
   then the broker is started again on its data.
3. ``worker-kill``: two workers; SIGKILL of one (its partitions move to the other once its
   Faust session, 15 s, has expired).
4. ``worker-zombie``: two workers; SIGSTOP of one past its session timeout (a deliberate
   pause of 25 s), then SIGCONT: the resumed worker still believes it owns its partitions and
   may write late before it learns otherwise.
5. ``scale``: workers added and removed under load, 1 -> 2 -> 3 -> 1 (SIGTERM).

The load: an aiokafka client (idempotent producer, so the client itself never duplicates a
command) starts verifications at a steady rate, each with its own phone number and
``request_id`` ``s-<id>``. Each SMS is answered first with a wrong code (``w-<id>``), and once
that one's reply is back with the code the SMS carried (``r-<id>``). So every verification
must end verified with ``attempts == 2``: a wrong code delivered again must never count twice.

Checks, from the topics read again from the beginning (``read_committed``, as a client of
``exactly_once`` must read) once the workers have committed everything: every started
verification has an outcome (else it is *lost*); copies of an outcome, a reply or an event
are identical (counted; under ``exactly_once`` any copy fails the scenario), verified,
``code_matched``, 2 attempts; no verification got SMS commands with two different codes, and
the code is the one ``draw_code`` gives with the deployment's ``CODE_HASH_KEY``; every
request id has a reply, its copies identical, with the expected result; no dead letters;
replay of ``verification.events`` gives exactly the table (``ops/replay.py``).

*Recovery* after a fault: the longest a verification started within 2 s of it (before or
after; if none was, because the client's producer held its sends while no broker answered,
the first ones started after it) waited after the fault (from the fault, or from its start
if later) for its outcome, as the client saw it. With nothing disrupted that is about one
normal latency. A
worker that exits on its own is started again, as a supervisor would (counted).

The suite starts what it needs itself: brokers from ``ops/broker/local.py`` with their home
under a temporary ``/tmp/chaos-*`` folder (the jars copied from ``.local/kafka/libs`` or
``$LOCAL_KAFKA_HOME/libs``, so nothing is downloaded when they are there), on ports from
``--port`` (default 59092): the 3-node cluster on P, P+1, P+2 (controllers P+100..P+102), the
single broker on P+5 (controller P+6). Everything it started is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from phoneverify.models.codes import draw_code
from phoneverify.ops.broker.local import POM, LocalBroker, stop_process
from phoneverify.ops.replay import Report, caught_up, read_all, records
from phoneverify.ops.replay import run as replay
from phoneverify.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CODE_HASH_KEY = "chaos-code-hash-key-not-secret"
CODE_LENGTH = 4
DIGITS = re.compile(r"\d+")
#: Topics whose records the workers consume: once their committed offsets reach the ends,
#: everything the workers will ever write about the load is written (Faust flushes its
#: producer before it commits).
PIPELINE = ("verification.start", "verification.admission", "verification.admitted",
            "verification.response", "verification.terminate", "verification.rerouted",
            "verification.sms", "verification.sms-status")
#: What each request of the load must be answered: result, attempts left.
EXPECTED_REPLIES = {"s": ("started", 4), "w": ("wrong_code", 3), "r": ("verified", 2)}


def say(message: str) -> None:
    """Progress on stderr, so stdout holds only the table."""
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def phone_number(i: int) -> str:
    """A distinct, possible US number per verification (as bench.py's)."""
    return f"+1 {201 + i // 10_000:03d}-555-{i % 10_000:04d}"


def wrong(code: str) -> str:
    return str((int(code) + 1) % 10**CODE_LENGTH).zfill(CODE_LENGTH)


@dataclass(frozen=True)
class Params:
    """How long each phase lasts and how hard the load pushes."""

    rate: float = 50.0  # starts per second
    warmup: float = 10.0  # load before the first fault
    steady: float = 10.0  # load held after each recovery
    outage: float = 20.0  # how long the single broker stays down
    pause: float = 25.0  # SIGSTOP: past the worker's 15 s session timeout
    partitions: int = 8
    recover_timeout: float = 180.0
    drain_timeout: float = 300.0
    guarantee: str = "at_least_once"  # the workers' PROCESSING_GUARANTEE


FULL = Params()
QUICK = Params(rate=30.0, warmup=5.0, steady=5.0, outage=10.0)


# ---------------------------------------------------------------- brokers


def broker_home(parent: Path) -> Path:
    """A broker home under ``parent`` with the jars copied in (downloaded only if no copy
    with the pom's stamp is found)."""
    home = parent / "kafka"
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    sources = [ROOT / ".local" / "kafka" / "libs"]
    if os.environ.get("LOCAL_KAFKA_HOME"):
        sources.append(Path(os.environ["LOCAL_KAFKA_HOME"]) / "libs")
    for libs in sources:
        stamp = libs / ".pom-sha256"
        if stamp.exists() and stamp.read_text() == digest and not (home / "libs").exists():
            shutil.copytree(libs, home / "libs")
            break
    return home


def local_broker(port: int, brokers: int, home: Path) -> LocalBroker:
    return LocalBroker(f"127.0.0.1:{port}", home, start_timeout=240.0, brokers=brokers)


# ---------------------------------------------------------------- the service


@dataclass
class Service:
    """One deployment of the service on a broker: its own topic prefix and app id."""

    bootstrap: str
    tmp: Path
    partitions: int
    guarantee: str = "at_least_once"
    prefix: str = field(default_factory=lambda: f"chaos{uuid.uuid4().hex[:8]}.")

    @property
    def app_id(self) -> str:
        return self.prefix.rstrip(".") + "-app"

    def topic(self, name: str) -> str:
        return self.prefix + name

    def settings(self) -> Settings:
        return Settings(kafka_bootstrap_servers=self.bootstrap, topic_prefix=self.prefix,
                        app_id=self.app_id, partitions=self.partitions)

    def env(self, name: str, web_port: int) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if key not in ("REPLICATION_FACTOR", "TOPIC_PREFIX", "APP_ID")}
        return {**env,
                "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "TOPIC_PREFIX": self.prefix,
                "APP_ID": self.app_id,
                "DATA_DIR": str(self.tmp / f"data-{name}"),
                "WEB_PORT": str(web_port),
                "CODE_HASH_KEY": CODE_HASH_KEY,
                "API_KEY": "chaos-api-key",
                "PARTITIONS": str(self.partitions),
                "PROCESSING_GUARANTEE": self.guarantee,
                "RATE_LIMIT_STARTS": "1000000",
                "VERIFICATION_TIMEOUT_SECONDS": "900",  # faults must not expire anything
                "EARLY_COMMAND_GRACE_SECONDS": "300",
                "SMS_BACKEND": "console",
                "TICK_INTERVAL_SECONDS": "1",
                "LOG_LEVEL": "INFO"}


class Worker:
    """A worker process (``python -m phoneverify.agents.worker``) logging to a file."""

    def __init__(self, service: Service, name: str) -> None:
        self.name = name
        self.log_path = service.tmp / f"worker-{name}.log"
        self.env = service.env(name, free_port())
        self.process: subprocess.Popen[bytes] | None = None
        self._log_from = 0
        self.paused = False

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def launch(self) -> None:
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "phoneverify.agents.worker"], cwd=ROOT, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def log(self, since_launch: bool = False, since: int = 0) -> str:
        """The log, from its start, the last launch, or byte offset ``since``."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_from if since_launch else since)
            return log.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    async def start(self, timeout: float = 180.0) -> Worker:
        self.launch()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while "Worker]: Ready" not in self.log(since_launch=True):
            if self.exited() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.exited()}:\n"
                                   + self.log()[-4000:])
            if loop.time() > deadline:
                raise TimeoutError(f"worker {self.name} not ready in {timeout:.0f}s")
            await asyncio.sleep(0.2)
        return self

    def kill(self) -> None:
        """SIGKILL (no shutdown, no flush, no commit), and reap it."""
        if self.exited() is None:
            self.process.kill()  # type: ignore[union-attr]
            self.process.wait()  # type: ignore[union-attr]

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        self.paused = True

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        self.paused = False

    async def terminate(self, timeout: float = 60.0) -> None:
        """SIGTERM, wait, SIGKILL after ``timeout``: this process only, by its pid."""
        if self.process is None:
            return
        if self.paused:
            self.resume()
        await asyncio.to_thread(stop_process, self.process, timeout)


# ---------------------------------------------------------------- the load


def _reader(bootstrap: str, topic: str, partitions: int) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100,
                                isolation_level="read_committed")
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    return consumer


class Load:
    """Starts verifications at a steady rate and answers each as described in the module's
    docstring; records when (``time.monotonic()``) each start was sent and each outcome seen."""

    def __init__(self, service: Service, rate: float) -> None:
        self.s = service
        self.rate = rate
        self.key = CODE_HASH_KEY.encode()
        self.tag = uuid.uuid4().hex[:6]
        # Idempotent: a retry after a broker failure never writes a command twice. A long
        # request timeout: the producer itself keeps a command until the broker is back.
        self.producer = AIOKafkaProducer(bootstrap_servers=service.bootstrap, acks="all",
                                         enable_idempotence=True, linger_ms=0,
                                         request_timeout_ms=300_000)
        self.readers = {name: _reader(service.bootstrap, service.topic(name), service.partitions)
                        for name in ("verification.sms", "verification.replies",
                                     "verification.outcome")}
        self.started: dict[str, float] = {}
        self.concluded: dict[str, float] = {}
        self.codes: dict[str, str] = {}  # the code of each verification's first SMS
        self.answered_right: set[str] = set()
        self.replied: dict[str, float] = {}  # request id -> first reply seen
        self.sends: list[asyncio.Future[Any]] = []
        self.starting = True
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        await self.producer.start()
        for reader in self.readers.values():
            await reader.start()
        self.tasks = [asyncio.create_task(self._starter()),
                      asyncio.create_task(self._read("verification.sms", self._on_sms)),
                      asyncio.create_task(self._read("verification.replies", self._on_reply)),
                      asyncio.create_task(self._read("verification.outcome", self._on_outcome))]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for reader in self.readers.values():
            await reader.stop()
        await self.producer.stop()

    def check(self) -> None:
        """Raise what stopped a task of the load, if one stopped."""
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception():
                raise task.exception()  # type: ignore[misc]

    async def _send(self, topic: str, iid: str, value: dict[str, str]) -> None:
        self.sends.append(await self.producer.send(
            self.s.topic(topic), json.dumps(value).encode(), key=iid.encode()))

    async def _starter(self) -> None:
        loop = asyncio.get_running_loop()
        began, i = loop.time(), 0
        while self.starting:
            await asyncio.sleep(max(0.0, began + i / self.rate - loop.time()))
            if not self.starting:
                return
            iid = f"{self.tag}-{i:06d}"
            self.started[iid] = time.monotonic()
            await self._send("verification.start", iid, {
                "instance_id": iid, "phone_number": phone_number(i), "request_id": f"s-{iid}"})
            i += 1

    async def _read(self, name: str, handle: Callable[[dict[str, Any], float],
                                                      Awaitable[None]]) -> None:
        reader = self.readers[name]
        while True:
            batches = await reader.getmany(timeout_ms=200)
            now = time.monotonic()
            for fetched in batches.values():
                for record in fetched:
                    await handle(json.loads(record.value), now)

    async def _on_sms(self, sms: dict[str, Any], now: float) -> None:
        iid = sms["instance_id"]
        if iid in self.codes or iid not in self.started:
            return
        match = DIGITS.search(sms["body"])
        assert match, "an SMS body without a code"
        self.codes[iid] = match.group()
        await self._send("verification.response", iid, {
            "instance_id": iid, "code": wrong(match.group()), "request_id": f"w-{iid}"})

    async def _on_reply(self, reply: dict[str, Any], now: float) -> None:
        request, iid = reply["request_id"], reply["instance_id"]
        self.replied.setdefault(request, now)
        if request == f"w-{iid}" and iid in self.codes and iid not in self.answered_right:
            self.answered_right.add(iid)  # the wrong code is decided: now the right one
            await self._send("verification.response", iid, {
                "instance_id": iid, "code": self.codes[iid], "request_id": f"r-{iid}"})

    async def _on_outcome(self, outcome: dict[str, Any], now: float) -> None:
        if outcome["instance_id"] in self.started:
            self.concluded.setdefault(outcome["instance_id"], now)

    # -- waiting -------------------------------------------------------------------------

    async def hold(self, seconds: float) -> None:
        """Keep the load running for ``seconds`` (a chosen duration, not a wait for a state)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            self.check()
            await asyncio.sleep(min(0.5, max(0.0, end - loop.time())))

    async def until(self, condition: Callable[[], bool], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            self.check()
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def drain(self, timeout: float) -> bool:
        """Stop starting; wait until every verification concluded and every request has its
        reply (True), or ``timeout`` (False)."""
        self.starting = False
        requests = len(EXPECTED_REPLIES)
        done = await self.until(lambda: len(self.concluded) == len(self.started)
                                and len(self.replied) == requests * len(self.started), timeout)
        await asyncio.gather(*self.sends)  # raises if the producer gave up on a command
        return done


# ---------------------------------------------------------------- verdicts


@dataclass
class Verdict:
    """What one scenario produced, checked."""

    name: str
    guarantee: str = "at_least_once"
    started: int = 0
    concluded: int = 0
    duplicate_outcomes: int = 0
    duplicate_events: int = 0  # (instance_id, life, seq) seen more than once
    different_outcomes: int = 0  # verifications whose outcome copies differ
    bad_outcomes: list[str] = field(default_factory=list)  # not verified with 2 attempts
    different_codes: int = 0  # verifications with SMS commands carrying different codes
    unexpected_codes: int = 0  # an SMS code that is not draw_code's
    duplicate_sms: int = 0
    requests: int = 0
    missing_replies: int = 0
    duplicate_replies: int = 0
    different_replies: int = 0  # request ids whose reply copies differ
    bad_replies: list[str] = field(default_factory=list)
    dead_letters: int = 0
    recovery: list[tuple[str, float | None]] = field(default_factory=list)
    latency_p50: float = 0.0
    latency_max: float = 0.0
    worker_restarts: int = 0
    replay: Report | None = None
    drained: bool = True
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.started - self.concluded

    @property
    def replay_ok(self) -> bool:
        return self.replay is not None and self.replay.ok and (
            self.replay.rebuilt == self.replay.live == self.replay.matching == self.started)

    @property
    def copies(self) -> int:
        """Copies a ``read_committed`` consumer saw of outcomes, replies and events."""
        return self.duplicate_outcomes + self.duplicate_replies + self.duplicate_events

    @property
    def ok(self) -> bool:
        if self.guarantee == "exactly_once" and self.copies:
            return False
        return (self.lost == 0 and self.different_outcomes == 0 and not self.bad_outcomes
                and self.different_codes == 0 and self.unexpected_codes == 0
                and self.missing_replies == 0 and self.different_replies == 0
                and not self.bad_replies and self.dead_letters == 0 and self.replay_ok)

    def problems(self) -> list[str]:
        found = []
        for label, value in (("lost", self.lost), ("non-identical outcomes",
                                                   self.different_outcomes),
                             ("different codes", self.different_codes),
                             ("codes not draw_code's", self.unexpected_codes),
                             ("missing replies", self.missing_replies),
                             ("non-identical replies", self.different_replies),
                             ("dead letters", self.dead_letters)):
            if value:
                found.append(f"{label}: {value}")
        if self.guarantee == "exactly_once" and self.copies:
            found.append(f"copies under exactly_once: {self.duplicate_outcomes} outcomes, "
                         f"{self.duplicate_replies} replies, {self.duplicate_events} events")
        found += [f"outcome: {bad}" for bad in self.bad_outcomes[:10]]
        found += [f"reply: {bad}" for bad in self.bad_replies[:10]]
        if self.replay is None:
            found.append("replay did not run")
        elif not self.replay_ok:
            found.append(f"replay: rebuilt {self.replay.rebuilt}, live {self.replay.live}, "
                         f"identical {self.replay.matching}, problems "
                         f"{self.replay.problems[:10]}")
        return found

    def recovery_text(self) -> str:
        return ", ".join(f"{label} {'-' if s is None else f'{s:.1f}'}"
                         for label, s in self.recovery)


def _group(records: list[tuple[bytes | None, bytes | None]], field_name: str
           ) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _key, value in records:
        record = json.loads(value or b"{}")
        grouped[str(record.get(field_name))].append(record)
    return grouped


async def _topic(service: Service, name: str) -> list[tuple[bytes | None, bytes | None]]:
    return [record async for record in read_all(service.settings(), service.topic(name))]


async def judge(verdict: Verdict, service: Service, load: Load) -> None:
    """Read the output topics from the beginning and check every verification of the load."""
    ids = set(load.started)
    outcomes = _group(await _topic(service, "verification.outcome"), "instance_id")
    sms = _group(await _topic(service, "verification.sms"), "instance_id")
    replies = _group(await _topic(service, "verification.replies"), "request_id")
    verdict.dead_letters = len(await _topic(service, "verification.dead-letter"))
    events = Counter()
    for _key, value in await _topic(service, "verification.events"):
        event = json.loads(value or b"{}")
        events[(event.get("instance_id"), event.get("life"), event.get("seq"))] += 1
    verdict.duplicate_events = sum(n - 1 for n in events.values())
    verdict.started = len(ids)
    verdict.concluded = len(ids & set(outcomes))
    for iid, copies in outcomes.items():
        verdict.duplicate_outcomes += len(copies) - 1
        if any(copy != copies[0] for copy in copies):
            verdict.different_outcomes += 1
            verdict.notes.append(f"{iid}: outcome copies differ: {copies}")
        first = copies[0]
        if (first.get("verified"), first.get("reason"), first.get("attempts")) != (
                True, "code_matched", 2):
            verdict.bad_outcomes.append(f"{iid}: {first}")
    for iid, copies in sms.items():
        verdict.duplicate_sms += len(copies) - 1
        codes = {DIGITS.search(copy["body"]).group() for copy in copies}  # type: ignore[union-attr]
        if len(codes) > 1:
            verdict.different_codes += 1
            verdict.notes.append(f"{iid}: SMS commands with codes {sorted(codes)}")
        if codes != {draw_code(load.key, iid, CODE_LENGTH)}:
            verdict.unexpected_codes += 1
    for iid in ids:
        for kind, (result, left) in EXPECTED_REPLIES.items():
            request = f"{kind}-{iid}"
            verdict.requests += 1
            copies = replies.get(request, [])
            if not copies:
                verdict.missing_replies += 1
                continue
            verdict.duplicate_replies += len(copies) - 1
            if any(copy != copies[0] for copy in copies):
                verdict.different_replies += 1
                verdict.notes.append(f"{request}: reply copies differ: {copies}")
            if (copies[0]["result"], copies[0]["attempts_left"]) != (result, left):
                verdict.bad_replies.append(f"{request}: {copies[0]}")
    latencies = [load.concluded[i] - load.started[i] for i in ids if i in load.concluded]
    if latencies:
        verdict.latency_p50 = statistics.median(latencies)
        verdict.latency_max = max(latencies)


#: Verifications started this close to a fault (before or after) measure its recovery.
AROUND = 2.0


def around(load: Load, at: float) -> list[str]:
    """The verifications started within ``AROUND`` seconds of ``at``; if none (the client's
    producer held its sends while no broker answered), those started in the ``AROUND``
    seconds after the first one started after ``at``."""
    ids = [iid for iid, t in load.started.items() if abs(t - at) <= AROUND]
    if not ids:
        first = min((t for t in load.started.values() if t > at), default=None)
        if first is not None:
            ids = [iid for iid, t in load.started.items() if first <= t <= first + AROUND]
    return ids


def recovery(load: Load, at: float) -> float | None:
    """The longest a verification started around ``at`` (:func:`around`) waited after it:
    from ``at`` (or its start, if later) until its outcome. None: one never concluded."""
    waits = []
    for iid in around(load, at):
        end = load.concluded.get(iid)
        if end is None:
            return None
        waits.append(end - max(load.started[iid], at))
    return max(waits, default=0.0)


# ---------------------------------------------------------------- a scenario


class Scenario:
    """Workers of one service under a load, a script of faults, and the verdict."""

    def __init__(self, name: str, bootstrap: str, tmp: Path, params: Params,
                 broker: LocalBroker | None = None) -> None:
        self.name = name
        self.params = params
        self.broker = broker
        self.tmp = tmp / name
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.service = Service(bootstrap, self.tmp, params.partitions, params.guarantee)
        self.workers: dict[str, Worker] = {}
        self.supervised: set[str] = set()
        self.events: list[tuple[str, float]] = []
        self.restarts = 0
        self.load: Load | None = None
        self.verdict = Verdict(name, params.guarantee)

    # -- workers -------------------------------------------------------------------------

    async def add_worker(self, name: str) -> Worker:
        worker = self.workers[name] = Worker(self.service, name)
        await worker.start()
        self.supervised.add(name)
        return worker

    async def remove_workers(self, *names: str) -> None:
        """SIGTERM (a graceful stop), several at once."""
        self.supervised.difference_update(names)
        await asyncio.gather(*(self.workers[name].terminate() for name in names))

    def kill_worker(self, name: str) -> None:
        self.supervised.discard(name)
        self.workers[name].kill()

    async def _supervise(self) -> None:
        """A worker that exits on its own is started again (as a container's restart policy
        would); each such exit is an event and counted."""
        while True:
            for name in sorted(self.supervised):
                worker = self.workers[name]
                code = worker.exited()
                if code is not None:
                    self.restarts += 1
                    self.mark(f"{name} exited ({code}), restarted")
                    say(f"{self.name}: worker {name} exited with {code}; starting it again")
                    worker.launch()
            await asyncio.sleep(0.5)

    # -- events ----------------------------------------------------------------------------

    def mark(self, label: str) -> float:
        at = time.monotonic()
        self.events.append((label, at))
        say(f"{self.name}: {label}")
        return at

    async def recovered(self, at: float) -> None:
        """Wait (with a deadline) until every verification started within ``AROUND`` seconds
        of ``at`` has concluded (those :func:`recovery` measures)."""
        assert self.load is not None
        load = self.load
        await load.until(lambda: any(t > at + AROUND for t in load.started.values()),
                         self.params.recover_timeout)
        flying = set(around(load, at))
        if not await load.until(lambda: flying <= load.concluded.keys(),
                                self.params.recover_timeout):
            missing = len(flying - load.concluded.keys())
            self.verdict.notes.append(f"not recovered {self.params.recover_timeout:.0f}s after "
                                      f"{at:.1f}: {missing} in flight still pending")
            say(f"{self.name}: {missing} verifications still pending after "
                f"{self.params.recover_timeout:.0f}s")

    # -- running -------------------------------------------------------------------------

    async def run(self, initial: list[str], script: Callable[[Scenario, Load], Awaitable[None]]
                  ) -> Verdict:
        began = time.monotonic()
        say(f"{self.name}: starting {len(initial)} worker(s), prefix {self.service.prefix}")
        supervisor: asyncio.Task[None] | None = None
        try:
            for name in initial:
                await self.add_worker(name)
            supervisor = asyncio.create_task(self._supervise())
            async with Load(self.service, self.params.rate) as load:
                self.load = load
                say(f"{self.name}: load at {self.params.rate:g}/s")
                await load.hold(self.params.warmup)
                await script(self, load)
                say(f"{self.name}: load stopped after {len(load.started)} starts; draining")
                self.verdict.drained = await load.drain(self.params.drain_timeout)
                await quiesce(self.service, self.params.drain_timeout)
                supervisor.cancel()
                say(f"{self.name}: checking the topics and replaying")
                await judge(self.verdict, self.service, load)
                self.verdict.replay = await replay(self.service.settings())
                if self.verdict.replay.problems:
                    await self.collect_evidence(self.verdict.replay.problems)
            self.verdict.recovery = [(label, recovery(load, at)) for label, at in self.events
                                     if "restarted" not in label]
            self.verdict.worker_restarts = self.restarts
        finally:
            if supervisor is not None:
                supervisor.cancel()
            await asyncio.gather(*(w.terminate() for w in self.workers.values()))
        self.verdict.seconds = time.monotonic() - began
        if not self.verdict.drained:
            self.verdict.notes.append("not every verification concluded within the drain "
                                      f"timeout ({self.params.drain_timeout:.0f}s)")
        for problem in self.verdict.problems():
            say(f"{self.name}: PROBLEM {problem}")
        say(f"{self.name}: done in {self.verdict.seconds:.0f}s")
        return self.verdict

    async def collect_evidence(self, problems: list[str]) -> None:
        """For each verification replay found different: its changelog records and events
        (partition, offset, broker time) and the workers' log lines about it, in the notes."""
        ids = list(dict.fromkeys(problem.split(":", 1)[0] for problem in problems))[:3]
        changelog = f"{self.service.app_id}-verifications-changelog"
        for iid in ids:
            self.verdict.notes.append(f"evidence for {iid}:")
            for p, offset, at, value in await history(self.service, changelog, iid):
                stored = json.loads(value) if value else None
                state = stored["state"] if stored else {}
                self.verdict.notes.append(
                    f"  changelog [{p}]@{offset} {at}: " + ("tombstone" if stored is None else
                    f"version {state.get('version')} {state.get('status')}, "
                    f"{len(state.get('wrong_at', []))} wrong, seen {stored.get('seen')}"))
            for p, offset, at, value in await history(self.service,
                                                      self.service.topic("verification.events"),
                                                      iid):
                event = json.loads(value or b"{}")
                self.verdict.notes.append(f"  event [{p}]@{offset} {at}: seq {event.get('seq')} "
                                          f"{event.get('type')} at {event.get('at')}")
            self.verdict.notes += [f"  log {line[:180]}" for line in self.evidence(
                re.escape(iid))[:20]]

    def evidence(self, pattern: str) -> list[str]:
        """Lines of the workers' logs that match ``pattern`` (for the notes)."""
        lines = []
        for worker in self.workers.values():
            lines += [f"{worker.name}: {line}" for line in worker.log().splitlines()
                      if re.search(pattern, line)]
        return lines


async def quiesce(service: Service, timeout: float) -> None:
    """Wait until the workers have committed every record of the pipeline's topics."""
    await caught_up(service.bootstrap, service.app_id,
                    [service.topic(topic) for topic in PIPELINE], service.partitions, timeout,
                    interval=0.2)


async def history(service: Service, topic: str, key: str
                  ) -> list[tuple[int, int, str, bytes | None]]:
    """Every record of ``topic`` with ``key``: partition, offset, broker time, value."""
    return [(m.partition, m.offset,
             time.strftime("%H:%M:%S", time.localtime(m.timestamp / 1000))
             + f".{m.timestamp % 1000:03d}", m.value)
            async for m in records(service.bootstrap, topic, service.partitions)
            if m.key == key.encode()]


async def leaders(service: Service) -> tuple[Counter[int], int]:
    """How many of the deployment's partitions each broker (node id) leads, and which node
    coordinates its consumer group."""
    admin = AIOKafkaAdminClient(bootstrap_servers=service.bootstrap)
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics()
                  if t.startswith((service.prefix, service.app_id + "-"))]
        led: Counter[int] = Counter()
        for topic in await admin.describe_topics(topics):
            for partition in topic["partitions"]:
                led[partition["leader"]] += 1
        return led, await admin.find_coordinator(service.app_id)
    finally:
        await admin.close()


# ---------------------------------------------------------------- the five scripts


async def broker_kill(s: Scenario, load: Load) -> None:
    assert s.broker is not None
    led, coordinator = await leaders(s.service)
    node_id, count = led.most_common(1)[0]
    s.verdict.notes.append(f"killed node {node_id}: it led {count} of {sum(led.values())} "
                           f"partitions; group coordinator: node {coordinator}")
    at = s.mark(f"SIGKILL broker {node_id}")
    s.broker.kill_node(node_id - 1)
    await s.recovered(at)
    await load.hold(s.params.steady)
    at = s.mark(f"restart broker {node_id}")
    began = time.monotonic()
    await asyncio.to_thread(s.broker.restart_node, node_id - 1)
    s.verdict.notes.append(f"node {node_id} was listed live again "
                           f"{time.monotonic() - began:.1f}s after its restart")
    await s.recovered(at)
    await load.hold(s.params.steady)


async def broker_restart(s: Scenario, load: Load) -> None:
    assert s.broker is not None
    stopped = s.mark("SIGTERM broker")
    await asyncio.to_thread(s.broker.stop_node, 0)
    s.verdict.notes.append(f"broker shut down in {time.monotonic() - stopped:.1f}s; "
                           f"down {s.params.outage:g}s")
    await load.hold(s.params.outage)  # the outage: a chosen duration
    at = s.mark("start broker")
    await asyncio.to_thread(s.broker.restart_node, 0)
    s.verdict.notes.append(f"broker ready {time.monotonic() - at:.1f}s after its start")
    await s.recovered(at)
    await load.hold(s.params.steady)


async def worker_kill(s: Scenario, load: Load) -> None:
    at = s.mark("SIGKILL w2")
    s.kill_worker("w2")
    await s.recovered(at)
    await load.hold(s.params.steady)


async def worker_zombie(s: Scenario, load: Load) -> None:
    zombie = s.workers["w2"]
    s.supervised.discard("w2")  # a stopped process is not an exited one, but be explicit
    size = zombie.log_size()
    stopped = s.mark("SIGSTOP w2")
    zombie.pause()
    await load.hold(s.params.pause)  # deliberately past the 15 s session timeout
    at = s.mark("SIGCONT w2")
    zombie.resume()
    s.supervised.add("w2")
    await s.recovered(stopped)
    await s.recovered(at)
    await load.hold(s.params.steady)
    late = zombie.log(since=size).splitlines()
    interesting = [line for line in late if re.search(
        r"CommitFailed|RebalanceInProgress|IllegalGeneration|UnknownMemberId|outbox again|"
        r"fenced by the broker|was stopped for|"
        r"ERROR|Traceback|crash|verification .*: (verified|failed)", line)]
    s.verdict.notes.append(f"zombie log after SIGCONT: {len(interesting)} notable lines")
    s.verdict.notes += [f"  w2: {line[:200]}" for line in interesting[:12]]


async def scale(s: Scenario, load: Load) -> None:
    for name in ("w2", "w3"):
        at = s.mark(f"+{name}")
        await s.add_worker(name)
        await s.recovered(at)
        await load.hold(s.params.steady)
    at = s.mark("-w2 -w3")
    await s.remove_workers("w2", "w3")
    await s.recovered(at)
    await load.hold(s.params.steady)


@dataclass(frozen=True)
class Plan:
    number: int
    name: str
    title: str
    brokers: int  # 3: the cluster; 1: the single broker
    workers: tuple[str, ...]
    script: Callable[[Scenario, Load], Awaitable[None]]


PLANS = (
    Plan(1, "broker-kill", "3 brokers: SIGKILL a leader, restart it", 3, ("w1",), broker_kill),
    Plan(2, "broker-restart", "1 broker: SIGTERM it, start it again", 1, ("w1",),
         broker_restart),
    Plan(3, "worker-kill", "2 workers: SIGKILL one", 1, ("w1", "w2"), worker_kill),
    Plan(4, "worker-zombie", "2 workers: SIGSTOP one 25 s, SIGCONT", 1, ("w1", "w2"),
         worker_zombie),
    Plan(5, "scale", "workers 1 -> 2 -> 3 -> 1", 1, ("w1",), scale),
)


def run_plan(plan: Plan, bootstrap: str, tmp: Path, params: Params,
             broker: LocalBroker | None) -> Verdict:
    scenario = Scenario(f"{plan.name}-{params.guarantee}", bootstrap, tmp, params, broker)
    return asyncio.run(scenario.run(list(plan.workers), plan.script))


# ---------------------------------------------------------------- the table


def table(verdicts: list[Verdict]) -> str:
    head = ("scenario", "guarantee", "started", "concluded", "lost", "copies: outcomes / "
            "replies / events", "diff codes", "bad replies", "recovery s", "replay")
    rows = [head]
    for v in verdicts:
        bad = v.missing_replies + v.different_replies + len(v.bad_replies)
        replay_text = ("clean" if v.replay_ok else "DIFFERS") + (
            f" ({v.replay.matching})" if v.replay else "")
        rows.append((v.name, v.guarantee, str(v.started), str(v.concluded), str(v.lost),
                     f"{v.duplicate_outcomes} / {v.duplicate_replies} / {v.duplicate_events}",
                     str(v.different_codes), str(bad),
                     v.recovery_text(), replay_text))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def details(verdicts: list[Verdict]) -> str:
    lines = []
    for v in verdicts:
        lines.append(f"{v.name}: {'OK' if v.ok else 'FAILED'} in {v.seconds:.0f}s; "
                     f"start->outcome p50 {v.latency_p50:.2f}s, max {v.latency_max:.1f}s; "
                     f"{v.requests} requests, {v.duplicate_replies} duplicate replies "
                     f"(identical), {v.duplicate_sms} duplicate SMS commands (same code); "
                     f"worker restarts {v.worker_restarts}")
        lines += [f"  {note}" for note in v.notes[:80]]
        lines += [f"  PROBLEM {problem}" for problem in v.problems()]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short phases (for CI)")
    parser.add_argument("--only", default="", help="scenario numbers, e.g. 1,4")
    parser.add_argument("--rate", type=float, default=None, help="starts per second")
    parser.add_argument("--port", type=int, default=59092, help="base port of the brokers")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--guarantee", default="at_least_once",
                        choices=("at_least_once", "exactly_once", "both"),
                        help="the workers' PROCESSING_GUARANTEE (both: each scenario twice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # retries during faults
    params = QUICK if args.quick else FULL
    if args.rate:
        params = Params(**{**params.__dict__, "rate": args.rate})
    wanted = {int(n) for n in args.only.split(",") if n.strip()} or {p.number for p in PLANS}
    guarantees = (("at_least_once", "exactly_once") if args.guarantee == "both"
                  else (args.guarantee,))
    tmp = Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
    home = broker_home(tmp)
    verdicts: list[Verdict] = []
    say(f"folder {tmp}; {'quick' if args.quick else 'full'} form, {params.rate:g} starts/s")
    try:
        for brokers, port in ((3, args.port), (1, args.port + 5)):
            plans = [p for p in PLANS if p.number in wanted and p.brokers == brokers]
            if not plans:
                continue
            broker = local_broker(port, brokers, home)
            say(f"starting {brokers} broker(s) at {broker.bootstrap}")
            began = time.monotonic()
            if not broker.start():
                raise RuntimeError(f"a broker already answers at {broker.bootstrap}: "
                                   "choose another --port")
            say(f"broker(s) ready in {time.monotonic() - began:.0f}s")
            try:
                for plan in plans:
                    for guarantee in guarantees:
                        these = Params(**{**params.__dict__, "guarantee": guarantee})
                        try:
                            verdicts.append(run_plan(plan, broker.bootstrap, tmp, these,
                                                     broker))
                        except Exception as error:  # the table still shows the others
                            say(f"{plan.name}: failed: {error!r}")
                            verdicts.append(Verdict(plan.name, guarantee,
                                                    notes=[f"error: {error!r}"]))
            finally:
                broker.stop()
    finally:
        if verdicts:
            print(table(verdicts))
            print()
            print(details(verdicts))
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            say(f"kept {tmp}")
    return 0 if verdicts and all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
