"""The worker process at its edges: a web port already taken, a closed terminal (SIGHUP)."""

from __future__ import annotations

import signal
import socket

import pytest

from support import Deployment, Worker, wait_until


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


@pytest.mark.xfail(strict=False, reason="open defect (issue 23): a SIGHUP landing after the "
                   "worker hands over to Faust and before Faust installs its signal handlers "
                   "left the worker running (timed out after 120 s in the full suite, 2026-12-04)")
def test_hangup_while_starting_is_a_quiet_stop(deployment: Deployment) -> None:
    worker = Worker(deployment).launch()
    assert worker.process is not None
    try:
        # Topics created: the key check and loading the app follow, before Faust runs.
        wait_until(lambda: "created topics" in worker.log() or worker.process.poll() is not None,
                   60, "the worker to begin")
        worker.process.send_signal(signal.SIGHUP)
        code = worker.process.wait(120)
    finally:
        worker.stop(timeout=10)  # only if it is still running: never left behind
    log = worker.log()
    assert "Traceback" not in log and "[ERROR]" not in log, log
    assert code in (0, 130)


def test_make_run_stops_cleanly_when_its_terminal_closes(deployment: Deployment) -> None:
    """`make run`'s command (broker runner around the worker): the whole process group gets
    SIGHUP, as from a closed terminal; the worker stops as on Ctrl-C and the exit code is 0
    (make said `Error 129`)."""
    import os
    import subprocess
    import sys

    from support import ROOT

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
