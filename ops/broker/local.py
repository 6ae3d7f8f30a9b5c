"""A single-node Apache Kafka broker (KRaft, combined broker and controller) on loopback.

The jars come from Maven Central through ``broker/pom.xml`` and are cached in the data folder;
the broker is started with ``java`` (storage format, then the server). If a broker already
answers at the bootstrap address, it is used and nothing is started.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaClient

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
LOG4J = HERE / "log4j.properties"
DEFAULT_HOME = Path(".local") / "kafka"  # in the working directory, as the worker's DATA_DIR


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
    """The local broker could not be fetched or started."""


def metadata_ready(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when a client can fetch cluster metadata from ``bootstrap`` (not just connect)."""

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # "unable to connect" is the answer

    async def probe() -> bool:
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
        try:
            await asyncio.wait_for(client.bootstrap(), timeout)
            metadata = await asyncio.wait_for(client.fetch_all_metadata(), timeout)
            return bool(metadata.brokers())
        except Exception:
            return False
        finally:
            await client.close()

    return asyncio.run(probe())


def _split(bootstrap: str) -> tuple[str, int]:
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    return host or "127.0.0.1", int(port)


@dataclass
class LocalBroker:
    """Fetches, formats, starts and stops one local broker; stops only what it started."""

    bootstrap: str = "127.0.0.1:9092"
    home: Path = DEFAULT_HOME
    start_timeout: float = 60.0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def libs(self) -> Path:
        return self.home / "libs"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def data(self) -> Path:
        return self.home / f"data-{_split(self.bootstrap)[1]}"

    @property
    def server_log(self) -> Path:
        return self.logs / "server.log"

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

    def _properties(self) -> Path:
        host, port = _split(self.bootstrap)
        controller = port + 1
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{host}:{controller}",
            "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller}",
            "advertised.listeners": f"PLAINTEXT://{host}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "log.retention.hours": "168",
        }
        path = self.home / f"server-{port}.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            "java", "-Xms256m", "-Xmx1g", "-XX:+UseG1GC",
            "-Djava.awt.headless=true", f"-Dlog4j.configuration=file:{LOG4J}",
            f"-Dkafka.logs.dir={self.logs}", "-cp", f"{self.libs}/*", main, *args,
        ]

    def _format(self, props: Path) -> None:
        if (self.data / "meta.properties").exists():
            return
        cluster_id = str(uuid.uuid4())
        cmd = self._java("kafka.tools.StorageTool", "format", "-t", _cluster_id(cluster_id),
                         "-c", str(props), "--ignore-formatted")
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BrokerError(f"formatting broker storage failed:\n{result.stdout}{result.stderr}")

    def start(self) -> bool:
        """Start a broker unless one answers already; returns True when this call started one."""
        if metadata_ready(self.bootstrap):
            return False
        self.fetch()
        self.logs.mkdir(parents=True, exist_ok=True)
        props = self._properties()
        self._format(props)
        out = open(self.logs / "stdout.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            self._java("kafka.Kafka", str(props)), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        out.close()
        (self.home / f"broker-{_split(self.bootstrap)[1]}.pid").write_text(str(self.process.pid))
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"the broker exited with {self.process.returncode}; "
                                  f"see {self.server_log} and {self.logs / 'stdout.log'}")
            if metadata_ready(self.bootstrap, timeout=1.0):
                return True
            time.sleep(0.2)
        self.stop()
        raise BrokerError(f"the broker did not answer metadata requests within "
                          f"{self.start_timeout:.0f}s; see {self.server_log}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker this object started (by its pid); a broker found running is left."""
        if self.process is None:
            return
        stop_process(self.process, timeout)
        (self.home / f"broker-{_split(self.bootstrap)[1]}.pid").unlink(missing_ok=True)
        self.process = None

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_id(seed: str) -> str:
    """A Kafka cluster id: 16 bytes, URL-safe base64 without padding (22 characters)."""
    return base64.urlsafe_b64encode(uuid.UUID(seed).bytes).decode().rstrip("=")


def from_env() -> LocalBroker:
    """The broker for ``KAFKA_BOOTSTRAP_SERVERS`` with data under ``LOCAL_KAFKA_HOME``."""
    home = Path(os.environ.get("LOCAL_KAFKA_HOME", DEFAULT_HOME))
    return LocalBroker(os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"), home)
