"""Bounded state, measured: restart time and memory by kept aggregates, and a soak run.

    .venv/bin/python -m phoneverify.ops.broker run -- .venv/bin/python bench/retention.py restart
    .venv/bin/python -m phoneverify.ops.broker run -- .venv/bin/python bench/retention.py soak

``restart --sizes 10000,100000,300000,1000000``: for each size, the ``verifications`` changelog
is filled with that many concluded verifications (the very JSON the actor writes, made with
the domain model; written straight to the changelog, since driving a million verifications
through the service would take half an hour), then a worker is started on an empty store
(a new machine: the whole changelog is restored), stopped, and started again on its store (a
restart: only the changelog's tail is read). Each start is timed from the process start to the
first answer (``202``, or ``200`` once completed) for the newest verification's status; memory
is the worker's resident set then.

``soak --minutes 30 --rate 50 --retention 60``: a worker with VERIFICATION_RETENTION_SECONDS
at ``--retention`` runs verifications at ``--rate`` per second for ``--minutes``; every minute
its memory, the verifications it keeps and the pending ones are printed (from ``/metrics``).
Flat is the point: what is kept depends on the rate and the retention, not on the run's length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from aiokafka import AIOKafkaProducer

from phoneverify.models.codes import hash_code
from phoneverify.models.verification import Answer, Start, decide, fold, initial_state
from phoneverify.ops.broker.local import stop_process
from phoneverify.settings import Settings
from phoneverify.topics import ensure_topics

KEY = "bench-code-hash-key-not-secret"


def say(message: str) -> None:
    print(f"[retention {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Worker:
    """A worker process with its own data directory; stopped by pid."""

    def __init__(self, bootstrap: str, prefix: str, data: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.log = log
        self.env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "TOPIC_PREFIX": prefix,
                    "APP_ID": prefix.rstrip(".") + "-app", "DATA_DIR": str(data),
                    "WEB_PORT": str(self.port), "CODE_HASH_KEY": KEY, "API_KEY": "bench",
                    "PARTITIONS": "8", "RATE_LIMIT_STARTS": "1000000",
                    "GUESS_LIMIT": "1000000",
                    "PYTHONUNBUFFERED": "1", **env}  # its log is read while it runs
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the process; returns when it started (``time.monotonic``)."""
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "phoneverify.agents.worker"], env=self.env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return time.monotonic()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 60)

    def rss_mib(self) -> float:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, s.get(
                f"http://127.0.0.1:{self.port}{path}", headers={"X-API-Key": "bench"}) as r:
            return r.status, await r.text()

    async def until_status(self, iid: str, since: float, timeout: float = 900) -> float:
        """Seconds from ``since`` until the status of ``iid`` answers (200, 202 or 400)."""
        while time.monotonic() - since < timeout:
            assert self.process is not None and self.process.poll() is None, "worker exited"
            try:
                if (await self.get(f"/verifications/{iid}"))[0] in (200, 202, 400):
                    return time.monotonic() - since
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no status for {iid} in {timeout}s")


def concluded(i: int, now: datetime) -> bytes:
    """The table value the actor writes for a verification that was verified."""
    iid = f"kept-{i:08d}"
    code_hash = hash_code(KEY.encode(), iid, "1234")
    state = initial_state(iid)
    start = Start(instance_id=iid, phone_number=f"+1201555{i % 10_000:04d}", code_hash=code_hash,
                  command_id=f"{iid}/sms/1", at=now, timeout_seconds=90, max_attempts=4,
                  request_id=f"s-{iid}")
    state = fold(state, decide(start, state))
    answer = Answer(instance_id=iid, code_hash=code_hash, at=now + timedelta(seconds=5),
                    request_id=f"r-{iid}")
    state = fold(state, decide(answer, state))
    stored = {"due": (now + timedelta(days=1)).timestamp(), "life": f"x:{i}:0",
              "state": json.loads(state.model_dump_json()), "start": f"x:{i}:0",
              "duplicates": [], "seen": {"x:0": i}}
    return json.dumps(stored, separators=(",", ":")).encode()


async def fill(bootstrap: str, prefix: str, count: int) -> str:
    """The topics, and ``count`` kept verifications in the changelog; returns the newest id."""
    settings = Settings(kafka_bootstrap_servers=bootstrap, topic_prefix=prefix,
                        app_id=prefix.rstrip(".") + "-app", partitions=8)
    await ensure_topics(settings)
    changelog = f"{settings.app_id}-verifications-changelog"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50,
                                max_batch_size=1024 * 1024, compression_type=None)
    await producer.start()
    now = datetime.now(UTC)
    try:
        pending = []
        for i in range(count):
            pending.append(await producer.send(changelog, concluded(i, now),
                                               key=f"kept-{i:08d}".encode()))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return f"kept-{count - 1:08d}"


async def restart(bootstrap: str, sizes: list[int], faust_too: bool = False) -> None:
    rows, faust_rows = [], []
    for size in sizes:
        prefix = f"keep{uuid.uuid4().hex[:8]}."
        say(f"{size:,} kept verifications: filling the changelog")
        began = time.monotonic()
        newest = await fill(bootstrap, prefix, size)
        say(f"  filled in {time.monotonic() - began:.1f} s")
        with tempfile.TemporaryDirectory(prefix="phoneverify-keep-") as tmp:
            env = {"VERIFICATION_RETENTION_SECONDS": "86400"}
            worker = Worker(bootstrap, prefix, Path(tmp) / "data", Path(tmp) / "worker.log",
                            **env)
            try:
                cold = await worker.until_status(newest, worker.start())
                restore = restore_seconds(worker.log.read_text(errors="replace"))
                for line in worker.log.read_text(errors="replace").splitlines():
                    if "Done reading from changelog topics in batches" in line:
                        say("  " + line.split("] ")[-1])
                cold_rss = worker.rss_mib()
                await asyncio.sleep(3)  # past the first ticks: the due index is built
                settled_rss = worker.rss_mib()
                worker.stop()
                warm = await worker.until_status(newest, worker.start())
                await asyncio.sleep(3)  # past the first ticks: the due index is built again
                warm_rss = worker.rss_mib()
            except BaseException:
                say("failed; worker log tail:\n" + worker.log.read_text()[-3000:])
                raise
            finally:
                worker.stop()
            store = sum(f.stat().st_size for f in (Path(tmp) / "data").rglob("*") if f.is_file())
        rows.append((size, cold, restore, warm, cold_rss, settled_rss, warm_rss, store / 2**20))
        say(f"  empty store {cold:.1f} s (restore {restore:.1f} s, {size / restore:,.0f} "
            f"records/s), own store {warm:.1f} s, {settled_rss:.0f} MiB")
        if faust_too:  # the same changelog restored by Faust alone, a record at a time
            with tempfile.TemporaryDirectory(prefix="phoneverify-keep-") as tmp:
                worker = Worker(bootstrap, prefix, Path(tmp) / "data", Path(tmp) / "worker.log",
                                VERIFICATION_RETENTION_SECONDS="86400", RESTORE_BATCH="false")
                try:
                    cold_faust = await worker.until_status(newest, worker.start())
                    restore_faust = restore_seconds(worker.log.read_text(errors="replace"))
                finally:
                    worker.stop()
            faust_rows.append((size, cold, restore, cold_faust, restore_faust))
            say(f"  Faust's restore (RESTORE_BATCH=false): empty store {cold_faust:.1f} s "
                f"(restore {restore_faust:.1f} s, {size / restore_faust:,.0f} records/s)")
    print("kept verifications | start on an empty store | its restore (records/s) | restart on "
          "its store | RSS after restore / 3 s later / 3 s after the restart | store on disk")
    for size, cold, restore, warm, cold_rss, settled_rss, warm_rss, disk in rows:
        print(f"{size:>12,} | {cold:8.1f} s | {restore:6.1f} s ({size / restore:7,.0f} / s) | "
              f"{warm:6.1f} s | {cold_rss:6.0f} / {settled_rss:6.0f} / {warm_rss:6.0f} MiB | "
              f"{disk:7.0f} MiB")
    if faust_rows:
        print("kept verifications | batched restore: empty store, restore (records/s) | "
              "Faust's restore: empty store, restore (records/s) | ratio")
        for size, cold, restore, cold_faust, restore_faust in faust_rows:
            print(f"{size:>12,} | {cold:6.1f} s, {restore:6.1f} s ({size / restore:7,.0f} / s) | "
                  f"{cold_faust:6.1f} s, {restore_faust:6.1f} s ({size / restore_faust:7,.0f} / s)"
                  f" | {restore_faust / restore:4.1f}x")


def restore_seconds(log: str) -> float:
    """How long the worker's first restore took: from "Restoring state from changelog topics"
    to "Done reading from changelog topics" (Faust's lines, or those of the batched restore,
    ``ops/restore.py``, which begin the same)."""
    stamps = {}
    for line in log.splitlines():
        for mark in ("Restoring state from changelog topics", "Done reading from changelog"):
            if mark in line and mark not in stamps:
                stamps[mark] = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
    begun, done = (stamps.get(mark) for mark in ("Restoring state from changelog topics",
                                                  "Done reading from changelog"))
    return (done - begun).total_seconds() if begun and done else float("nan")


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


async def soak(bootstrap: str, minutes: float, rate: float, retention: float) -> None:
    from bench import Client, Deployment  # the load generator of bench.py

    prefix = f"soak{uuid.uuid4().hex[:8]}."
    with tempfile.TemporaryDirectory(prefix="phoneverify-soak-") as tmp:
        worker = Worker(bootstrap, prefix, Path(tmp) / "data", Path(tmp) / "worker.log",
                        VERIFICATION_RETENTION_SECONDS=str(retention),
                        VERIFICATION_TIMEOUT_SECONDS="90")
        worker.start()
        try:
            began = time.monotonic()
            while not await _ready(worker):
                if time.monotonic() - began > 300:
                    raise TimeoutError("the worker was not ready in 300 s")
                await asyncio.sleep(0.2)
            d = Deployment(bootstrap, 8, prefix=prefix)
            rows = []
            async with Client(d) as client:
                began = time.monotonic()
                minute = 0
                while time.monotonic() - began < minutes * 60:
                    await client.drive(int(rate * 60), rate=rate, timeout=300)
                    minute += 1
                    _, text = await worker.get("/metrics")
                    rocksdb = sum(float(value) for value in re.findall(
                        r'^phoneverify_rocksdb_memory_bytes\{kind="\w+"\} (\S+)$', text, re.M))
                    row = (minute, worker.rss_mib(), rocksdb / 2**20,
                           metric(text, "phoneverify_kept_verifications"),
                           metric(text, "phoneverify_pending_verifications"))
                    rows.append(row)
                    say(f"minute {row[0]}: RSS {row[1]:.0f} MiB (RocksDB {row[2]:.0f}), "
                        f"kept {row[3]:.0f}, pending {row[4]:.0f}")
        finally:
            worker.stop()
    print(f"soak: {rate:g} verifications/s for {minutes:g} min, retention {retention:g} s")
    print("minute | RSS MiB | of which RocksDB says it holds | kept verifications | pending")
    for minute, rss, rocksdb, kept, pending in rows:
        print(f"{minute:6d} | {rss:7.0f} | {rocksdb:30.1f} | {kept:18.0f} | {pending:7.0f}")


async def _ready(worker: Worker) -> bool:
    try:
        return (await worker.get("/readyz"))[0] == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap",
                        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    sub = parser.add_subparsers(dest="what", required=True)
    sizes = sub.add_parser("restart")
    sizes.add_argument("--sizes", default="10000,100000,300000,1000000")
    sizes.add_argument("--faust-too", action="store_true",
                       help="also restore each size with RESTORE_BATCH=false (before / after)")
    run = sub.add_parser("soak")
    run.add_argument("--minutes", type=float, default=30)
    run.add_argument("--rate", type=float, default=50)
    run.add_argument("--retention", type=float, default=60)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    if args.what == "restart":
        asyncio.run(restart(args.bootstrap, [int(n) for n in args.sizes.split(",")],
                            args.faust_too))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        asyncio.run(soak(args.bootstrap, args.minutes, args.rate, args.retention))
    return 0


if __name__ == "__main__":
    sys.exit(main())
