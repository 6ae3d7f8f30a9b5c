"""The worker process at its edges: a web port already taken, a closed terminal (SIGHUP), a stop
signal at any point of its start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from support import ROOT, Deployment, Worker, wait_until


def test_a_taken_web_port_is_one_line_saying_what_to_set(deployment: Deployment) -> None:
    with socket.socket() as other:  # say, the first worker of a second `make run`
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        worker = Worker(deployment, "second")
        worker.env["WEB_PORT"] = str(port)
        worker.launch()
        assert worker.process is not None
        try:
            code = worker.process.wait(60)
        finally:
            worker.stop(timeout=10)  # only if it is still running: never left behind
    assert code == 2
    assert worker.log().splitlines() == [
        f"[ERROR] port {port} (WEB_PORT) on 127.0.0.1 is taken, by another worker or program: "
        "set WEB_PORT to a free port (a second worker here needs its own DATA_DIR too)"]


def test_a_closed_terminal_stops_the_worker_as_ctrl_c(deployment: Deployment) -> None:
    worker = Worker(deployment).start()
    assert worker.process is not None
    worker.process.send_signal(signal.SIGHUP)
    try:
        code = worker.process.wait(60)
    finally:
        worker.stop(timeout=10)  # only if it is still running: never left behind
    log = worker.log()
    assert "Stopping..." in log and "Gathering all futures" in log, log[-2000:]
    assert "[ERROR]" not in log and "Traceback" not in log
    assert code == 0


#: The worker, sending itself a stop signal at one point of its start: no timing involved.
SIGNALLED_AT = """
import asyncio, os, signal, sys
import faust.worker
from phoneverify import topics
from phoneverify.agents.worker import run_worker

point, sig = sys.argv[1], signal.Signals[sys.argv[2]]
owner, name = {"topics": (topics, "ensure_topics"),  # our start, inside an asyncio.run
               "handover": (faust.App, "main"),  # handed over, Faust not started
               "faust-start": (faust.worker.Worker, "on_execute"),  # just before its handlers
               }[point]
function = getattr(owner, name)
if asyncio.iscoroutinefunction(function):
    async def signalled(*args, **kwargs):
        os.kill(os.getpid(), sig)
        return await function(*args, **kwargs)
else:
    def signalled(*args, **kwargs):
        os.kill(os.getpid(), sig)
        return function(*args, **kwargs)
setattr(owner, name, signalled)
run_worker([])
"""


@pytest.mark.parametrize(("point", "sig"), [
    ("topics", signal.SIGHUP), ("topics", signal.SIGTERM),
    ("handover", signal.SIGHUP), ("handover", signal.SIGTERM), ("faust-start", signal.SIGINT),
], ids=lambda value: getattr(value, "name", value))
def test_a_stop_signal_while_starting_is_a_quiet_stop(deployment: Deployment, point: str,
                                                      sig: signal.Signals) -> None:
    """Wherever a stop signal lands in the start, the worker stops, in order, with exit 0 and
    no error: before Faust runs with one line; after handing over, once Faust's handlers are in
    (a SIGHUP there left the worker running)."""
    worker = Worker(deployment)
    with open(worker.log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", SIGNALLED_AT, point, sig.name],
                                   cwd=ROOT, env=worker.env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    try:
        code = process.wait(60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    log = worker.log()
    assert "Traceback" not in log and "[ERROR]" not in log and "Aborted" not in log, log[-3000:]
    if point == "topics":
        assert log.splitlines()[-1] == (f"[INFO] stopped by {sig.name} while starting (nothing "
                                        "was consuming yet)"), log[-3000:]
    else:
        assert f"Signal received: {sig.value} " in log, log[-3000:]
        assert "Gathering all futures" in log, log[-3000:]
    assert code == 0


def test_make_run_stops_cleanly_when_its_terminal_closes(deployment: Deployment) -> None:
    """`make run`'s command (broker runner around the worker): the whole process group gets
    SIGHUP, as from a closed terminal; the worker stops as on Ctrl-C and the exit code is 0
    (make said `Error 129`)."""
    worker = Worker(deployment, "make-run")
    with open(worker.log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "phoneverify.ops.broker", "run", "--", sys.executable, "-m",
             "phoneverify.agents.worker"], cwd=ROOT, env=worker.env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: "Worker]: Ready" in worker.log() or process.poll() is not None, 90,
                   "the worker to be ready")
        os.killpg(process.pid, signal.SIGHUP)
        code = process.wait(60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    log = worker.log()
    assert "Gathering all futures" in log and "Traceback" not in log, log[-2000:]
    assert code == 0


def test_a_paused_worker_says_so_in_a_warning_not_an_error(start_worker) -> None:
    """Ctrl-Z and `fg` (or a machine too busy to run it) for over 3 s: mode's keepalive check
    logged `[ERROR] Thread keepalive is not responding...`; it is a WARNING saying what
    happened."""
    import time

    from phoneverify.ops.logs import STARVED_NOTE

    worker = start_worker()
    assert worker.process is not None
    worker.process.send_signal(signal.SIGSTOP)
    try:
        time.sleep(4.0)  # the pause itself (the check needs a gap of over 3 s)
    finally:
        worker.process.send_signal(signal.SIGCONT)
    wait_until(lambda: STARVED_NOTE in worker.log(), 30, "the worker to notice its pause")
    worker.stop()
    log = worker.log()
    assert f"[WARNING] {STARVED_NOTE}" in log
    assert "[ERROR]" not in log and "keepalive is not responding" not in log, log[-3000:]
