"""Before and after in one run: two workers on the same broker, each phase taken by one, then
the other, so a change in the machine's load (it is shared) hits both alike.

    .venv/bin/python bench/bench.py --before main            # this checkout against main
    .venv/bin/python bench/bench.py --before HEAD --before-env EVENT_LOOP=asyncio

``--before REF`` runs the *before* worker from ``git archive REF`` (same virtualenv, so the
same libraries); ``--before-env`` adds settings to it. Both workers run all the time; idle CPU
is measured over the same seconds for both.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import bench
from bench import ROOT, Client, Deployment, Latency, Throughput, Worker, cpu_seconds, say


@dataclass
class Side:
    label: str
    worker: Worker
    idle: float = 0.0
    latencies: list[Latency] = field(default_factory=list)
    burst: Throughput | None = None


def checkout(ref: str, into: Path) -> Path:
    """``git archive ref`` as a directory holding the package ``phoneverify`` (for PYTHONPATH)."""
    target = into / "phoneverify"
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "x", "-C", str(target)], input=archive, check=True)
    return into


def environment(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


async def idle_both(sides: list[Side], seconds: float) -> None:
    """Every worker's CPU share over the same ``seconds`` of nothing to do."""
    before = [cpu_seconds(side.worker.pid) for side in sides]
    await asyncio.sleep(seconds)
    for side, cpu in zip(sides, before, strict=True):
        side.idle = (cpu_seconds(side.worker.pid) - cpu) / seconds


async def phases(args: argparse.Namespace, sides: list[Side],
                 deployments: list[Deployment]) -> None:
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client(d)) for d in deployments]
        for side, client in zip(sides, clients, strict=True):
            say(f"{side.label}: warm-up, {args.warmup} verifications")
            await client.drive(args.warmup, rate=None, timeout=120)
        say(f"idle, both, {args.idle_seconds:g} s")
        await idle_both(sides, args.idle_seconds)
        for rate in args.rate:
            count = max(10, round(rate * args.latency_seconds))
            for side, client in zip(sides, clients, strict=True):
                say(f"{side.label}: {count} verifications at {rate:g}/s")
                lat = await bench.latency(client, side.worker, count, rate)
                side.latencies.append(lat)
                say(f"   {lat.worker_cpu / lat.count * 1000:.2f} ms CPU per verification, "
                    f"p99 response -> outcome {bench.percentile(lat.response_ms, 99):.0f} ms, "
                    f"{lat.achieved:.0f}/s")
        if args.n:
            for side, client in zip(sides, clients, strict=True):
                say(f"{side.label}: a burst of {args.n}")
                side.burst = await bench.throughput(client, side.worker, args.n, 0.0)
                say(f"   {side.burst.per_second:,.0f}/s")


def run(args: argparse.Namespace) -> str:
    """Start both workers, take the phases, stop them, delete their topics; the table."""
    loads = [bench.load_average()]
    deployments = [Deployment(args.bootstrap, args.partitions) for _ in range(2)]
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="phoneverify-cmp-")))
        code = checkout(args.before, tmp / "code")
        sides = []
        for label, d, extra in (("before", deployments[0],
                                 {"PYTHONPATH": str(code), **environment(args.before_env)}),
                                ("after", deployments[1], {})):
            (tmp / label).mkdir()
            worker = Worker(d, tmp / label)
            worker.env.update(extra)
            sides.append(Side(label, worker))
        try:
            for side in sides:
                say(f"starting the {side.label} worker")
                side.worker.start()
            asyncio.run(phases(args, sides, deployments))
        except BaseException:
            for side in sides:
                say(f"failed; {side.label} worker log tail:\n" + side.worker.log()[-2000:])
            raise
        finally:
            for side in sides:
                side.worker.stop()
            for d in deployments:
                bench.cleanup(d)
    loads.append(bench.load_average())
    return table(args, sides, loads)


def table(args: argparse.Namespace, sides: list[Side], loads: list[str]) -> str:
    before, after = sides
    title = f"before: {args.before}" + (f" with {' '.join(args.before_env)}"
                                        if args.before_env else "") + "; after: this checkout"
    lines = [bench.RULE, "phoneverify benchmark, before / after in one run (" + title + ")",
             bench.row("load average before / after", " / ".join(loads)),
             bench.row("figure", f"{'before':>16} {'after':>16}"), bench.LINE]

    def add(label: str, values: list[str]) -> None:
        lines.append(bench.row(label, "".join(f"{v:>17}" for v in values)))

    add("worker CPU idle, share of one core", [f"{s.idle:.1%}" for s in sides])
    pct = bench.percentile
    for i, rate in enumerate(args.rate):
        lats = [s.latencies[i] for s in sides]
        add(f"{rate:g}/s: worker CPU per verification",
            [f"{lat.worker_cpu / lat.count * 1000:.2f} ms" for lat in lats])
        add(f"{rate:g}/s: worker CPU, share of one core",
            [f"{lat.worker_cpu * lat.achieved / lat.count:.1%}" for lat in lats])
        add(f"{rate:g}/s: response -> outcome, p50 / p99 ms",
            [f"{pct(lat.response_ms, 50):.0f} / {pct(lat.response_ms, 99):.0f}" for lat in lats])
        add(f"{rate:g}/s: start -> its reply, p50 / p99 ms",
            [f"{pct(lat.start_reply_ms, 50):.0f} / {pct(lat.start_reply_ms, 99):.0f}"
             for lat in lats])
        add(f"{rate:g}/s: completed / s", [f"{lat.achieved:.0f}" for lat in lats])
    if before.burst and after.burst:
        bursts = [before.burst, after.burst]
        add(f"burst of {args.n}: completed / s", [f"{b.per_second:,.0f}" for b in bursts])
        add(f"burst of {args.n}: worker CPU per verification",
            [f"{b.worker_cpu / b.count * 1000:.2f} ms" for b in bursts])
    lines.append(bench.RULE)
    return "\n".join(lines)
