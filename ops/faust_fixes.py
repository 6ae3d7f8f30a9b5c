"""Three patches to faust-streaming 0.15.x, applied when the app is imported.

1. A fix for a message-loss race (seek before resume), below.
2. The consumer's fetch loop hands a whole fetch to the conductor under one ``wait_first``
   instead of one per record (:func:`_drain_messages`): the same behaviour, without two tasks
   per record, which were the largest part of Faust's per-record cost in our profiles.
3. Faust's stall detector reports a partition only when its records have been waiting for
   ``stream_processing_timeout`` (:func:`_stall_when_waiting`), not at a record that just came.

The race:

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

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiokafka import TopicPartition
from faust.tables.recovery import Recovery
from faust.transport.consumer import CONSUMER_FETCHING, Consumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
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
    """Patch ``Recovery`` and ``Consumer`` once; a second call changes nothing."""
    for name in ("on_recovery_completed", "_resume_streams"):
        method = getattr(Recovery, name)
        if not getattr(method, _PATCHED, False):
            setattr(Recovery, name, _seek_before_resume(method))
    Consumer._drain_messages = _drain_messages  # type: ignore[method-assign]
    seek = AIOKafkaConsumer.seek_to_committed
    if not getattr(seek, _PATCHED, False):
        AIOKafkaConsumer.seek_to_committed = _recording_seek(seek)  # type: ignore[method-assign]
    verify = AIOKafkaConsumerThread.verify_event_path
    if not getattr(verify, _PATCHED, False):
        AIOKafkaConsumerThread.verify_event_path = (  # type: ignore[method-assign]
            _stall_when_waiting(verify))


# ---------------------------------------------------------------- stalls: records waiting

#: Per partition: since when its records have been waiting at every check, and the last check
#: (monotonic time).
_WAITING = "_phoneverify_waiting_since"


def waiting_since(seen: tuple[float, float] | None, now: float, highwater: int | None,
                  position: int | None, gap: float) -> float | None:
    """Since when a partition's records have been waiting at every check, as of this check
    (``now``): ``None`` when none wait (it has read up to the end of the partition). ``seen``
    is (since, last check) from the check before; one more than ``gap`` ago (the partition
    was elsewhere meanwhile, or checks paused for a rebalance) does not count."""
    if highwater is None or position is None or highwater <= position:
        return None
    if seen is None or now - seen[1] > gap:
        return now
    return seen[0]


def _stall_when_waiting(method: Callable[[Any, float, TP], None]
                        ) -> Callable[[Any, float, TP], None]:
    """Faust's stall detector (``verify_event_path``, every 2.5 commit intervals), only for
    partitions whose records have been waiting at every check for ``stream_processing_timeout``.

    Faust reports a partition as stalled when, at the moment of a check, its end offset is
    ahead of the position read (a record just came: every busy partition, now and then) and
    the stream has processed nothing from it since the worker started, or since the last
    rebalance, which clears that record. So after a second worker left, the one remaining
    logged an ERROR block for each partition it took over that received a record around a
    check (idle admission and tick partitions among them), while all was well; and, with a
    short timeout, that it "has not sent fetch request" for changelog partitions it does not
    need to read (their tables were up to date). A real stall (a fetcher, a stream or commits
    stopped) keeps records waiting: Faust still says which.
    """

    @functools.wraps(method)
    def wrapper(self: AIOKafkaConsumerThread, now: float, tp: TP) -> None:
        assignment = self._ensure_consumer()._fetcher._subscriptions.subscription.assignment
        state = assignment.state_value(TopicPartition(tp.topic, tp.partition))
        waiting: dict[TP, tuple[float, float]] = self.__dict__.setdefault(_WAITING, {})
        since = waiting_since(waiting.get(tp), now, getattr(state, "highwater", None),
                              getattr(state, "position", None),
                              gap=3 * 2.5 * self.consumer.commit_interval)
        if since is None:
            waiting.pop(tp, None)
            return
        waiting[tp] = (since, now)
        if now - since >= self.tp_stream_timeout_secs:
            method(self, now, tp)

    setattr(wrapper, _PATCHED, True)
    return wrapper


#: Where the consumer keeps, per partition, the offset that must come next (after a seek to
#: the committed offsets, or after a re-read), and the offset each was last sought back to.
_NEXT = "_phoneverify_next_after_seek"
_REWOUND = "_phoneverify_rewound_to"
#: At most one warning per partition this often (a transactional producer's markers are real
#: gaps, each read once again).
WARN_EVERY = 60.0


def _recording_seek(method: Callable[..., Awaitable[Mapping[TP, int]]]
                    ) -> Callable[..., Awaitable[Mapping[TP, int]]]:
    """Faust's ``seek_to_committed``, recording for each partition the committed offset it
    sought to: the next record delivered from it must have that offset (see
    :func:`_drain_messages`)."""

    @functools.wraps(method)
    async def wrapper(self: AIOKafkaConsumer) -> Mapping[TP, int]:
        committed = await method(self)
        expected = self.__dict__.setdefault(_NEXT, {})
        rewound = self.__dict__.setdefault(_REWOUND, {})
        for tp, offset in committed.items():
            key = TP(tp.topic, tp.partition)
            rewound.pop(key, None)  # a new assignment: earlier re-reads say nothing of it
            if offset:
                expected[key] = offset
        return committed

    setattr(wrapper, _PATCHED, True)
    return wrapper


# ---------------------------------------------------------------- one wait_first per fetch


async def _drain_messages(self: Consumer, fetcher: Any) -> None:  # pragma: no cover - I/O loop
    """Faust's ``Consumer._drain_messages`` with one change: the records of one fetch are
    handed to the conductor under *one* ``wait_first`` (a race with the flow-control
    suspension) instead of one per record, each of which made two tasks.

    What a suspension does is unchanged: Faust's loop abandoned the record in hand and went on,
    abandoning the rest of the fetch the same way (each ``wait_first`` returned at once); here
    the rest of the fetch is abandoned in one step. Records are delivered in the same order,
    the read offsets and gaps are tracked as before, and the commit check runs per record.

    And one fix: Faust takes a jump in a partition's offsets (a record more than one past the
    last one read) for a gap that no record fills (compaction, transaction markers) and counts
    the skipped offsets as acknowledged, so the next commit goes past them. Our input topics
    have no such gaps; a jump there means records were skipped. The fault suite
    (``bench/chaos.py``, scenario worker-kill) saw it when a worker took over the partitions
    of a killed one: Faust resumed the flow (its path for tables that need no restore) before
    it sought the new partitions to their committed offsets, read offsets set by that seek
    then lagged what was fetched, and records fetched around it were never processed, yet
    committed (360 verifications of the 450 started while the partitions waited to move were
    lost). So on a jump the partition is sought back to the offset after the last one read
    and read again; only a jump seen again from the same offset is a real gap (a transactional
    producer's commit marker, say), left to Faust.

    The same after a seek to the committed offsets (``seek_to_committed``, recorded by
    :func:`_recording_seek`): the committed offset is the next record to read, so the first
    record after it must be that one. Faust would let a hole of exactly that one record pass
    (its commit check tolerates one), and the suite saw it lose that record after rebalances.
    """
    callback = self.callback
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    acks_enabled_for = self.app.topics.acks_enabled_for
    flag = CONSUMER_FETCHING
    #: Per partition, the offset it was last sought back to after a jump (cleared when the
    #: partition is assigned again).
    rewound: dict[TP, int] = self.__dict__.setdefault(_REWOUND, {})
    #: Per partition: the offset that must come next (after a seek).
    expected: dict[TP, int] = self.__dict__.setdefault(_NEXT, {})
    warned: dict[TP, float] = {}

    async def read_again(tp: TP, offset: int, wanted: int) -> None:
        now = time.monotonic()
        if now - warned.get(tp, -WARN_EVERY) >= WARN_EVERY:
            warned[tp] = now
            self.log.warning("%s[%d]: offset %d came where %d was due: reading from %d again "
                             "(once; a gap seen again is taken as real)", tp.topic,
                             tp.partition, offset, wanted, wanted)
        expected[tp] = rewound[tp] = wanted
        await self.seek_wait({tp: wanted})

    async def deliver(records: list[tuple[TP, Any]]) -> None:
        sought: set[TP] = set()  # the rest of this fetch is stale for these
        for n, (tp, message) in enumerate(records, start=1):
            if n % 100 == 0:
                await asyncio.sleep(0)  # let other tasks run during a large fetch, as Faust's
            if tp in sought:
                continue
            offset = message.offset
            due = expected.get(tp)
            if due is not None and offset >= due:  # older ones: left from before the seek
                del expected[tp]
                if (offset > due and rewound.get(tp) != due
                        and acks_enabled_for(message.topic)):  # the due one was skipped
                    sought.add(tp)
                    await read_again(tp, offset, due)
                    continue
            r_offset = get_read_offset(tp)
            if r_offset is None or offset >= r_offset:
                gap = offset - (r_offset or 0)
                if gap > 1 and r_offset and acks_enabled_for(message.topic):
                    if rewound.get(tp) != r_offset + 1:  # records were skipped: read again
                        sought.add(tp)
                        await read_again(tp, offset, r_offset + 1)
                        continue
                    await self._add_gap(tp, r_offset + 1, offset)
                if self._commit_every is not None and self._n_acked >= self._commit_every:
                    self._n_acked = 0
                    await self.commit()
                await callback(message)
                set_read_offset(tp, offset)
            else:
                self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r", offset, message.key,
                             message.value)

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            self.diag.set_flag(flag)
            records = [record async for record in self.getmany(timeout=1.0)]
            await self.sleep(0)
            if records and not self.should_stop:
                await self.wait_first(deliver(records), self.suspend_flow.wait())
            self.diag.unset_flag(flag)
    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        self.diag.unset_flag(flag)

