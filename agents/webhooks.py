"""Outcome webhooks (rule 21): every outcome POSTed, signed, to each of ``WEBHOOK_URLS``.

A stage of its own, keyed by instance id like ``verification.outcome`` (so co-partitioned with
it): it reads outcomes, and on ``verification.webhook-tries`` its own results and its ticks (each
agent reads its own topics: one tick stream per stage, as admission's),
and keeps what is not yet delivered in the ``webhooks`` table (:class:`~phoneverify.models.
webhooks.Pending`, written only in stream iteration, changelog first). The POSTs run off the
stream, in tasks, at most ``WEBHOOK_CONCURRENCY`` at once per URL and each within
``WEBHOOK_TIMEOUT_SECONDS``; each task writes its result as a record, which the stream folds
in: delivered (any 2xx), or due again after a gap that doubles (``WEBHOOK_RETRY_SECONDS``, at
most 600 s), until ``WEBHOOK_MAX_AGE_SECONDS``; then a dead letter. So a slow or dead
endpoint holds up neither the outcomes nor the other endpoints, and a worker killed or moved
mid-retry loses nothing: the new owner finds the table and tries what is due at its next tick
(a delivery may then be repeated: receivers dedupe by ``Phoneverify-Event-Id``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

import aiohttp
from faust.types import EventT, StreamT
from pydantic import ValidationError

from phoneverify.agents.app import app, names, settings
from phoneverify.agents.batch import Outbox, aggregate_table, batches, guarded
from phoneverify.agents.deadlines import DueIndex
from phoneverify.agents.records import dead_letter, describe, letter, record_time, tick_time
from phoneverify.agents.ticker import TICK_KEY
from phoneverify.models import webhooks
from phoneverify.models.messages import DeadLetter, Outcome, WebhookTried
from phoneverify.models.webhooks import Pending
from phoneverify.ops import metrics
from phoneverify.topics import partition_for

log = logging.getLogger("phoneverify.webhooks")

URLS = settings.webhook_targets
table = aggregate_table("webhooks")
due = DueIndex()
#: Tries started on this worker whose result is not folded in yet: (instance id, url) -> when.
_inflight: dict[tuple[str, str], float] = {}
#: URLs pending per partition of this worker (for the gauge).
_pending: dict[int, dict[bytes, int]] = defaultdict(dict)
_tasks: set[asyncio.Task[None]] = set()
_limits = {url: asyncio.Semaphore(settings.webhook_concurrency) for url in URLS}
_session: aiohttp.ClientSession | None = None
#: A try under way this long without its result folded in is taken as lost (seconds).
_LOST = settings.webhook_timeout_seconds + 30.0


def _reassigned(*args: Any, **kwargs: Any) -> None:
    # Tries under way are kept: a partition that stays here must not start them again (their
    # results come back as records, to whoever owns the partition); one that left forgets
    # them after _LOST.
    due.forget_all()
    _pending.clear()
    metrics.webhook_pending.set(0)


app.on_partitions_assigned.connect(_reassigned)
app.on_partitions_revoked.connect(_reassigned)

inputs = app.topic(names.outcome, names.webhook_tries, key_type=bytes,
                   value_type=bytes, key_serializer="raw", value_serializer="raw")


if URLS:

    @app.agent(inputs, concurrency=1)
    async def deliver(stream: StreamT[bytes]) -> None:
        async for batch in batches(stream):
            await guarded("webhooks", Batch().run(batch))


class Batch:
    """One batch: outcomes, results and ticks folded into the table; then the tries due."""

    def __init__(self) -> None:
        self.changed: dict[bytes, tuple[int, Pending | None]] = {}
        self.outbox = Outbox()
        self.start: list[tuple[Pending, str, int]] = []
        self.letters: list[DeadLetter] = []

    async def run(self, batch: list[EventT]) -> None:
        for partition in {event.message.partition for event in batch}:
            if not due.ready(partition):
                due.build(partition, self.index(partition))
        for event in batch:
            try:
                self.take(event)
            except (ValidationError, ValueError, OverflowError) as error:
                await dead_letter(self.outbox, event, describe(error))
        # Dead letters of URLs given up first: a crash before the table is written folds
        # the same results in again (a second copy), never loses one.
        for dead in self.letters:
            await self.outbox.send(names.dead_letter, (dead.key or "").encode(), dead.to_bytes())
        await self.outbox.flush()
        await table.write({key: (partition, None if state is None else
                                 state.model_dump_json().encode())
                           for key, (partition, state) in self.changed.items()})
        for key, (partition, state) in self.changed.items():
            if state is None:
                _pending[partition].pop(key, None)
                continue
            _pending[partition][key] = len(state.targets)
            if state.next_due is not None:
                due.schedule(partition, state.next_due, key)
        metrics.webhook_pending.set(sum(sum(p.values()) for p in _pending.values()))
        for state, url, attempt in self.start:  # off the stream: results come back as records
            _launch(state, url, attempt)

    def index(self, partition: int) -> list[tuple[float, bytes]]:
        """Every pending outcome of the partition, by its next due time (after a rebalance)."""
        entries = []
        for key, raw in table.items_in(partition):
            state = Pending.model_validate_json(raw)
            _pending[partition][key] = len(state.targets)
            if state.next_due is not None:
                entries.append((state.next_due, key))
        return entries

    def load(self, key: bytes, partition: int) -> Pending | None:
        if key in self.changed:
            return self.changed[key][1]
        raw = table.read(key, partition)
        return None if raw is None else Pending.model_validate_json(raw)

    def take(self, event: EventT) -> None:
        message = event.message
        topic, partition = message.topic, message.partition
        key = message.key or b""
        if topic == names.webhook_tries and key == TICK_KEY:
            self.tick(partition, tick_time(event).timestamp())
            return
        if partition != partition_for(key, settings.partitions):
            raise ValueError("record key must be the instance_id, on its partition")
        if topic == names.outcome:
            outcome = Outcome.from_bytes(message.value)
            if self.load(key, partition) is None:  # else the same outcome again
                state = webhooks.pending(outcome.instance_id, (message.value or b"").decode(),
                                         record_time(event).timestamp(),
                                         (topic, partition, message.offset), URLS)
                self.changed[key] = (partition, state)
                self.try_due(state, state.at)
            return
        result = WebhookTried.from_bytes(message.value)
        _inflight.pop((result.instance_id, result.url), None)
        state = self.load(key, partition)
        if state is None:
            return  # delivered or given up already
        after, what = webhooks.tried(state, result.url, result.attempt, result.ok, result.error,
                                     record_time(event).timestamp(),
                                     settings.webhook_retry_seconds,
                                     settings.webhook_max_age_seconds)
        if what == "stale":
            return
        metrics.webhooks.labels("delivered" if result.ok else "failed").inc()
        if what == "given_up":
            metrics.webhooks.labels("given_up").inc()
            self.give_up(state, result)
        self.changed[key] = (partition, after if after.targets else None)

    def tick(self, partition: int, now: float) -> None:
        for key in due.pop_due(partition, now):
            state = self.load(key, partition)
            if state is None:
                continue
            self.try_due(state, now)
            # Look again when the next URL is due, or when a try under way should have
            # answered (its result record lost: it is tried again).
            later = min((t.due for t in state.targets.values() if t.due > now),
                        default=float("inf"))
            due.schedule(partition, min(later, now + _LOST), key)

    def try_due(self, state: Pending, now: float) -> None:
        """Start the tries that are due and not already under way here."""
        for url, attempt in webhooks.due(state, now):
            started = _inflight.get((state.instance_id, url))
            if started is not None and time.monotonic() - started < _LOST:
                continue
            _inflight[(state.instance_id, url)] = time.monotonic()
            self.start.append((state, url, attempt))

    def give_up(self, state: Pending, result: WebhookTried) -> None:
        topic, partition, offset = state.origin
        tries = result.attempt
        self.letters.append(letter(
            topic, partition, offset, state.instance_id.encode(), state.body.encode(),
            f"webhook {result.url}: not delivered within {settings.webhook_max_age_seconds:g} "
            f"s of the outcome, after {tries} tr{'y' if tries == 1 else 'ies'}; the last: "
            f"{result.error}"))


# ---------------------------------------------------------------- the tries, off the stream


def _launch(state: Pending, url: str, attempt: int) -> None:
    task = asyncio.ensure_future(_try(state, url, attempt))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _try(state: Pending, url: str, attempt: int) -> None:
    """POST the outcome to ``url`` once, and write the result as a record."""
    async with _limits[url]:
        ok, error = await post(url, state.instance_id, state.body.encode())
    if not ok:
        log.info("webhook %s for %s: try %d failed: %s", url, state.instance_id, attempt, error)
    result = WebhookTried(instance_id=state.instance_id, url=url, attempt=attempt, ok=ok,
                          error=error)
    key = state.instance_id.encode()
    try:
        sent = await app.producer.send(names.webhook_tries, key, result.to_bytes(),
                                       partition_for(key, settings.partitions), None, None)
        await sent
    except Exception as problem:  # the table still has it: tried again later
        log.warning("webhook %s for %s: its result could not be recorded (%r); it is tried "
                    "again", url, state.instance_id, problem)


async def post(url: str, event_id: str, body: bytes) -> tuple[bool, str]:
    """One signed POST: (delivered, why not). Never raises."""
    global _session
    if _session is None or _session.closed:
        _session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_seconds))
    stamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "phoneverify-webhooks",
        "Phoneverify-Event-Id": event_id,
        "Phoneverify-Signature": webhooks.signature(
            settings.webhook_secret.get_secret_value().encode(), stamp, body),
    }
    try:
        async with _session.post(url, data=body, headers=headers,
                                 allow_redirects=False) as answer:
            if 200 <= answer.status < 300:
                return True, ""
            return False, f"HTTP {answer.status}"
    except TimeoutError:
        return False, f"no answer within {settings.webhook_timeout_seconds:g} s"
    except aiohttp.ClientConnectorError as error:
        return False, f"cannot connect ({error.os_error or error})"
    except (aiohttp.ClientError, ValueError, OSError) as error:
        return False, f"{type(error).__name__}: {error}"[:300]


@app.on_before_shutdown.connect
async def _close(sender: Any, **kwargs: Any) -> None:
    for task in list(_tasks):
        task.cancel()
    if _session is not None:
        await _session.close()
