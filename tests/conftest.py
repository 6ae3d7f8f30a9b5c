"""Fixtures: one real Kafka broker per test session, isolated deployments, worker processes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from phoneverify.ops.broker.local import from_env

from support import Deployment, Worker, stop_all


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """The bootstrap address of a ready broker: the one at KAFKA_BOOTSTRAP_SERVERS, or ours."""
    broker = from_env()
    began = time.monotonic()
    started = broker.start()
    if started:
        print(f"\nbroker started in {time.monotonic() - began:.1f}s")
    yield broker.bootstrap
    broker.stop()


@pytest.fixture
def deployment(kafka: str, tmp_path: Path) -> Deployment:
    """Fresh topics (a unique prefix) and app id on the shared broker; settings per test."""
    return Deployment(kafka, tmp_path)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Keep each phase's report on the test item, so fixtures can see whether it failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def start_worker(request: pytest.FixtureRequest,
                 deployment: Deployment) -> Iterator[Callable[..., Worker]]:
    """``start_worker(name="w1", **env)`` starts a worker; all are stopped after the test,
    and if the test failed, the end of each worker's log is printed."""
    workers: list[Worker] = []

    def start(name: str = "w1", **extra: str) -> Worker:
        worker = Worker(deployment, name, **extra)
        workers.append(worker)
        return worker.start()

    yield start
    stop_all(workers)
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for worker in workers:
            tail = "\n".join(worker.log().splitlines()[-40:])
            print(f"\n----- end of worker {worker.name}'s log ({worker.log_path}) -----\n{tail}")
