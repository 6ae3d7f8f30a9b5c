"""Fetch linger: after a fetch that brought records, the next fetch waits ``FETCH_LINGER_MS``.

A worker's consumer fetches every partition it holds (8 partitions of 9 topics: 72) in one
request, and the broker answers as soon as any of them has a record. At a light, steady load
the records of one verification arrive a few at a time, so each fetch brings one or two, and
each costs the same: a request and a response of 72 partitions, built and parsed in
aiokafka's pure Python, and a wake-up of both event loops. That fixed cost, not the work,
was most of the CPU at 50 verifications/s.

With a linger, a fetch that brought records is handed over at once (nothing waits longer for
what was fetched), but the next request goes out only ``FETCH_LINGER_MS`` later: what arrives
meanwhile comes in one response. It bounds the fetches to about 1000 / linger per second, and
adds at most the linger to each hop. An idle worker is not affected: a fetch that brought
nothing waits at the broker (up to Faust's 1.5 s) and the next one goes out at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka.consumer.fetcher import Fetcher

_PATCHED = "_phoneverify_linger"
#: Seconds a fetch that brought records holds back the next one (set by :func:`apply`).
linger = 0.0


def _lingering(method: Callable[..., Awaitable[bool]]) -> Callable[..., Awaitable[bool]]:
    @functools.wraps(method)
    async def wrapper(self: Fetcher, *args: Any, **kwargs: Any) -> bool:
        has_data = await method(self, *args, **kwargs)
        if has_data and linger > 0:
            # Hand over what came now (the fetch routine would only after this returns), then
            # keep the node "in flight" for the linger: no other fetch is sent to it meanwhile.
            for waiter in list(self._fetch_waiters):
                self._notify(waiter)
            # Closed or reassigned meanwhile: the fetcher expects its fetch tasks to end quietly.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(linger)
        return has_data

    setattr(wrapper, _PATCHED, True)
    return wrapper


def apply(seconds: float) -> None:
    """Set the linger (0 turns it off) and patch aiokafka's fetcher once."""
    global linger
    linger = max(0.0, seconds)
    method = Fetcher._proc_fetch_request
    if not getattr(method, _PATCHED, False):
        Fetcher._proc_fetch_request = _lingering(method)  # type: ignore[method-assign]
