"""``python -m phoneverify.ops.broker fetch|status|run -- CMD...``: the local broker.

``run`` starts the broker unless one answers, runs CMD in the foreground, forwards Ctrl-C and
SIGTERM to it, and stops the broker afterwards if it started it.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

from phoneverify.ops.broker.local import BrokerError, from_env, metadata_ready


def _run(cmd: list[str]) -> int:
    broker = from_env()
    began = time.monotonic()
    started = broker.start()
    where = f"logs in {broker.logs}" if started else "already running, not started here"
    print(f"broker: ready at {broker.bootstrap} in {time.monotonic() - began:.1f}s ({where})",
          flush=True)
    child = subprocess.Popen(cmd)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        return child.wait()
    finally:
        if child.poll() is None:
            child.kill()
        broker.stop()
        if started:
            print("broker: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phoneverify.ops.broker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("fetch", help="download the broker's jars (cached)")
    sub.add_parser("status", help="say whether a broker answers at KAFKA_BOOTSTRAP_SERVERS")
    run = sub.add_parser("run", help="broker around a foreground command")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    broker = from_env()
    try:
        if args.action == "fetch":
            broker.fetch()
            print(f"broker: jars in {broker.libs}")
            return 0
        if args.action == "status":
            up = metadata_ready(broker.bootstrap)
            print(f"broker at {broker.bootstrap}: {'ready' if up else 'not answering'}")
            return 0 if up else 1
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run needs a command after --")
        return _run(cmd)
    except BrokerError as error:
        print(f"broker: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
