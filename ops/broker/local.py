"""Local Apache Kafka on loopback: one broker, or a small KRaft cluster (``BROKERS=3``).

The jars come from Maven Central through ``ops/broker/pom.xml`` and are cached in the broker
home (``LOCAL_KAFKA_HOME``, default ``.local/kafka`` in the working directory); each node is
started with ``java`` (storage format once, then the server), with broker and controller in
one process (KRaft combined mode). If a broker already answers at the bootstrap address, it
is used and nothing is started.

Ports, for the bootstrap port ``P`` (``KAFKA_BOOTSTRAP_SERVERS``, default 9092):

- one broker: the broker on ``P``, its controller on ``P+1``; files in the home
  (``data-P/``, ``logs/``, ``server-P.properties``, ``broker-P.pid``);
- ``BROKERS=n`` (n > 1): node ``i`` (0-based, node.id ``i+1``) has its broker on ``P+i`` and
  its controller on ``P+100+i``; all ``n`` controllers vote (``controller.quorum.voters``);
  topics default to replication ``min(n, 3)`` with ``min.insync.replicas`` one less (at least
  1); files under ``cluster-P-xn/node-i/`` (``data/``, ``logs/``, ``server.properties``,
  ``broker.pid``).

Each node's pid file records the process this project started; ``stop_recorded`` signals a
pid only while ``/proc/<pid>/cmdline`` is still ``kafka.Kafka`` with that node's properties
file, so a stale pid file never stops someone else's process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from aiokafka import AIOKafkaClient
from aiokafka.admin import AIOKafkaAdminClient

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
LOG4J = HERE / "log4j.properties"
DEFAULT_HOME = Path(".local") / "kafka"  # in the working directory, as the worker's DATA_DIR
CONTROLLER_OFFSET = 100  # a cluster node's controller port: bootstrap port + 100 + index
MAIN = "kafka.Kafka"


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0,
                 sig: int = signal.SIGTERM) -> None:
    """Signal one process we started (by its pid), wait for it, kill it if it will not stop."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class BrokerError(RuntimeError):
    """The local broker could not be fetched, started or stopped."""


@contextlib.contextmanager
def _quiet_aiokafka() -> Iterator[None]:
    """"Unable to connect" is the answer a probe looks for, not an error worth logging."""
    logger = logging.getLogger("aiokafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def metadata_brokers(bootstrap: str, timeout: float = 2.0) -> int:
    """How many live brokers the cluster metadata at ``bootstrap`` lists (0: no answer)."""

    async def probe() -> int:
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
        try:  # a metadata request to the first address that answers: that broker's view
            await asyncio.wait_for(client.bootstrap(), timeout)
            return len(client.cluster.brokers())
        except Exception:
            return 0
        finally:
            await client.close()

    with _quiet_aiokafka():
        return asyncio.run(probe())


def worker_client_id(pid: int) -> str:
    """The Kafka client id of the worker process ``pid`` on this host (see agents/app.py)."""
    return f"phoneverify-{socket.gethostname()}-{pid}"


def group_clients(bootstrap: str, timeout: float = 5.0) -> list[str]:
    """The client id of every member of every consumer group at ``bootstrap``: the workers
    (and other consumers in a group) using it now; [] when it does not answer."""

    async def probe() -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                    request_timeout_ms=int(timeout * 1000))
        try:
            await asyncio.wait_for(admin.start(), timeout)
            groups = [group[0] for group in await admin.list_consumer_groups()]
            described = await admin.describe_consumer_groups(groups) if groups else []
            return [member["client_id"] for response in described
                    for group in response.to_object()["groups"] for member in group["members"]]
        except Exception:
            return []
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    with _quiet_aiokafka():
        return asyncio.run(probe())


def metadata_ready(bootstrap: str, timeout: float = 2.0, brokers: int = 1) -> bool:
    """True when a client can fetch cluster metadata from ``bootstrap`` (not just connect)
    and it lists at least ``brokers`` live brokers."""
    return metadata_brokers(bootstrap, timeout) >= brokers


def _split(bootstrap: str) -> tuple[str, int]:
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    return host or "127.0.0.1", int(port)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _cmdline(pid: int) -> list[str]:
    """The arguments of process ``pid`` ([] when it is gone or a zombie)."""
    proc = Path("/proc")
    if proc.is_dir():
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            return []
        return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]
    result = subprocess.run(["ps", "-o", "command=", "-p", str(pid)],  # macOS: no /proc
                            capture_output=True, text=True, check=False)
    return result.stdout.split()


def runs_broker(pid: int, properties: Path) -> bool:
    """True while ``pid`` is a Kafka server started with exactly this properties file."""
    args = _cmdline(pid)
    return MAIN in args and str(properties) in args


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().split()
    except OSError:
        return None
    return int(text[0]) if text and text[0].isdigit() else None


@dataclass
class Node:
    """One Kafka server process: broker and controller in one JVM."""

    index: int
    host: str
    port: int
    controller_port: int
    data: Path
    logs: Path
    properties: Path
    pid_file: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def node_id(self) -> int:
        return self.index + 1

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def server_log(self) -> Path:
        return self.logs / "server.log"

    def recorded_pid(self) -> int | None:
        """The pid recorded at start, if that process still runs this node's server."""
        pid = _read_pid(self.pid_file)
        return pid if pid is not None and runs_broker(pid, self.properties) else None

    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.recorded_pid() is not None


@dataclass
class LocalBroker:
    """Fetches, formats, starts and stops a local broker or cluster; stops only what it
    started (``stop``) or what this project recorded starting (``stop_recorded``).

    With ``brokers > 1``, ``bootstrap`` becomes the list of all the nodes' addresses.
    """

    bootstrap: str = "127.0.0.1:9092"
    home: Path = DEFAULT_HOME
    start_timeout: float = 60.0
    brokers: int = 1
    nodes: list[Node] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.brokers < 1:
            raise BrokerError(f"BROKERS must be at least 1, not {self.brokers}")
        self.home = Path(self.home).absolute()
        host, base = _split(self.bootstrap)
        if self.brokers == 1:
            self.nodes = [Node(0, host, base, base + 1, self.home / f"data-{base}",
                               self.home / "logs", self.home / f"server-{base}.properties",
                               self.home / f"broker-{base}.pid")]
            return
        for i in range(self.brokers):
            folder = self.cluster_dir / f"node-{i}"
            self.nodes.append(Node(i, host, base + i, base + CONTROLLER_OFFSET + i,
                                   folder / "data", folder / "logs",
                                   folder / "server.properties", folder / "broker.pid"))
        servers = [node.address for node in self.nodes]
        given = [a.strip() for a in self.bootstrap.split(",") if a.strip()]
        if len(given) > 1 and given != servers:
            raise BrokerError(f"a local cluster of {self.brokers} listens on "
                              f"{','.join(servers)}, not {self.bootstrap}")
        self.bootstrap = ",".join(servers)

    # -- where things are ------------------------------------------------------------------

    @property
    def port(self) -> int:
        return _split(self.bootstrap)[1]

    @property
    def cluster_dir(self) -> Path:
        return self.home / f"cluster-{self.port}-x{self.brokers}"

    @property
    def libs(self) -> Path:
        return self.home / "libs"

    @property
    def logs(self) -> Path:
        """The logs folder: the broker's, or for a cluster the folder of the nodes' folders."""
        return self.nodes[0].logs if self.brokers == 1 else self.cluster_dir

    @property
    def data(self) -> Path:
        return self.nodes[0].data

    @property
    def server_log(self) -> Path:
        return self.nodes[0].server_log

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The first node's process, if this object started it."""
        return self.nodes[0].process

    # -- fetch, configure, format ------------------------------------------------------------

    def fetch(self) -> None:
        """Resolve the broker's jars from Maven Central once; later calls download nothing."""
        stamp = self.libs / ".pom-sha256"
        digest = hashlib.sha256(POM.read_bytes()).hexdigest()
        if stamp.exists() and stamp.read_text() == digest:
            return
        if shutil.which("mvn") is None or shutil.which("java") is None:
            raise BrokerError("the local broker needs Java 17+ and Maven on PATH (or use Docker)")
        shutil.rmtree(self.libs, ignore_errors=True)
        self.libs.mkdir(parents=True)
        cmd = ["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
               f"-DoutputDirectory={self.libs}", "-DincludeScope=runtime"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BrokerError(f"fetching Kafka with Maven failed:\n{result.stdout}{result.stderr}")
        stamp.write_text(digest)

    def _write_properties(self, node: Node) -> None:
        n = self.brokers
        replication = min(n, 3)
        voters = ",".join(f"{m.node_id}@{m.host}:{m.controller_port}" for m in self.nodes)
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://{node.host}:{node.port},"
                         f"CONTROLLER://{node.host}:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{node.host}:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(node.data),
            "num.partitions": "1",
            "offsets.topic.replication.factor": str(replication),
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": str(replication),
            "transaction.state.log.min.isr": str(max(replication - 1, 1)),
            "transaction.state.log.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "log.retention.hours": "168",
        }
        if n > 1:
            props |= {
                "default.replication.factor": str(replication),
                "min.insync.replicas": str(max(replication - 1, 1)),
                "unclean.leader.election.enable": "false",
                # A killed node is fenced (its partitions move) after 6 s, not the default 9 s.
                "broker.session.timeout.ms": "6000",
                "broker.heartbeat.interval.ms": "1000",
            }
        node.properties.parent.mkdir(parents=True, exist_ok=True)
        node.properties.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def _java(self, node: Node, main: str, *args: str) -> list[str]:
        heap = ["-Xms256m", "-Xmx1g"] if self.brokers == 1 else ["-Xms128m", "-Xmx512m"]
        return [
            "java", *heap, "-XX:+UseG1GC",
            "-Djava.awt.headless=true", f"-Dlog4j.configuration=file:{LOG4J}",
            f"-Dkafka.logs.dir={node.logs}", "-cp", f"{self.libs}/*", main, *args,
        ]

    def _existing_cluster_id(self) -> str | None:
        for node in self.nodes:
            meta = node.data / "meta.properties"
            if meta.exists():
                for line in meta.read_text().splitlines():
                    if line.startswith("cluster.id="):
                        return line.split("=", 1)[1].strip()
        return None

    def _format(self) -> None:
        """Format each node's storage once, all nodes of a cluster with one cluster id."""
        todo = [node for node in self.nodes if not (node.data / "meta.properties").exists()]
        if not todo:
            return
        cluster_id = self._existing_cluster_id() or new_cluster_id()
        runs = [(node, subprocess.Popen(
            self._java(node, "kafka.tools.StorageTool", "format", "-t", cluster_id,
                       "-c", str(node.properties), "--ignore-formatted"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            for node in todo]
        for node, run in runs:
            output, _ = run.communicate()
            if run.returncode != 0:
                raise BrokerError(f"formatting the storage of node {node.node_id} failed:\n"
                                  f"{output.decode(errors='replace')}")

    # -- start and stop ------------------------------------------------------------------------

    def start(self) -> bool:
        """Start the broker (all nodes) unless one answers already; returns True when this call
        started it, once the metadata lists every node. Data is kept from earlier runs."""
        if metadata_ready(self.bootstrap):
            return False
        self.fetch()
        for node in self.nodes:
            for port in (node.port, node.controller_port):
                if _port_open(node.host, port):
                    raise BrokerError(f"{node.host}:{port} is taken by something that is not a "
                                      f"broker answering at {self.bootstrap}")
            node.logs.mkdir(parents=True, exist_ok=True)
            self._write_properties(node)
        self._format()
        try:
            for node in self.nodes:
                self._launch(node)
            self._wait_ready(self.nodes)
        except BaseException:  # also Ctrl-C while waiting: leave nothing running
            self.stop()
            raise
        return True

    def _launch(self, node: Node) -> None:
        if node.running():
            raise BrokerError(f"node {node.node_id} ({node.address}) is running already")
        node.logs.mkdir(parents=True, exist_ok=True)
        out = open(node.logs / "stdout.log", "ab")  # noqa: SIM115 - owned by the child
        node.process = subprocess.Popen(
            self._java(node, MAIN, str(node.properties)), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        out.close()
        node.pid_file.write_text(f"{node.process.pid}\n")

    def _wait_ready(self, watched: list[Node]) -> None:
        """Wait until every running node's own metadata lists every running node as a live
        broker (registered and unfenced: the nodes' views converge a moment apart); fail if a
        watched node exits."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for node in watched:
                assert node.process is not None
                if node.process.poll() is not None:
                    raise BrokerError(f"node {node.node_id} exited with {node.process.returncode}"
                                      f"; see {node.server_log} and {node.logs / 'stdout.log'}")
            running = [node for node in self.nodes if node.running()]
            if all(metadata_brokers(node.address, timeout=1.0) >= len(running)
                   for node in running):
                return
            time.sleep(0.2)
        logs = ", ".join(str(node.server_log) for node in watched)
        raise BrokerError(f"the broker nodes did not all list each other as live within "
                          f"{self.start_timeout:.0f}s; see {logs}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the nodes this object started (by their pids): SIGTERM to all, wait, SIGKILL
        what is left after ``timeout``. A broker found running is left alone; data is kept."""
        started = [node for node in self.nodes if node.process is not None]
        for node in started:
            assert node.process is not None
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in started:
            assert node.process is not None
            try:
                node.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
            node.pid_file.unlink(missing_ok=True)
            node.process = None

    def node(self, index: int) -> Node:
        if not 0 <= index < len(self.nodes):
            raise BrokerError(f"no node {index}: the nodes are 0..{len(self.nodes) - 1}")
        return self.nodes[index]

    def kill_node(self, index: int) -> None:
        """SIGKILL one node (a crash: no controlled shutdown); data is kept."""
        self.stop_node(index, sig=signal.SIGKILL)

    def stop_node(self, index: int, timeout: float = 30.0, sig: int = signal.SIGTERM) -> None:
        """Stop one node (started by this object, or recorded as started by this project);
        its data is kept for ``restart_node``."""
        node = self.node(index)
        if node.process is not None:
            stop_process(node.process, timeout, sig)
            node.pid_file.unlink(missing_ok=True)
            node.process = None
            return
        pid = node.recorded_pid()
        if pid is None:
            raise BrokerError(f"node {node.node_id} ({node.address}) is not running "
                              f"(no live pid recorded in {node.pid_file})")
        _terminate([Recorded(pid, node.properties, node.pid_file)], timeout, sig)

    def restart_node(self, index: int) -> None:
        """Start one stopped node again on its data; returns when every running node's
        metadata lists it live (it has rejoined and been unfenced)."""
        node = self.node(index)
        self._launch(node)
        try:
            self._wait_ready([node])
        except BaseException:
            self.stop_node(index)
            raise

    def stop_recorded(self, timeout: float = 30.0) -> list[int]:
        """Stop every broker node this project recorded starting at this bootstrap port (one
        broker or a cluster of any size), even if another process started it: SIGTERM, wait,
        SIGKILL after ``timeout``. Returns the pids stopped; raises BrokerError if none runs.
        A pid is signalled only while it still runs ``kafka.Kafka`` with the recorded node's
        properties file; stale pid files are removed."""
        recorded = [(self.home / f"broker-{self.port}.pid",
                     self.home / f"server-{self.port}.properties")]
        for pid_file in sorted(self.home.glob(f"cluster-{self.port}-x*/node-*/broker.pid")):
            recorded.append((pid_file, pid_file.parent / "server.properties"))
        live: list[Recorded] = []
        for pid_file, properties in recorded:
            pid = _read_pid(pid_file)
            if pid is not None and runs_broker(pid, properties):
                live.append(Recorded(pid, properties, pid_file))
            else:
                pid_file.unlink(missing_ok=True)
        if not live:
            raise BrokerError(f"no broker this project started is running at port {self.port} "
                              f"(no live pid recorded in {self.home})")
        _terminate(live, timeout)
        return [entry.pid for entry in live]

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Recorded(NamedTuple):
    """A broker process found through its pid file (not necessarily our child)."""

    pid: int
    properties: Path
    pid_file: Path


def _wait_gone(live: list[Recorded], timeout: float) -> list[Recorded]:
    """Wait up to ``timeout`` for the recorded brokers to exit; returns those still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = [entry for entry in live if runs_broker(entry.pid, entry.properties)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _terminate(live: list[Recorded], timeout: float, sig: int = signal.SIGTERM) -> None:
    """Signal the recorded brokers, wait, SIGKILL those left after ``timeout``; remove the
    pid files."""
    for entry in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry.pid, sig)
    left = _wait_gone(live, timeout)
    for entry in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry.pid, signal.SIGKILL)
    if _wait_gone(left, 10.0):
        raise BrokerError(f"pids {[entry.pid for entry in left]} survived SIGKILL")
    for entry in live:
        entry.pid_file.unlink(missing_ok=True)


def new_cluster_id() -> str:
    """A random Kafka cluster id: 16 bytes, URL-safe base64 without padding (22 characters),
    never starting with "-" (the storage tool would take it for an option; Kafka's own
    ``Uuid.randomUuid`` avoids it the same way)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def from_env() -> LocalBroker:
    """The broker for ``KAFKA_BOOTSTRAP_SERVERS`` with data under ``LOCAL_KAFKA_HOME``;
    ``BROKERS=n`` for a local cluster of n nodes."""
    home = Path(os.environ.get("LOCAL_KAFKA_HOME", DEFAULT_HOME))
    raw = os.environ.get("BROKERS", "1").strip() or "1"
    if not raw.isdigit():
        raise BrokerError(f"BROKERS must be a whole number, not {raw!r}")
    return LocalBroker(os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"), home,
                       brokers=int(raw))

