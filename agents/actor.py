"""The verification actor: folds admitted starts, responses, terminations, ticks and SMS
statuses into the ``verifications`` table through the pure decider.

Per record: parse -> command -> ``decide`` -> ``evolve`` -> publish (events, SMS, outcome) ->
write the table. The table value keeps, beside the state, the offset of the last record from
each topic that changed it, so a record redelivered after a crash changes nothing; outputs are
sent before the table write, so a crash between them repeats identical outputs rather than
losing them (see README, "Delivery guarantees").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import faust
from faust.types import EventT, StreamT
from faust.types.tuples import FutureMessage
from pydantic import BaseModel, ValidationError

from phoneverify.agents.app import app, events_topic, names, outcome_topic, settings, sms_topic
from phoneverify.agents.deadlines import Deadlines
from phoneverify.agents.records import dead_letter, describe, log, record_time
from phoneverify.models.codes import draw_code, hash_code, sms_body
from phoneverify.models.messages import (
    Admission,
    Outcome,
    SendSms,
    SmsFailed,
    SmsSent,
    SubmitCode,
    Terminate,
    Tick,
)
from phoneverify.models.verification import (
    TERMINAL,
    Answer,
    Command,
    ConfirmSms,
    Event,
    Expire,
    FailSms,
    Reject,
    SmsRequested,
    Start,
    Started,
    Stop,
    Verification,
    decide,
    fold,
    initial_state,
)


class Stored(BaseModel):
    """A table value: the aggregate, its partition, and the last offset applied per topic."""

    state: Verification
    partition: int
    offsets: dict[str, int] = {}


class DurableTable(faust.Table):
    """A Faust table that keeps the changelog send of its last write, to await its ack."""

    last_write: FutureMessage | None = None

    def send_changelog(self, *args: Any, **kwargs: Any) -> FutureMessage:
        self.last_write = super().send_changelog(*args, **kwargs)
        return self.last_write


verifications = app.tables.add(DurableTable(
    app, name="verifications", key_type=bytes, value_type=bytes,
    partitions=settings.partitions, beacon=app.tables.beacon))
deadlines = Deadlines()
app.on_partitions_assigned.connect(deadlines.forget_all)
app.on_partitions_revoked.connect(deadlines.forget_all)

inputs = app.topic(names.admitted, names.response, names.terminate, names.tick,
                   names.sms_status, key_type=bytes, value_type=bytes,
                   key_serializer="raw", value_serializer="raw")


def load(key: bytes) -> Stored | None:
    raw = verifications.get(key)
    return Stored.model_validate_json(raw) if raw is not None else None


def to_command(topic: str, event: EventT) -> Command:
    """The domain command a record asks for; raises ValueError/ValidationError if it is bad."""
    at = record_time(event)
    if topic == names.admitted:
        admission = Admission.from_bytes(event.value)
        iid = admission.instance_id
        if admission.verdict != "admitted":
            return Reject(instance_id=iid, reason=admission.verdict, at=admission.requested_at)
        code = draw_code(settings.code_key, iid, settings.verification_code_length)
        return Start(instance_id=iid, phone_number=admission.phone_number or "",
                     code_hash=hash_code(settings.code_key, iid, code), command_id=f"{iid}/sms/1",
                     at=admission.requested_at,
                     timeout_seconds=settings.verification_timeout_seconds,
                     max_attempts=settings.verification_max_attempts)
    if topic == names.response:
        submit = SubmitCode.from_bytes(event.value)
        return Answer(instance_id=submit.instance_id, at=at,
                      code_hash=hash_code(settings.code_key, submit.instance_id, submit.code))
    if topic == names.terminate:
        stop = Terminate.from_bytes(event.value)
        return Stop(instance_id=stop.instance_id, reason=stop.reason or "terminated", at=at)
    if topic == names.sms_status:
        status = _sms_status(event.value)
        if isinstance(status, SmsSent):
            return ConfirmSms(instance_id=status.instance_id, command_id=status.command_id, at=at)
        return FailSms(instance_id=status.instance_id, command_id=status.command_id,
                       error=status.error, at=at)
    raise ValueError(f"the actor does not read topic {topic}")


def _sms_status(raw: bytes | None) -> SmsSent | SmsFailed:
    try:
        return SmsSent.from_bytes(raw)
    except ValidationError:
        return SmsFailed.from_bytes(raw)


def outcome_of(state: Verification) -> Outcome:
    assert state.reason is not None and state.created_at and state.updated_at
    status = "terminated" if state.status == "terminated" else (
        "verified" if state.status == "verified" else "failed")
    return Outcome(instance_id=state.instance_id, verified=state.status == "verified",
                   status=status, reason=state.reason, attempts=state.attempts,
                   created_at=state.created_at, completed_at=state.updated_at)


class NotStarted(ValueError):
    """An answer for an instance id that has no verification (yet): dead-lettered."""


async def apply(key: bytes, command: Command, partition: int, topic: str | None = None,
                offset: int | None = None) -> None:
    """Run one command against the stored aggregate, publish what it caused, store the result.

    Order: events and outcome first (a crash before the table write repeats them, identical,
    rather than losing them), then the table write, then, once that write is acknowledged,
    the SMS. Nobody can answer a code before its verification is durable, so no answer can
    overtake a start that a crash sends round again.
    """
    stored = load(key) or Stored(state=initial_state(command.instance_id), partition=partition)
    if topic is not None and offset is not None and offset <= stored.offsets.get(topic, -1):
        if topic == names.admitted and stored.state.sms == "requested":
            await send_sms(key, stored.state)  # the first may have died with the worker
        return  # redelivered after a crash: already applied
    events = decide(command, stored.state)
    if not events:
        if isinstance(command, Answer) and stored.state.status == "new":
            raise NotStarted(f"no verification {command.instance_id} has started")
        return
    state = fold(stored.state, events)
    await publish(key, stored.state.version, events, state)
    offsets = stored.offsets if topic is None else {**stored.offsets, topic: offset or 0}
    verifications[key] = Stored(state=state, partition=partition,
                                offsets=offsets).model_dump_json().encode()
    if isinstance(events[0], Started) and state.deadline is not None:
        deadlines.add(partition, state.deadline, key)
    if any(isinstance(event, SmsRequested) for event in events):
        assert verifications.last_write is not None
        await verifications.last_write  # the table write above is acknowledged by Kafka
        await send_sms(key, state)


async def publish(key: bytes, version: int, events: list[Event], state: Verification) -> None:
    for seq, event in enumerate(events, start=version + 1):
        record = {"seq": seq, **event.model_dump(mode="json")}
        await events_topic.send(key=key, value=_json(record))
        if isinstance(event, TERMINAL):
            await outcome_topic.send(key=key, value=outcome_of(state).to_bytes())
            log.info("verification %s: %s (%s)", state.instance_id, state.status, state.reason)


async def send_sms(key: bytes, state: Verification) -> None:
    """The SMS command, with the plain code (drawn again: it is stable per instance)."""
    code = draw_code(settings.code_key, state.instance_id, settings.verification_code_length)
    sms = SendSms(command_id=state.command_id or "", instance_id=state.instance_id,
                  to=state.phone_number or "", body=sms_body(code))
    await sms_topic.send(key=key, value=sms.to_bytes())


def _json(record: dict[str, object]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


async def on_tick(event: EventT) -> None:
    """Expire what is due on this partition; costs time in the number due, not pending."""
    tick = Tick.from_bytes(event.value)
    partition = event.message.partition
    if not deadlines.ready(partition):
        deadlines.rebuild(_pending(), settings.partitions)
    for key in deadlines.due(partition, tick.now):
        stored = load(key)
        if stored is not None and not stored.state.is_final:
            await apply(key, Expire(instance_id=stored.state.instance_id, at=tick.now), partition)


def _pending() -> Iterator[tuple[int, datetime, bytes]]:
    """Every pending verification in the table (one scan, after a rebalance)."""
    for key, raw in verifications.items():
        stored = Stored.model_validate_json(raw)
        if stored.state.status == "pending" and stored.state.deadline is not None:
            yield stored.partition, stored.state.deadline, key


@app.agent(inputs, concurrency=1)
async def actor(stream: StreamT[bytes]) -> None:
    async for event in stream.events():
        message = event.message
        log.debug("actor: %s[%d]@%d", message.topic, message.partition, message.offset)
        try:
            if message.topic == names.tick:
                await on_tick(event)
                continue
            command = to_command(message.topic, event)
            if message.key != command.instance_id.encode():
                await dead_letter(event, "record key must be the instance_id")
                continue
            await apply(message.key, command, message.partition, message.topic, message.offset)
        except (ValidationError, ValueError) as error:
            await dead_letter(event, describe(error))

