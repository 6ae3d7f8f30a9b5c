"""The fault suite's scenarios (``bench/chaos.py``) as tests, in a short form: real brokers and
worker processes, a steady load of verifications (each one wrong code, then the right one)
during the whole scenario, then the checks: nothing lost, no two different codes for one
verification, duplicates (outcomes, replies, SMS commands) only as identical copies, every
outcome verified with exactly 2 attempts, every request answered as expected, replay clean.

Scenarios 3 to 5 run on the session's broker; 1 starts its own 3-node cluster and 2 its own
single broker (it stops and starts it), on ports above the session broker's (``+10`` and
``+20``, or free ones), with the jars copied into a temporary home. The 3-node one (about two
minutes) and the zombie (its pause must outlive the session) are marked ``long``: ``make
test-long`` runs them, ``make test`` the others.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phoneverify.ops.broker.local import LocalBroker

from support import Client, Deployment, Worker, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _load_chaos():
    spec = importlib.util.spec_from_file_location("chaos", ROOT / "bench" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()

#: About 20-30 s of load per scenario (the zombie's pause is longer: it must pass the 15 s
#: session timeout).
PARAMS = chaos.Params(rate=30.0, warmup=5.0, steady=5.0, outage=8.0, pause=25.0,
                      recover_timeout=120.0, drain_timeout=180.0)
PLANS = {plan.number: plan for plan in chaos.PLANS}


def _free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _base(preferred: int, offsets: tuple[int, ...]) -> int:
    """``preferred`` if all its ports are free, else a random free base."""
    candidates = [preferred] + [random.randint(20000, 28000) for _ in range(200)]
    for base in candidates:
        if all(_free(base + offset) for offset in offsets):
            return base
    raise RuntimeError("no free ports")


def _session_port(kafka: str) -> int:
    return int(kafka.split(",")[0].rsplit(":", 1)[1])


@pytest.fixture
def own_broker(request: pytest.FixtureRequest, kafka: str,
               tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker of ``request.param`` nodes of its own (1 or 3), stopped after the test."""
    nodes: int = request.param
    offsets = (0, 1) if nodes == 1 else (0, 1, 2, 100, 101, 102)
    base = _base(_session_port(kafka) + (20 if nodes == 1 else 10), offsets)
    broker = chaos.local_broker(base, nodes, chaos.broker_home(tmp_path))
    assert broker.start()
    try:
        yield broker
    finally:
        broker.stop()


#: The modes (PROCESSING_GUARANTEE) each scenario runs in here. exactly_once is not among
#: them yet: its first run of worker-kill on this machine fell behind the load (see
#: docs/guarantees.md); ``bench/chaos.py --guarantee exactly_once`` runs it.
GUARANTEES = pytest.mark.parametrize("guarantee", ["at_least_once"])


def _run(number: int, bootstrap: str, tmp_path: Path, guarantee: str,
         broker: LocalBroker | None = None) -> chaos.Verdict:
    params = chaos.Params(**{**PARAMS.__dict__, "guarantee": guarantee})
    verdict = chaos.run_plan(PLANS[number], bootstrap, tmp_path, params, broker)
    print("\n" + chaos.table([verdict]) + "\n" + chaos.details([verdict]))
    return verdict


def _check(verdict: chaos.Verdict) -> None:
    assert verdict.started > 0
    assert verdict.lost == 0, verdict.problems()
    assert verdict.different_codes == 0, verdict.notes
    assert verdict.unexpected_codes == 0
    assert verdict.different_outcomes == 0, verdict.notes  # duplicates only as identical copies
    assert verdict.bad_outcomes == []  # all verified, attempts == 2 exactly
    assert verdict.missing_replies == 0
    assert verdict.different_replies == 0, verdict.notes
    assert verdict.bad_replies == []
    assert verdict.dead_letters == 0
    assert verdict.replay_ok, verdict.problems()
    if verdict.guarantee == "exactly_once":  # read_committed: each output once
        assert (verdict.duplicate_outcomes, verdict.duplicate_replies,
                verdict.duplicate_events) == (0, 0, 0)
    assert verdict.ok


@pytest.mark.long  # about 2 min here: three JVMs, a kill, a restart (make test-long); the
@pytest.mark.timeout(900)  # single broker stopped and started below is its short form
@pytest.mark.parametrize("own_broker", [3], indirect=True)
@GUARANTEES
def test_broker_leader_killed_and_restarted(own_broker: LocalBroker, tmp_path: Path,
                                            guarantee: str) -> None:
    verdict = _run(1, own_broker.bootstrap, tmp_path, guarantee, own_broker)
    _check(verdict)
    assert [label.split()[0] for label, _ in verdict.recovery] == ["SIGKILL", "restart"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("own_broker", [1], indirect=True)
@GUARANTEES
def test_single_broker_stopped_and_started(own_broker: LocalBroker, tmp_path: Path,
                                           guarantee: str) -> None:
    _check(_run(2, own_broker.bootstrap, tmp_path, guarantee, own_broker))


@pytest.mark.timeout(600)
@GUARANTEES
def test_worker_killed_its_partitions_move(kafka: str, tmp_path: Path, guarantee: str) -> None:
    _check(_run(3, kafka, tmp_path, guarantee))


@pytest.mark.long  # about 1 min: the paused worker must outlive its 15 s session
@pytest.mark.timeout(600)
@GUARANTEES
def test_zombie_worker_is_fenced_and_nothing_differs(kafka: str, tmp_path: Path,
                                                     guarantee: str) -> None:
    _check(_run(4, kafka, tmp_path, guarantee))


@pytest.mark.timeout(600)
@GUARANTEES
def test_workers_added_and_removed_under_load(kafka: str, tmp_path: Path,
                                              guarantee: str) -> None:
    _check(_run(5, kafka, tmp_path, guarantee))


async def test_a_worker_frozen_past_half_its_session_fences_itself(
        deployment, start_worker) -> None:
    """SIGSTOP for 9 s (past half the 15 s session), SIGCONT: the worker writes nothing more,
    says why and exits 75 (a supervisor starts it again); one started afresh takes over."""
    worker = start_worker("frozen")
    assert worker.process is not None
    worker.process.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(9)
    finally:
        worker.process.send_signal(signal.SIGCONT)
    wait_until(lambda: worker.process.poll() is not None, 15, "the frozen worker to exit")
    assert worker.process.returncode == 75
    assert "was stopped for" in worker.log() and "writes nothing more" in worker.log()
    start_worker("again")
    async with Client(deployment) as client:
        iid = await client.start()
        code = await client.sms_code(iid)
        await client.respond(iid, code)
        assert (await client.outcomes(iid))[0]["status"] == "verified"


def test_frozen_time_is_wall_time_no_cpu_time_accounts_for() -> None:
    from phoneverify.agents.fence import clock, frozen_for

    wall, cpu = clock() - 10, time.process_time()
    assert 9.9 < frozen_for(wall, cpu) < 10.5  # stopped: 10 s went by, no CPU time
    assert frozen_for(clock() - 10, time.process_time() - 10) < 0.5  # busy


@pytest.mark.timeout(300)
@pytest.mark.parametrize("own_broker", [1], indirect=True)
def test_a_worker_whose_broker_is_gone_still_stops(own_broker: LocalBroker,
                                                   tmp_path: Path) -> None:
    """SIGTERM after the only broker went away: the worker cannot flush, says so, and exits
    within its stop limit (Faust alone would wait forever)."""
    worker = Worker(Deployment(own_broker.bootstrap, tmp_path), "orphan").start()
    try:
        own_broker.stop()
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        wait_until(lambda: worker.process.poll() is not None, 45, "the worker to exit")
        assert worker.process.returncode == 1
        assert "Kafka did not take the last records within 15 s" in worker.log()
    finally:
        worker.kill()
