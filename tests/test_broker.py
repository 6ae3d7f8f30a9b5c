"""The local broker launcher (``python -m phoneverify.ops.broker``) and the local cluster.

These tests need no shared broker: each starts its own on free ports with its own broker home
in a temporary folder (the jars are the repository's cached ones, linked, not downloaded).
Every broker they start is stopped afterwards, also when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from phoneverify.ops.broker import __main__ as cli
from phoneverify.ops.broker.local import (
    DEFAULT_HOME,
    BrokerError,
    LocalBroker,
    from_env,
    metadata_brokers,
    new_cluster_id,
    runs_broker,
)

from support import ROOT, wait_until

SUBCOMMANDS = {"fetch", "status", "start", "stop", "run"}


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base(offsets: tuple[int, ...]) -> int:
    """A port P such that P + each offset is free (a broker's and its controller's ports)."""
    for _ in range(200):
        base = random.randint(20000, 28000)
        if all(_free(base + offset) for offset in offsets):
            return base
    raise RuntimeError("no free ports")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def jars() -> Path:
    """The repository's cached broker jars (fetched once, as ``make setup`` does)."""
    cached = LocalBroker(home=ROOT / DEFAULT_HOME)
    cached.fetch()
    return cached.libs


@dataclass
class Place:
    """A broker home in a temporary folder and a free bootstrap port for one broker."""

    home: Path
    port: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.home / f"broker-{self.port}.pid"

    @property
    def properties(self) -> Path:
        return self.home / f"server-{self.port}.properties"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "BROKERS"}
        return {**env, "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "LOCAL_KAFKA_HOME": str(self.home), **extra}

    def cli(self, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "phoneverify.ops.broker", *args],
                              env=self.env(), capture_output=True, text=True, timeout=timeout,
                              cwd=self.home)

    def recorded_pid(self) -> int:
        return int(self.pid_file.read_text().split()[0])


@pytest.fixture
def place(tmp_path: Path, jars: Path) -> Iterator[Place]:
    home = tmp_path / "kafka"
    home.mkdir()
    (home / "libs").symlink_to(jars, target_is_directory=True)
    place = Place(home, free_base((0, 1)))
    yield place
    with contextlib.suppress(BrokerError):  # whatever a failed test left running
        LocalBroker(place.bootstrap, home).stop_recorded(timeout=10)


# -- no broker needed ----------------------------------------------------------------------


def test_help_lists_exactly_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    listing = text.split("positional arguments:")[1].split("options:")[0]
    commands = [line.split()[0] for line in listing.splitlines() if line.startswith("    ")]
    assert sorted(commands) == sorted(SUBCOMMANDS)
    assert "{fetch,status,start,stop,run}" in text  # the synopsis names the same ones


def test_run_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--"])
    assert exit_.value.code == 2
    assert "run needs a command" in capsys.readouterr().err


def test_from_env_honours_brokers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    monkeypatch.setenv("LOCAL_KAFKA_HOME", str(tmp_path))
    monkeypatch.setenv("BROKERS", "3")

    cluster = from_env()

    assert cluster.brokers == 3
    assert cluster.bootstrap == "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094"
    assert [n.port for n in cluster.nodes] == [9092, 9093, 9094]
    controllers = [n.controller_port for n in cluster.nodes]
    assert controllers == [9192, 9193, 9194]
    assert len({n.data for n in cluster.nodes}) == len({n.logs for n in cluster.nodes}) == 3
    assert all(n.data.is_relative_to(tmp_path) for n in cluster.nodes)

    monkeypatch.delenv("BROKERS")
    single = from_env()
    assert (single.brokers, single.bootstrap) == (1, "127.0.0.1:9092")
    assert (single.nodes[0].controller_port, single.data) == (9093, tmp_path / "data-9092")

    monkeypatch.setenv("BROKERS", "three")
    with pytest.raises(BrokerError, match="BROKERS"):
        from_env()


def test_a_cluster_bootstrap_list_must_match_the_nodes(tmp_path: Path) -> None:
    listed = "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094"
    assert LocalBroker(listed, tmp_path, brokers=3).bootstrap == listed
    with pytest.raises(BrokerError, match="listens on"):
        LocalBroker("127.0.0.1:9092,127.0.0.1:9099", tmp_path, brokers=3)


def test_cluster_ids_never_look_like_an_option() -> None:
    ids = [new_cluster_id() for _ in range(2000)]  # about 30 would start with "-" unchecked
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


def test_cluster_properties(tmp_path: Path) -> None:
    cluster = LocalBroker("127.0.0.1:9092", tmp_path, brokers=3)
    node = cluster.nodes[1]
    cluster._write_properties(node)
    props = dict(line.split("=", 1) for line in node.properties.read_text().splitlines())

    assert props["node.id"] == "2"
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == \
        "1@127.0.0.1:9192,2@127.0.0.1:9193,3@127.0.0.1:9194"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9093,CONTROLLER://127.0.0.1:9193"
    assert props["log.dirs"] == str(node.data)
    for key in ("default.replication.factor", "offsets.topic.replication.factor",
                "transaction.state.log.replication.factor"):
        assert props[key] == "3", key
    assert props["min.insync.replicas"] == props["transaction.state.log.min.isr"] == "2"


def test_stop_refuses_when_nothing_we_started_runs(place: Place) -> None:
    result = place.cli("stop")
    assert result.returncode != 0
    assert "no broker this project started is running" in result.stderr


def test_stop_never_signals_a_process_that_is_not_the_recorded_broker(place: Place) -> None:
    """A stale pid file (the pid reused by another process) must not stop that process, even
    one that looks like a Kafka server started with another properties file."""
    others = [
        subprocess.Popen(["sleep", "600"]),
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "kafka.Kafka",
                          str(place.home / "elsewhere.properties")]),
    ]
    try:
        for other in others:
            place.pid_file.write_text(f"{other.pid}\n")
            result = place.cli("stop")
            assert result.returncode != 0
            assert "no broker this project started is running" in result.stderr
            assert other.poll() is None
            assert not place.pid_file.exists()  # the stale record is removed
    finally:
        for other in others:
            other.kill()
            other.wait()


# -- one broker ----------------------------------------------------------------------------


def _run_sleep(place: Place) -> subprocess.Popen[str]:
    """``python -m phoneverify.ops.broker run -- sleep 600`` in its own process group, as a
    terminal runs ``make run``."""
    return subprocess.Popen(
        [sys.executable, "-m", "phoneverify.ops.broker", "run", "--", "sleep", "600"],
        env=place.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, cwd=place.home)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_group(process: subprocess.Popen[str]) -> None:
    """Kill what is left of the launcher's process group (the command too, if it outlived the
    launcher: then the launcher failed to stop it, and the test says so)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize(("sig", "to_group"), [
    (signal.SIGHUP, True),  # the terminal closes
    (signal.SIGINT, True),  # Ctrl-C
    (signal.SIGTERM, False),  # a supervisor stops the launcher only: it forwards to the command
], ids=["SIGHUP-group", "SIGINT-group", "SIGTERM-launcher"])
def test_run_stops_its_broker_on_a_signal(place: Place, sig: int, to_group: bool) -> None:
    run = _run_sleep(place)
    try:
        assert run.stdout is not None
        first = run.stdout.readline()  # blocks until the broker is ready (or the launcher exits)
        assert first.startswith(f"broker: ready at {place.bootstrap}"), first
        pid = place.recorded_pid()
        assert runs_broker(pid, place.properties)

        if to_group:
            os.killpg(run.pid, sig)
        else:
            run.send_signal(sig)
        rest, _ = run.communicate(timeout=60)
        alive = _group_alive(run.pid)
    finally:
        _kill_group(run)

    # The command's status: killed by the signal itself (it is in the group too) or by the
    # SIGTERM the launcher forwards, whichever came first.
    assert run.returncode in {128 + sig, 128 + signal.SIGTERM}, rest
    assert not alive  # the command is gone too
    assert "broker: stopped" in rest
    assert not runs_broker(pid, place.properties)
    assert not port_open(place.port)
    assert not place.pid_file.exists()


#: Another worker on the same broker, as a consumer group member (it prints once it is one).
OTHER_WORKER = """
import asyncio, sys
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
async def main():
    admin = AIOKafkaAdminClient(bootstrap_servers=sys.argv[1])
    await admin.start()
    await admin.create_topics([NewTopic("other-worker-input", 1, 1)])
    await admin.close()
    consumer = AIOKafkaConsumer("other-worker-input", bootstrap_servers=sys.argv[1],
                                group_id="other-workers", client_id="other-worker")
    await consumer.start()
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=200)
    print("member", flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def test_run_leaves_its_broker_running_while_other_workers_use_it(place: Place) -> None:
    """A second ``make run`` (or any worker) uses the broker the first one started: the first
    one's exit must not take it away from them."""
    run = _run_sleep(place)
    other: subprocess.Popen[str] | None = None
    try:
        assert run.stdout is not None
        assert run.stdout.readline().startswith(f"broker: ready at {place.bootstrap}")
        pid = place.recorded_pid()
        other = subprocess.Popen([sys.executable, "-c", OTHER_WORKER, place.bootstrap],
                                 stdout=subprocess.PIPE, text=True)
        assert other.stdout is not None and other.stdout.readline() == "member\n"

        run.send_signal(signal.SIGTERM)  # the first worker stops
        rest, _ = run.communicate(timeout=60)

        assert run.returncode == 128 + signal.SIGTERM, rest
        assert (f"broker: left running at {place.bootstrap}: 1 other Kafka client in a "
                "consumer group use it") in rest
        assert runs_broker(pid, place.properties) and port_open(place.port)
        assert metadata_brokers(place.bootstrap) == 1  # it still serves the other one
    finally:
        if other is not None:
            other.kill()
            other.wait()
        _kill_group(run)
    stopped = place.cli("stop")  # as the message says
    assert stopped.returncode == 0, stopped.stderr
    assert not runs_broker(pid, place.properties)


def test_a_signal_while_the_broker_starts_leaves_no_broker(place: Place) -> None:
    run = _run_sleep(place)
    try:
        wait_until(place.pid_file.exists, 60, "the broker process to be launched", 0.01)
        pid = place.recorded_pid()
        os.killpg(run.pid, signal.SIGHUP)
        out, _ = run.communicate(timeout=60)
        assert not _group_alive(run.pid)
    finally:
        _kill_group(run)

    assert run.returncode == 128 + signal.SIGHUP, out
    assert "interrupted by SIGHUP" in out
    assert not runs_broker(pid, place.properties)
    assert not port_open(place.port)


def test_start_in_the_background_then_stop(place: Place) -> None:
    began = time.monotonic()
    started = place.cli("start")
    took = time.monotonic() - began
    assert started.returncode == 0, started.stderr
    assert f"started at {place.bootstrap}" in started.stdout
    pid = place.recorded_pid()
    assert runs_broker(pid, place.properties)
    assert place.cli("status").returncode == 0
    again = place.cli("start")
    assert again.returncode == 0
    assert "already running" in again.stdout

    stopped = place.cli("stop")

    assert stopped.returncode == 0, stopped.stderr
    assert str(pid) in stopped.stdout
    assert not runs_broker(pid, place.properties)
    assert not port_open(place.port)
    assert place.cli("status").returncode == 1
    refused = place.cli("stop")
    assert refused.returncode != 0
    assert "no broker this project started is running" in refused.stderr
    print(f"\nbroker start in the background: {took:.1f}s")


# -- a local cluster -----------------------------------------------------------------------


async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 3,
                                            topic_configs={"min.insync.replicas": "2"})])
    finally:
        await admin.close()


async def _partition(bootstrap: str, topic: str) -> dict:
    """Partition 0 of ``topic`` as the metadata describes it ({} until a broker knows it)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        return described["partitions"][0] if described["partitions"] else {}
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, values: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await asyncio.wait_for(producer.send_and_wait(topic, value.encode()), 60)
    finally:
        await producer.stop()


async def _read(bootstrap: str, topic: str, count: int) -> list[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        values: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(values) < count and loop.time() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=500)
            values += [m.value.decode() for m in batch.get(tp, [])]
        return values
    finally:
        await consumer.stop()


@pytest.mark.long  # about 1 min here: three JVMs started twice on two CPUs (make test-long)
def test_cluster_of_three_survives_a_killed_node(tmp_path: Path, jars: Path) -> None:
    """acks=all with min.insync.replicas=2 keeps working with one node of three killed (-9);
    the node rejoins on restart; the whole cluster stops and starts again on its data."""
    home = tmp_path / "kafka"
    home.mkdir()
    (home / "libs").symlink_to(jars, target_is_directory=True)
    base = free_base((0, 1, 2, 100, 101, 102))
    cluster = LocalBroker(f"127.0.0.1:{base}", home, brokers=3)
    timings: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        timings[name] = time.monotonic() - mark
        mark = time.monotonic()

    pids: list[int] = []
    try:
        assert cluster.start()
        lap("start")
        pids = [node.process.pid for node in cluster.nodes if node.process is not None]
        assert metadata_brokers(cluster.bootstrap) == 3
        asyncio.run(_create_topic(cluster.bootstrap, "faults"))
        wait_until(lambda: len(asyncio.run(_partition(cluster.bootstrap, "faults")).get("isr", ()))
                   == 3, 30, "all three replicas in sync", 0.2)
        asyncio.run(_produce(cluster.bootstrap, "faults", ["a1", "a2"]))
        lap("topic, first writes")

        leader = asyncio.run(_partition(cluster.bootstrap, "faults"))["leader"]
        victim = cluster.nodes[leader - 1]
        victim_pid = pids[victim.index]
        cluster.kill_node(victim.index)
        assert not runs_broker(victim_pid, victim.properties)
        assert not port_open(victim.port)
        asyncio.run(_produce(cluster.bootstrap, "faults", ["b1", "b2"]))
        lap("kill the leader, write with acks=all")

        cluster.restart_node(victim.index)
        assert metadata_brokers(victim.address) == 3
        asyncio.run(_produce(cluster.bootstrap, "faults", ["c1"]))
        lap("restart the node, write")

        cluster.stop()
        assert not any(port_open(node.port) for node in cluster.nodes)
        lap("stop all, keeping data")
        assert cluster.start()
        pids += [node.process.pid for node in cluster.nodes if node.process is not None]
        assert asyncio.run(_read(cluster.bootstrap, "faults", 5)) == ["a1", "a2", "b1", "b2",
                                                                     "c1"]
        lap("start all on the kept data, read")
    finally:
        cluster.stop()
    lap("stop all")

    for node in cluster.nodes:
        assert not node.pid_file.exists()
        assert not port_open(node.port)
        assert not port_open(node.controller_port)
    assert not [pid for pid in pids
                if any(runs_broker(pid, node.properties) for node in cluster.nodes)]
    print("\n" + ", ".join(f"{name}: {took:.1f}s" for name, took in timings.items()))


def test_closing_the_terminal_of_make_run_leaves_no_broker_and_no_worker(place: Place) -> None:
    """``make run`` itself (the broker launcher around a real worker), and SIGHUP to its
    process group, as a terminal sends when it closes."""
    web = free_base((0,))
    run = subprocess.Popen(
        ["make", "--no-print-directory", "-C", str(ROOT), "run"],
        env=place.env(DATA_DIR=str(place.home / "worker"), WEB_PORT=str(web),
                      TOPIC_PREFIX="sighup.", CODE_HASH_KEY="k", API_KEY="k"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert run.stdout is not None
        lines: list[str] = []
        for line in run.stdout:
            lines.append(line)
            if "Worker]: Ready" in line:
                break
        assert any("Worker]: Ready" in line for line in lines), "".join(lines[-30:])
        broker = place.recorded_pid()
        os.killpg(run.pid, signal.SIGHUP)
        rest, _ = run.communicate(timeout=90)
        alive = _group_alive(run.pid)
    finally:
        _kill_group(run)
    assert not alive, rest  # neither the worker nor anything else of make run is left
    assert not runs_broker(broker, place.properties)
    assert not port_open(place.port) and not port_open(web)
