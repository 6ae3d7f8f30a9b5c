"""Admission, per phone number: the start rate limit and the guess budget (rules 9 and 11).

Reads ``verification.admission`` (keyed by E.164 number): parsed starts from intake, the
actor's settlements of concluded verifications, and ticks. Keeps each number's state
(:mod:`phoneverify.models.admission`) in the ``numbers`` table; sends each verdict, with the
attempts it reserved, to ``verification.admitted`` for the actor. A number's state is deleted
once nothing of it is inside a window (a tick finds it due).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from faust.types import EventT, StreamT
from pydantic import Field, TypeAdapter, ValidationError

from phoneverify.agents.app import admission_topic, app, names, settings
from phoneverify.agents.batch import (
    AggregateTable,
    Outbox,
    aggregate_table,
    batches,
    guarded,
)
from phoneverify.agents.deadlines import DueIndex
from phoneverify.agents.fraud import refused
from phoneverify.agents.records import dead_letter, describe, tick_time
from phoneverify.models import admission
from phoneverify.models.admission import Number
from phoneverify.models.messages import Admission, PhoneDelivery, PhoneStart, Settle
from phoneverify.topics import partition_for

_REQUEST: TypeAdapter[PhoneStart | PhoneDelivery | Settle] = TypeAdapter(
    Annotated[PhoneStart | PhoneDelivery | Settle, Field(discriminator="type")],
    config={"strict": True})

numbers: AggregateTable = aggregate_table("numbers")
due = DueIndex()
app.on_partitions_assigned.connect(due.forget_all)
app.on_partitions_revoked.connect(due.forget_all)


class Numbers:
    """The numbers one batch reads and changes (written once, at the end)."""

    def __init__(self) -> None:
        self.changed: dict[bytes, tuple[int, Number]] = {}

    def get(self, key: bytes, partition: int) -> Number:
        if key in self.changed:
            return self.changed[key][1]
        raw = numbers.read(key, partition)
        return Number.model_validate_json(raw) if raw is not None else Number()

    def put(self, key: bytes, partition: int, number: Number) -> None:
        self.changed[key] = (partition, number)

    async def write(self) -> None:
        await numbers.write({
            key: (partition, None if number.is_empty else number.model_dump_json().encode())
            for key, (partition, number) in self.changed.items()})
        for key, (partition, number) in self.changed.items():
            when = admission.next_due(number, settings.limits)
            if when is not None:
                due.schedule(partition, when.timestamp(), key)


@app.agent(admission_topic, concurrency=1)
async def admit(stream: StreamT[bytes]) -> None:
    async for batch in batches(stream):
        await guarded("admission", handle(batch))


async def handle(batch: list[EventT]) -> None:
    outbox, touched = Outbox(), Numbers()
    for event in batch:
        try:
            await take(outbox, touched, event)
        except (ValidationError, ValueError, OverflowError) as error:
            await dead_letter(outbox, event, describe(error))
    # A verdict repeated after a crash is recognised by its start's origin: no order needed.
    await outbox.flush()
    await touched.write()


async def take(outbox: Outbox, touched: Numbers, event: EventT) -> None:
    message = event.message
    if message.key == b"tick":
        prune(touched, message.partition, tick_time(event))
        return
    key, partition = message.key or b"", message.partition
    request = _REQUEST.validate_json(message.value or b"")
    if isinstance(request, Settle):
        number = admission.settle(touched.get(key, partition), request.origin,
                                  request.wrong_codes)
        touched.put(key, partition, number)
        return
    if isinstance(request, PhoneDelivery):  # a resend or fallback: rule 9 counts it too
        blocked = refused(request.phone_number, request.requested_at)  # rule 20: a block
        if blocked is not None:  # refused before it counts: nothing goes out
            answer = Admission(instance_id=request.instance_id, verdict="blocked_number",
                               requested_at=request.requested_at, origin=request.origin,
                               detail=blocked, kind="delivery")
        else:
            verdict, number = admission.admit_delivery(
                touched.get(key, partition), request.origin, request.requested_at,
                settings.limits)
            touched.put(key, partition, number)
            answer = Admission(instance_id=request.instance_id, verdict=verdict.verdict,
                               requested_at=request.requested_at, origin=request.origin,
                               retry_after=verdict.retry_after, kind="delivery")
    else:
        start = request
        verdict, number = admission.admit(touched.get(key, partition), start.origin,
                                          start.requested_at, settings.limits)
        touched.put(key, partition, number)
        admitted = verdict.verdict == "admitted"
        answer = Admission(instance_id=start.instance_id, verdict=verdict.verdict,
                           phone_number=start.phone_number if admitted else None,
                           requested_at=start.requested_at, origin=start.origin,
                           request_id=start.request_id, attempts=verdict.attempts,
                           retry_after=verdict.retry_after, locale=start.locale,
                           channel=start.channel, channels=start.channels)
    iid = answer.instance_id.encode()
    await outbox.send(names.admitted, iid, answer.to_bytes(),
                      partition=partition_for(iid, settings.partitions))


def prune(touched: Numbers, partition: int, now: datetime) -> None:
    """Forget what left every window, for the numbers due on this partition."""
    if not due.ready(partition):
        due.build(partition, _due_entries(partition))
    for key in due.pop_due(partition, now.timestamp()):
        number = touched.get(key, partition)
        pruned = admission.prune(number, now, settings.limits)
        if pruned != number:
            touched.put(key, partition, pruned)
        elif (when := admission.next_due(number, settings.limits)) is not None:
            due.schedule(partition, when.timestamp(), key)  # popped before its time


def _due_entries(partition: int) -> list[tuple[float, bytes]]:
    entries = []
    for key, raw in numbers.items_in(partition):
        when = admission.next_due(Number.model_validate_json(raw), settings.limits)
        if when is not None:  # None: only open reservations, which a settlement will touch
            entries.append((when.timestamp(), key))
    return entries
