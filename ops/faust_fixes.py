"""A fix for a message-loss race in faust-streaming 0.15.x, applied when ``app`` is imported.

After a rebalance, Faust's recovery resumes the stream partitions first and only then seeks
them to their committed offsets (``Recovery.on_recovery_completed`` and
``Recovery._resume_streams``). The seek asks the broker for one partition's offset at a time,
which takes a while; meanwhile the fetcher already delivers records from the resumed
partitions and the agents process them. When the seek lands on a partition in the middle of
that, Faust can skip a record: our SIGKILL test saw the actor receive offsets 83 and 85 of a
partition and never 84, which was committed as processed. (A wrong answer was lost that way.)

The fix keeps Faust's code and only changes the order: while those two methods run, resuming
stream partitions is held back until the seek is done, so nothing is fetched before the
positions are final.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from faust.tables.recovery import Recovery
from faust.types import TP

_PATCHED = "_phoneverify_seek_before_resume"


def _seek_before_resume(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(method)
    async def wrapper(self: Recovery, *args: Any, **kwargs: Any) -> None:
        consumer = self.app.consumer
        resume, seek = consumer.resume_partitions, consumer.perform_seek
        held: list[Iterable[TP]] = []

        def hold(partitions: Iterable[TP]) -> None:
            held.append(set(partitions))

        async def seek_then_resume() -> None:
            await seek()
            release()

        def release() -> None:
            while held:
                resume(held.pop(0))

        consumer.resume_partitions = hold
        consumer.perform_seek = seek_then_resume
        try:
            await method(self, *args, **kwargs)
        finally:
            del consumer.resume_partitions, consumer.perform_seek  # back to the class's
            release()  # no seek happened (nothing assigned): resume as Faust would have

    setattr(wrapper, _PATCHED, True)
    return wrapper


def apply() -> None:
    """Patch ``Recovery`` once; a second call changes nothing."""
    for name in ("on_recovery_completed", "_resume_streams"):
        method = getattr(Recovery, name)
        if not getattr(method, _PATCHED, False):
            setattr(Recovery, name, _seek_before_resume(method))
