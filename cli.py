"""``phoneverify``: the command line (``phoneverify --help``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phoneverify", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="run a worker (settings from the environment)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "worker":
        from worker import run_worker

        run_worker(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
