"""A worker that was frozen past its Kafka session stops before it writes again.

Frozen (SIGSTOP, a VM or container pause, a machine starved of CPU) for longer than its session
timeout, a worker has lost its partitions to another worker; when it resumes it does not know
yet, and would go on deciding the records it had fetched and writing the results behind the
new owner's: older versions of a verification at the end of its changelog. Nothing fences its
producer (the service uses no Kafka transactions), so it fences itself. A task notes every
second how far the wall clock and the process' CPU time have moved; every write checks that
the process has not been stopped longer than :data:`FROZEN_LIMIT` since, and if it has, the
process exits (75: a supervisor starts it again; it rejoins the group and reads from the last
commit, so nothing is lost). An event loop that is merely busy spends CPU meanwhile and does
not count as frozen; one blocked that long on I/O without CPU (a disk stalled for seconds)
does, and costs a restart.

Under ``PROCESSING_GUARANTEE=exactly_once`` the broker fences a zombie's Kafka writes
(:mod:`phoneverify.agents.transactions`), so this clock guards only what Kafka cannot fence:
each try to send an SMS (the provider would accept it from a zombie too).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from phoneverify.agents.app import app, settings

#: Stopped this long, the worker may have missed enough heartbeats for its session to expire:
#: half the session, so that a worker still inside it never stops.
FROZEN_LIMIT = app.conf.broker_session_timeout / 2
#: How often the task notes the clocks.
EVERY = 1.0
#: The exit status of a worker that fenced itself (EX_TEMPFAIL).
EXIT_FROZEN = 75

#: The clocks as last noted (``None`` until the task first runs).
_wall: float | None = None
_cpu = 0.0


def clock() -> float:
    """Seconds of a clock that also runs while the machine is suspended (unlike monotonic)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def frozen_for(wall: float, cpu: float) -> float:
    """Seconds the process did not run since it noted ``wall`` (:func:`clock`) and ``cpu``:
    time gone by that no CPU time accounts for (its threads' CPU time is summed, so a busy
    process never looks frozen)."""
    return (clock() - wall) - (time.process_time() - cpu)


def check() -> None:
    """Exit at once if the process was frozen past :data:`FROZEN_LIMIT` since last noted."""
    if _wall is None or clock() - _wall <= FROZEN_LIMIT:
        return  # a stop is never longer than the time gone by (this skips the CPU clock)
    stopped = frozen_for(_wall, _cpu)
    if stopped > FROZEN_LIMIT:
        logging.getLogger("phoneverify").critical(
            "this worker was stopped for %.0f s, longer than half its %.0f s Kafka session: "
            "its partitions may belong to another worker now, so it writes nothing more and "
            "exits (a supervisor starts it again; nothing is lost)", stopped,
            app.conf.broker_session_timeout)
        logging.shutdown()
        os._exit(EXIT_FROZEN)


@app.task
async def watch() -> None:
    """Note the clocks every second (and fence the worker if it was frozen meanwhile)."""
    global _wall, _cpu
    while True:
        _wall, _cpu = clock(), time.process_time()
        await asyncio.sleep(EVERY)
        if settings.processing_guarantee == "at_least_once":
            check()
