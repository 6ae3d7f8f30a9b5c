"""``python -m phoneverify.ops.broker {fetch,status,start,stop,run}``: the local broker.

``run -- CMD...`` starts the broker unless one answers, runs CMD in the foreground with
KAFKA_BOOTSTRAP_SERVERS set to the broker's address, forwards Ctrl-C, SIGTERM and SIGHUP
(closing the terminal) to it as SIGTERM, and stops the broker afterwards if it started it,
unless other workers (members of a consumer group) still use it: then it is left running.
``start`` starts it in the background and returns; ``stop`` stops a broker this project
started at that address (by its recorded pid, checked to still be that broker).

Settings: KAFKA_BOOTSTRAP_SERVERS (default 127.0.0.1:9092), LOCAL_KAFKA_HOME (default
.local/kafka), BROKERS (default 1; 3 for a local KRaft cluster on ports P, P+1, P+2).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

from phoneverify.ops.broker.local import (
    BrokerError,
    from_env,
    group_clients,
    metadata_brokers,
    worker_client_id,
)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal arrived while nothing was running in the foreground yet (a
    BaseException, as KeyboardInterrupt: ``except Exception`` in a probe must not swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def _say(text: str, err: bool = False) -> None:
    """Print, but never fail: after SIGHUP the terminal may be gone (EIO) or the pipe closed."""
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def _others(bootstrap: str, child: subprocess.Popen[bytes] | None) -> list[str]:
    """The members of consumer groups at ``bootstrap`` other than the command's worker."""
    ours = worker_client_id(child.pid) if child is not None else None
    return [client for client in group_clients(bootstrap) if client != ours]


def _run(cmd: list[str]) -> int:
    broker = from_env()
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []  # stop signals that came before the command existed
    started = False

    def forward(signum: int, _frame: object) -> None:
        if child is None:
            pending.append(signum)
        elif child.poll() is None:
            child.send_signal(signal.SIGTERM)

    try:
        began = time.monotonic()
        started = broker.start()  # stops what it started if interrupted
        for sig in STOP_SIGNALS:  # from here on a signal never leaves the command unstopped
            signal.signal(sig, forward)
        where = f"logs in {broker.logs}" if started else "already running, not started here"
        _say(f"broker: ready at {broker.bootstrap} in {time.monotonic() - began:.1f}s ({where})")
        if pending:
            return 128 + pending[0]
        child = subprocess.Popen(cmd, env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS":
                                           broker.bootstrap})
        if pending:  # arrived while the command was being started
            child.send_signal(signal.SIGTERM)
        code = child.wait()
        return code if code >= 0 else 128 - code
    finally:
        for sig in STOP_SIGNALS:  # a second Ctrl-C must not cut the broker's shutdown short
            signal.signal(sig, forward)
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        others = _others(broker.bootstrap, child) if started else []
        if others:  # workers started elsewhere (another make run, say) rely on it
            _say(f"broker: left running at {broker.bootstrap}: {len(others)} other Kafka "
                 f"client{'s' * (len(others) != 1)} in a consumer group use it; stop it with "
                 "python -m phoneverify.ops.broker stop")
        else:
            broker.stop()
            if started:
                _say("broker: stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phoneverify.ops.broker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True, metavar="COMMAND")
    sub.add_parser("fetch", help="download the broker's jars (cached)")
    sub.add_parser("status", help="say whether a broker answers at KAFKA_BOOTSTRAP_SERVERS")
    sub.add_parser("start", help="start the broker in the background (unless one answers)")
    sub.add_parser("stop", help="stop the broker this project started at that address")
    run = sub.add_parser("run", help="broker around a foreground command: run -- CMD...")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd: list[str] = []
    if args.action == "run":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run needs a command after --")
    for sig in STOP_SIGNALS:  # until a command runs in the foreground: stop, clean up, exit
        signal.signal(sig, _interrupt)
    try:
        broker = from_env()
        if args.action == "fetch":
            broker.fetch()
            _say(f"broker: jars in {broker.libs}")
            return 0
        if args.action == "status":
            count = metadata_brokers(broker.bootstrap)
            if not count:
                state = "not answering"
            elif count < broker.brokers:
                state = f"answering, but with {count} of {broker.brokers} brokers live"
            else:
                state = f"ready ({count} broker{'s' * (count != 1)})"
            _say(f"broker at {broker.bootstrap}: {state}")
            return 0 if count >= broker.brokers else 1
        if args.action == "start":
            began = time.monotonic()
            if not broker.start():
                _say(f"broker: already running at {broker.bootstrap}, not started here")
                return 0
            _say(f"broker: started at {broker.bootstrap} in {time.monotonic() - began:.1f}s "
                 f"(logs in {broker.logs}); stop it with python -m phoneverify.ops.broker stop")
            return 0
        if args.action == "stop":
            pids = broker.stop_recorded()
            _say(f"broker: stopped {broker.bootstrap} (pid {', '.join(map(str, pids))})")
            return 0
        return _run(cmd)
    except BrokerError as error:
        _say(f"broker: {error}", err=True)
        return 2
    except (Interrupted, KeyboardInterrupt) as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        _say(f"broker: interrupted by {signal.Signals(signum).name}", err=True)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
