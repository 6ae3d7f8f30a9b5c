"""py-spy attached to the bench's worker: a flame graph (SVG) and where the CPU went, by layer.

Two ``py-spy record`` processes sample the worker (by pid, 100 Hz, idle threads left out, so
every sample is CPU): one writes the SVG, one the collapsed stacks that :func:`summary` sorts
by where each sample's innermost frame lives (aiokafka, Faust, asyncio, ours...) and by a few
frames of interest anywhere on the stack.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

#: Innermost frame's file -> layer (first match wins; the path's text is searched).
LAYERS = [
    ("aiokafka/record", "aiokafka: record batches (encode/decode)"),
    ("aiokafka/protocol", "aiokafka: protocol structs (fetch responses, requests)"),
    ("aiokafka/consumer", "aiokafka: consumer / fetcher"),
    ("aiokafka/producer", "aiokafka: producer / sender"),
    ("aiokafka/", "aiokafka: client, connections"),
    ("faust/", "Faust: streams, consumer, conductor, tables"),
    ("mode/", "mode: services, timers, utils"),
    ("asyncio/", "asyncio: event loop, tasks, futures"),
    ("selectors.py", "asyncio: event loop, tasks, futures"),
    ("rocksdict", "RocksDB (rocksdict)"),
    ("pydantic", "pydantic (models, JSON)"),
    ("json/", "json (stdlib)"),
    ("phoneverify/", "phoneverify: agents, models"),
    ("/agents/", "phoneverify: agents, models"),
    ("/models/", "phoneverify: agents, models"),
    ("/ops/", "phoneverify: agents, models"),
    ("prometheus_client", "prometheus_client"),
    ("logging/", "logging"),
]
#: Frames of interest wherever they are on a stack: label -> text in the frame.
INCLUSIVE = [
    ("aiokafka Fetcher (fetch requests and responses)", "aiokafka/consumer/fetcher.py"),
    ("aiokafka producer (batches, send)", "aiokafka/producer/"),
    ("Faust consumer fetch loop (_drain_messages, getmany)", "_drain_messages"),
    ("our agents' batches (actor, admission, intake, sender)", "/agents/"),
    ("Faust commit (offsets)", "commit"),
    ("the ticker", "ticker"),
]


@dataclass
class Profile:
    """The py-spy processes sampling a worker, and where they write."""

    pid: int
    svg: Path
    raw: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, rate: int = 100) -> None:
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
        for fmt, out in (("flamegraph", self.svg), ("raw", self.raw)):
            out.parent.mkdir(parents=True, exist_ok=True)
            self.processes.append(subprocess.Popen(
                [spy, "record", "--pid", str(self.pid), "--rate", str(rate), "--format", fmt,
                 "--output", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL))

    def stop(self, timeout: float = 60.0) -> None:
        """SIGINT (py-spy then writes its output), then wait."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def waiting(leaf: str) -> bool:
    """A sample taken while an event loop waits in epoll: asyncio's selector, or uvloop's loop
    (C code: its innermost Python frame is what started the loop)."""
    return leaf.startswith(("EpollSelector.select", "ServiceThread._start_thread",
                            "Worker.execute_from_commandline", "BaseEventLoop.run_forever"))


def summary(raw: Path, top: int = 12) -> list[tuple[str, float]]:
    """Share of the working samples by layer (innermost frame), then the frames of interest.

    Samples in an event loop's wait are counted apart: py-spy takes a thread that is
    runnable for active, and on a loaded machine a thread just woken from epoll waits there
    for a core; those samples are not the worker's CPU."""
    layers: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = waits = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        leaf = frames[-1]
        if waiting(leaf):
            waits += n
            continue
        total += n
        layers[next((name for key, name in LAYERS if key in leaf), "other")] += n
        for label, key in INCLUSIVE:
            if any(key in frame for frame in frames):
                inclusive[label] += n
    if not total:
        return []
    rows = [(name, n / total) for name, n in layers.most_common(top)]
    rows.append(("-- anywhere on the stack (inclusive) --", float("nan")))
    rows += [(label, inclusive[label] / total) for label, _ in INCLUSIVE]
    rows.append((f"samples (100 Hz): {total} working, {waits} in an event loop's wait "
                 "(left out)", float("nan")))
    return rows
