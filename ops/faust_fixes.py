"""Patches to faust-streaming 0.15.x (and one to aiokafka's record iterator), applied when
the app is imported.

1. A fix for a message-loss race (seek before resume), below.
2. The consumer's fetch loop hands a whole fetch to the conductor under one ``wait_first``
   instead of one per record (:func:`_drain_messages`): the same behaviour, without two tasks
   per record, which were the largest part of Faust's per-record cost in our profiles.
3. Faust's stall detector reports a partition only when its records have been waiting for
   ``stream_processing_timeout`` (:func:`_stall_when_waiting`), not at a record that just came.
4. Transactions (see :mod:`phoneverify.agents.transactions`), without Faust's own exactly-once
   mode: the consumer reads ``read_committed``; offsets aiokafka itself skipped (transaction
   markers, aborted records) are noted, so the fetch loop's check for skipped records tells
   them from records Faust lost (:func:`_noting_skips`); a table's recovery ends once the
   consumer is past the changelog's end (its last offset is a marker no record fills:
   :func:`_need_recovery`); Faust commits no offset of a topic whose offsets a transaction
   commits (:data:`TRANSACTIONAL_TOPICS`); and hooks run at each assignment before the tables'
   recovery reads the changelogs and before the consumer reads the committed offsets
   (:data:`ON_ASSIGNED`: the partitions' transactional producers start first, which fences the
   previous owner's and ends its open transaction, so what recovery and the seek read is
   final).
5. The fetch never takes records of a partition Faust is not reading
   (:func:`_only_active_partitions`): below.
6. The table manager starts without the second Faust waits for tables added late
   (:func:`_tables_at_once`): every table of the app is added when its module is imported.

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
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

import faust.tables.recovery
from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import PartitionRecords
from aiokafka.errors import IllegalStateError
from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.transport.conductor import Conductor
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


def _wrap(owner: Any, name: str, wrap: Callable[[Any], Any]) -> None:
    """Replace ``owner.name`` by ``wrap(owner.name)`` unless it is one of ours already."""
    method = getattr(owner, name)
    if not getattr(method, _PATCHED, False):
        setattr(owner, name, wrap(method))


def apply() -> None:
    """Patch ``Recovery``, ``Consumer`` and aiokafka's ``PartitionRecords`` once; a second
    call changes nothing."""
    _wrap(TableManager, "on_start", _tables_at_once)
    _wrap(AIOKafkaConsumerThread, "_fetch_records", _only_active_partitions)
    for name in ("on_recovery_completed", "_resume_streams"):
        _wrap(Recovery, name, _seek_before_resume)
    Consumer._drain_messages = _drain_messages  # type: ignore[method-assign]
    _wrap(AIOKafkaConsumer, "seek_to_committed", _recording_seek)
    _wrap(AIOKafkaConsumerThread, "verify_event_path", _stall_when_waiting)
    _wrap(PartitionRecords, "_unpack_records", _noting_skips)
    _wrap(AIOKafkaConsumerThread, "_create_worker_consumer", _read_committed)
    _wrap(Recovery, "need_recovery", lambda _: _need_recovery)
    faust.tables.recovery.asyncio = _RecoveryClock()  # type: ignore[attr-defined]
    _wrap(Conductor, "on_partitions_assigned", _hooked_assignment)
    _wrap(Consumer, "_filter_committable_offsets", _not_transactional)


# ---------------------------------------------------------------- the fetch: active only


class ActivePartitions:
    """Faust's set of active partitions as aiokafka's ``Fetcher.fetched_records`` reads it:
    membership is the live set's (a partition paused or resumed while the fetch waits counts
    as it is then), and the view is never empty.

    aiokafka returns records of *every* partition when the set it is given is empty
    (``if partitions and tp not in partitions``), and Faust hands it its live set. A fetch
    begun while recovery reads the changelogs (their partitions the only active ones) is still
    waiting when recovery pauses them: the set is empty until the stream partitions are
    resumed after the seek to the committed offsets. Records fetched meanwhile from partitions
    already sought were taken by that fetch (aiokafka's position moved past them) and dropped
    by Faust (not active), and Faust's read offset stayed at the committed one. A partition
    that got no later record was never read again: after a SIGKILL and a restart that restored
    a changelog tail, starts and codes sent before the restart were not handled until the
    worker restarted again (the kill test timed out waiting for their SMS or outcomes).
    """

    __slots__ = ("live",)

    def __init__(self, live: Any) -> None:
        self.live = live

    def __contains__(self, tp: object) -> bool:
        return tp in self.live

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.live)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self.live))


def _only_active_partitions(method: Callable[..., Awaitable[Any]]
                            ) -> Callable[..., Awaitable[Any]]:
    """Faust's fetch with its active partitions as an :class:`ActivePartitions` view (``None``,
    a client-only app's "every partition", is passed on as it is)."""

    @functools.wraps(method)
    async def wrapper(self: AIOKafkaConsumerThread, consumer: Any, active_partitions: Any,
                      *args: Any, **kwargs: Any) -> Any:
        if active_partitions is not None:
            active_partitions = ActivePartitions(active_partitions)
        return await method(self, consumer, active_partitions, *args, **kwargs)

    setattr(wrapper, _PATCHED, True)
    return wrapper


# ---------------------------------------------------------------- tables: no pause at start


def _tables_at_once(method: Callable[[TableManager], Awaitable[None]]
                    ) -> Callable[[TableManager], Awaitable[None]]:
    """Faust's ``TableManager.on_start`` without its first step, ``sleep(1.0)`` (a second for
    tables added after the app started, which ours never are): every worker start, and so
    every restart after a crash, is a second shorter. The rest (the changelogs' channels,
    then recovery) is Faust's, in its order."""

    @functools.wraps(method)
    async def wrapper(self: TableManager) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()

    setattr(wrapper, _PATCHED, True)
    return wrapper


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


# ---------------------------------------------------------------- transactions

#: Topics whose input offsets are committed in transactions (Faust must not commit them).
TRANSACTIONAL_TOPICS: set[str] = set()
#: Awaited with the consumer's assignment at each rebalance, before the tables' recovery
#: reads their changelogs and before the consumer seeks to the committed offsets.
ON_ASSIGNED: list[Callable[[set[TP]], Awaitable[None]]] = []
#: Per partition, the offset ranges aiokafka skipped itself (start -> end): transaction
#: markers, aborted transactions' records, records compacted away.
SKIPPED: dict[Any, dict[int, int]] = {}


def _noting_skips(method: Callable[[PartitionRecords], Iterator[Any]]
                  ) -> Callable[[PartitionRecords], Iterator[Any]]:
    """aiokafka's record iterator, noting each offset range it passes without a record."""

    @functools.wraps(method)
    def wrapper(self: PartitionRecords) -> Iterator[Any]:
        skipped = SKIPPED.setdefault(TP(self._tp.topic, self._tp.partition), {})
        at = self.next_fetch_offset
        for record in method(self):
            if record.offset > at:
                skipped[at] = record.offset
            at = record.offset + 1
            yield record
        if self.next_fetch_offset > at:
            skipped[at] = self.next_fetch_offset
        if len(skipped) > 10_000:  # long past: nobody asks about them any more
            for start in sorted(skipped)[:5_000]:
                del skipped[start]

    setattr(wrapper, _PATCHED, True)
    return wrapper


def skipped_by_consumer(tp: TP, start: int, end: int, forget: bool = True) -> bool:
    """Whether aiokafka itself passed every offset from ``start`` up to ``end`` (excluded)
    without a record: markers and aborted records, not records lost on the way (``forget``:
    and forget those ranges, they are asked about once)."""
    skipped = SKIPPED.get(tp)
    if not skipped:
        return start >= end
    at = start
    while at < end and at in skipped:
        at = skipped.pop(at) if forget else skipped[at]
    return at >= end


def _read_committed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Faust's worker consumer with ``isolation_level=read_committed`` (Faust sets it only in
    its own exactly-once mode): records of aborted transactions are never delivered, nor
    those of open ones."""

    @functools.wraps(method)
    def wrapper(self: AIOKafkaConsumerThread, *args: Any, **kwargs: Any) -> Any:
        consumer = method(self, *args, **kwargs)
        consumer._isolation_level = "read_committed"
        return consumer

    setattr(wrapper, _PATCHED, True)
    return wrapper


def _position(recovery: Recovery, tp: TP) -> int | None:
    """The consumer's position in ``tp`` (the next offset it fetches), if it has one."""
    try:
        consumer = recovery.app.consumer._thread._ensure_consumer()  # type: ignore[attr-defined]
        state = consumer._subscription.subscription.assignment.state_value(tp)
        return state.position if state is not None and state.has_valid_position else None
    except Exception:  # not started, not assigned: no position
        return None


def _need_recovery(self: Recovery) -> bool:
    """Faust's check, except that a changelog partition is done when every offset after the
    last record applied, up to the consumer's position past the highwater, held no record
    (under transactions a changelog ends with a commit marker, never delivered; aborted
    records are skipped too). Records fetched but not applied yet keep it going."""
    remaining = self.active_remaining()
    for tp, left in remaining.items():
        if left > 0:
            position = _position(self, tp)
            if position is None or position <= self.active_highwaters[tp]:
                return True
            applied = self.active_offsets[tp]
            if not skipped_by_consumer(TP(tp.topic, tp.partition), applied + 1, position,
                                       forget=False):
                return True
            self.active_offsets[tp] = self.active_highwaters[tp]
    return False


setattr(_need_recovery, _PATCHED, True)


class _RecoveryClock:
    """``asyncio`` as Faust's recovery module sees it, except that the changelog reader wakes
    every 0.2 s instead of 5 s when nothing comes: a recovery whose changelogs end with
    markers ends on the next wake-up (:func:`_need_recovery`), not 5 s later."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def wait_for(awaitable: Awaitable[Any], timeout: float | None) -> Any:
        return await asyncio.wait_for(awaitable, None if timeout is None else min(timeout, 0.2))


def _hooked_assignment(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Faust's topic conductor told of an assignment, after the :data:`ON_ASSIGNED` hooks
    (Faust calls it in each rebalance before the tables' recovery starts)."""

    @functools.wraps(method)
    async def wrapper(self: Conductor, assigned: set[TP]) -> None:
        for hook in ON_ASSIGNED:
            await hook(set(assigned))
        await method(self, assigned)

    setattr(wrapper, _PATCHED, True)
    return wrapper


def _not_transactional(method: Callable[[Consumer, Iterable[TP]], dict[TP, int]]
                       ) -> Callable[[Consumer, Iterable[TP]], dict[TP, int]]:
    """Faust's committable offsets without those of :data:`TRANSACTIONAL_TOPICS`: their
    offsets are committed with each batch's transaction; a commit of Faust's landing after a
    later transaction's would move the group back."""

    @functools.wraps(method)
    def wrapper(self: Consumer, tps: Iterable[TP]) -> dict[TP, int]:
        return {tp: offset for tp, offset in method(self, tps).items()
                if tp.topic not in TRANSACTIONAL_TOPICS}

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
    :func:`_drain_messages`); and seeking each input partition where the group committed
    nothing yet to its beginning (:func:`_from_the_beginning`)."""

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
        await _from_the_beginning(self, committed)
        return committed

    setattr(wrapper, _PATCHED, True)
    return wrapper


async def _from_the_beginning(self: AIOKafkaConsumer, committed: Mapping[Any, int | None]
                              ) -> None:
    """Seek the input partitions where the group committed nothing (or offset 0) to their
    beginning, as ``auto_offset_reset=earliest`` promises.

    aiokafka's ``seek_to_committed`` seeks only partitions with a committed offset above 0
    and leaves the others where the fetcher is. After a rebalance that is past whatever the
    fetcher took meanwhile: Faust drops a fetch that comes while its flow is suspended (it
    counts on this seek to read it again). Under ``exactly_once`` a partition has no committed
    offset until a transaction commits one, so when a worker frozen past its session had the
    only transactions of a partition aborted, the records they had read were taken by the
    new owner's fetcher during the rebalance, dropped, and never read again: a verification
    never concluded (``tests/test_transactions.py``). Under ``at_least_once`` the same held
    for a partition's first records before Faust's first commit there."""
    unread = [tp for tp, offset in committed.items()
              if not offset and self.app.topics.acks_enabled_for(tp.topic)]
    if unread:
        thread = self._thread  # type: ignore[attr-defined]
        with contextlib.suppress(IllegalStateError):  # revoked meanwhile: seeks next time
            await thread.call_thread(thread._ensure_consumer().seek_to_beginning, *unread)


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
                        and acks_enabled_for(message.topic)
                        and not skipped_by_consumer(tp, due, offset)):  # the due one was skipped
                    sought.add(tp)
                    await read_again(tp, offset, due)
                    continue
            r_offset = get_read_offset(tp)
            if r_offset is None or offset >= r_offset:
                gap = offset - (r_offset or 0)
                if gap > 1 and r_offset and acks_enabled_for(message.topic):
                    if (rewound.get(tp) != r_offset + 1  # records were skipped: read again
                            and not skipped_by_consumer(tp, r_offset + 1, offset)):
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

