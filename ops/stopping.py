"""Stop signals (Ctrl-C, SIGTERM, a closed terminal's SIGHUP) stop a worker wherever they land.

A worker's start has three stretches, and a stop signal is handled in each:

1. Our own start (settings, topics, the key check, loading the app): :func:`while_starting`
   makes each signal raise :class:`StoppedWhileStarting` (a ``KeyboardInterrupt``, so asyncio
   and ``except Exception`` let it through); ``run_worker`` says so and exits 0. Nothing
   consumes yet, so there is nothing to stop in order.
2. From handing over to Faust (:func:`handing_over`, just before ``app.main()``) until Faust's
   worker installs its own handlers: a signal only records that a stop was asked for. Raising
   there would land anywhere in Faust's start (click answered ``Aborted!`` with exit 1, and a
   stop could be lost so the worker kept running).
3. Faust's worker (the app's worker class, ``phoneverify.agents.app.Worker``) installs mode's
   handlers (SIGINT, SIGTERM), then calls :func:`faust_handlers_in`: SIGHUP joins them, and
   only then is the record read: a stop asked for before is carried out as one asked for now,
   by mode's stopping sequence.

No signal falls between two stretches: CPython runs the pending Python handler before
``signal.signal`` (which ``add_signal_handler`` calls) replaces it, and the record is read after
every handler of stretch 3 is in.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no Faust here: this module is imported first thing, to catch signals early
    from mode import Worker

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: The stop signal received between handing over to Faust and Faust's handlers, if any.
_asked: list[signal.Signals] = []


class StoppedWhileStarting(KeyboardInterrupt):
    """A stop signal arrived before Faust ran: nothing was consuming yet."""

    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum)
        super().__init__(self.signal.name)


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise StoppedWhileStarting(signum)


def _record(signum: int, _frame: FrameType | None) -> None:
    _asked.append(signal.Signals(signum))


def while_starting() -> None:
    """Stretch 1: each stop signal ends the start at once (raises ``StoppedWhileStarting``)."""
    for sig in SIGNALS:
        signal.signal(sig, _raise)


def handing_over() -> None:
    """Stretch 2: each stop signal is recorded, for Faust's worker to act on."""
    _asked.clear()
    for sig in SIGNALS:
        signal.signal(sig, _record)


def faust_handlers_in(worker: Worker) -> None:
    """Stretch 3, once mode's handlers are in: SIGHUP stops as SIGTERM does, and a stop asked
    for since :func:`handing_over` is carried out now."""
    worker.loop.add_signal_handler(signal.SIGHUP, worker._on_sigterm)
    if _asked:  # read once every handler is in: a later signal goes to them
        worker._schedule_shutdown(_asked[0])
