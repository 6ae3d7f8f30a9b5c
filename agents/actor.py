"""The verification actor: folds admitted starts, responses, terminations, ticks and SMS
statuses into the ``verifications`` table through the pure decider.

Per batch of records (see :mod:`phoneverify.agents.batch` for the order of writes): parse each
record into a command, ``decide``, fold, and collect what it caused (events, replies, outcomes,
settlements for the number's budget, dead letters, SMS commands); then publish, write the
table, and only then send the SMS commands.

Records that a client's partitioner put on another partition than the service's are moved to
their partition first (``verification.rerouted``), before they touch any state. Every command
is recognised when it comes again after a crash: responses and terminates by their offset in
their original partition, starts by their origin; ticks and SMS statuses change nothing twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import datetime, timedelta

from faust.types import EventT, StreamT
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from phoneverify.agents.app import app, names, settings
from phoneverify.agents.batch import Outbox, aggregate_table, batches
from phoneverify.agents.deadlines import DueIndex
from phoneverify.agents.records import (
    dead_letter,
    describe,
    letter,
    origin_of,
    record_time,
    redact,
)
from phoneverify.agents.sender import sent
from phoneverify.models.codes import draw_code, hash_code, sms_body
from phoneverify.models.messages import (
    Admission,
    SendSms,
    Settle,
    SmsFailed,
    SmsSent,
    SubmitCode,
    Terminate,
    Tick,
)
from phoneverify.models.verification import (
    TERMINAL,
    Answer,
    Answered,
    Command,
    ConfirmSms,
    Dropped,
    Event,
    Expire,
    FailSms,
    Reject,
    SmsRequested,
    Start,
    Stop,
    Verification,
    decide,
    evolve,
    initial_state,
    outcome_of,
    reply_of,
)
from phoneverify.topics import partition_for

log = logging.getLogger("phoneverify")
DUPLICATES_KEPT = 16


class Stored(BaseModel):
    """A table value: the aggregate, and what the actor needs to stay idempotent."""

    #: When a tick must look at it next (epoch seconds): deadline, grace, or retention end.
    due: float | None = None
    #: Origin of the record that created this aggregate: its events form one stream.
    life: str
    state: Verification
    #: Origin of the start that started (or was refused for) this verification.
    start: str | None = None
    #: Origins of later starts with this instance id, already answered ``duplicate``.
    duplicates: list[str] = []
    #: Per ``topic:partition`` of responses and terminates, the last offset applied.
    seen: dict[str, int] = {}


verifications = aggregate_table("verifications")
due = DueIndex()
app.on_partitions_assigned.connect(due.forget_all)
app.on_partitions_revoked.connect(due.forget_all)

inputs = app.topic(names.admitted, names.response, names.terminate, names.tick,
                   names.sms_status, names.rerouted, key_type=bytes, value_type=bytes,
                   key_serializer="raw", value_serializer="raw")
#: The aggregates the batch in progress has changed (status requests read them first).
_inflight: dict[bytes, tuple[int, Stored | None]] = {}


def current(key: bytes) -> Stored | None:
    """The aggregate for ``key`` as this worker knows it now (it must own the partition)."""
    if key in _inflight:
        return _inflight[key][1]
    raw = verifications.read(key, partition_for(key, settings.partitions))
    return Stored.model_validate_json(raw) if raw is not None else None


@app.agent(inputs, concurrency=1)
async def actor(stream: StreamT[bytes]) -> None:
    async for records in batches(stream):
        await Batch().run(records)


class Batch:
    """One batch of records: decided in memory, then written in the safe order."""

    def __init__(self) -> None:
        self.outbox = Outbox()
        self.changed: dict[bytes, tuple[int, Stored | None]] = {}
        self.sms: dict[bytes, int] = {}
        self.forgotten: list[tuple[bytes, int]] = []

    async def run(self, records: Iterable[EventT]) -> None:
        global _inflight
        _inflight = self.changed
        try:
            for event in records:
                try:
                    await self.take(event)
                except (ValidationError, ValueError) as error:
                    await dead_letter(self.outbox, event, describe(error))
            await self.outbox.flush()  # 1. what the batch decided, acknowledged
            await verifications.write({  # 2. the state, changelog first
                key: (partition, None if stored is None else stored.model_dump_json().encode())
                for key, (partition, stored) in self.changed.items()})
            await sent.write({key: (partition, None) for key, partition in self.forgotten})
        finally:
            _inflight = {}
        for key, (partition, stored) in self.changed.items():
            if stored is not None and stored.due is not None:
                due.schedule(partition, stored.due, key)
        sms = Outbox()  # 3. the SMS, now that the verification that answers it is durable
        for key, partition in self.sms.items():
            stored = self.load(key, partition)
            if stored is not None:
                await sms.send(names.sms, key, sms_command(stored.state).to_bytes(),
                               partition=partition)

    # ------------------------------------------------------------ records -> commands

    async def take(self, event: EventT) -> None:
        message = event.message
        topic, key, partition = message.topic, message.key, message.partition
        if topic == names.tick:
            await self.tick(partition, Tick.from_bytes(message.value).now)
            return
        if key is None:
            raise ValueError("record key must be the instance_id (UTF-8)")
        if topic in (names.response, names.terminate) and (
                partition_for(key, settings.partitions) != partition):
            await self.forward(event)
            return
        command, origin, sequence = to_command(event)
        if key != command.instance_id.encode():
            raise ValueError("record key must be the instance_id (UTF-8)")
        await self.apply(key, partition, command, origin, sequence)

    async def forward(self, event: EventT) -> None:
        """Move a record to its instance's partition, with its time and where it came from."""
        message = event.message
        assert message.key is not None
        target = partition_for(message.key, settings.partitions)
        log.info("moving %s[%d]@%d to partition %d (the client's partitioner is not "
                 "murmur2)", message.topic, message.partition, message.offset, target)
        await self.outbox.send(names.rerouted, message.key, message.value, partition=target,
                               timestamp=message.timestamp,
                               headers=[("origin", origin_of(event).encode())])

    # ------------------------------------------------------------ state

    def load(self, key: bytes, partition: int) -> Stored | None:
        if key in self.changed:
            return self.changed[key][1]
        raw = verifications.read(key, partition)
        return Stored.model_validate_json(raw) if raw is not None else None

    def store(self, key: bytes, partition: int, stored: Stored) -> None:
        state = stored.state
        if state.is_empty:
            self.changed[key] = (partition, None)  # nothing left: the instance id is free
            return
        self.changed[key] = (partition, stored.model_copy(update={"due": due_at(state)}))

    async def apply(self, key: bytes, partition: int, command: Command, origin: str | None,
                    sequence: tuple[str, int] | None) -> None:
        stored = self.load(key, partition) or Stored(
            life=origin or "", state=initial_state(command.instance_id))
        if sequence is not None and sequence[1] <= stored.seen.get(sequence[0], -1):
            return  # delivered again after a crash: already applied
        changes: dict[str, object] = {}
        if isinstance(command, Start | Reject):
            if origin == stored.start:
                await self.start_again(key, partition, stored, command)
                return
            if origin in stored.duplicates:
                return
            if stored.state.status == "new":
                changes["start"] = origin
            else:
                changes["duplicates"] = [*stored.duplicates, origin][-DUPLICATES_KEPT:]
                if isinstance(command, Start):  # admitted: give its reservation back
                    await self.settle(command.phone_number, origin, ())
        if sequence is not None:
            changes["seen"] = {**stored.seen, sequence[0]: sequence[1]}
        events = decide(command, stored.state)
        if not events and not changes:
            return
        state = await self.publish(key, partition, stored, events)
        self.store(key, partition, stored.model_copy(update={**changes, "state": state}))

    async def start_again(self, key: bytes, partition: int, stored: Stored,
                          command: Start | Reject) -> None:
        """A start seen before: repeat what its first pass may not have finished, and give
        back attempts admission reserved again for it."""
        state = stored.state
        if state.sms == "requested":
            self.sms[key] = partition  # the first SMS command may have died with the worker
        if isinstance(command, Start) and not state.max_attempts:
            # Refused the first time, admitted now (admission saw it again after its window
            # moved): this verdict's reservation is not used by anything.
            await self.settle(command.phone_number, stored.start or "", ())
        elif state.is_final and state.max_attempts and stored.start:
            await self.settle(state.phone_number or "", stored.start, tuple(state.wrong_at))

    async def tick(self, partition: int, now: datetime) -> None:
        """Expire what is due on this partition; costs time in the number due, not kept."""
        if not due.ready(partition):
            due.build(partition, _due_entries(partition))
        for key in due.pop_due(partition, now.timestamp()):
            stored = self.load(key, partition)
            if stored is None or stored.due is None:
                continue
            if stored.due > now.timestamp():
                due.schedule(partition, stored.due, key)  # its due time moved
            elif stored.state.is_final:
                self.changed[key] = (partition, None)  # retention is over: forget it
                self.forgotten.append((key, partition))
            else:
                command = Expire(instance_id=stored.state.instance_id, at=now)
                state = await self.publish(key, partition, stored,
                                           decide(command, stored.state))
                self.store(key, partition, stored.model_copy(update={"state": state}))

    # ------------------------------------------------------------ outputs

    async def publish(self, key: bytes, partition: int, stored: Stored,
                      events: list[Event]) -> Verification:
        """Send what ``events`` cause, in order; returns the state after them."""
        state = stored.state
        for event in events:
            before, state = state, evolve(state, event)
            record = event.model_dump_json().encode()
            header = json.dumps({"seq": state.version, "life": stored.life})[:-1].encode()
            await self.outbox.send(names.events, key, header + b"," + record[1:],
                                   partition=partition)
            if isinstance(event, Answered):
                await self.outbox.send(names.replies, key, reply_of(event, state).to_bytes(),
                                       partition=partition)
            elif isinstance(event, SmsRequested):
                self.sms[key] = partition
            elif isinstance(event, Dropped):
                await self.drop(key, before, event)
            elif isinstance(event, TERMINAL):
                outcome = outcome_of(state)
                await self.outbox.send(names.outcome, key, outcome.to_bytes(),
                                       partition=partition)
                took = (outcome.completed_at - outcome.created_at).total_seconds()
                log.info("verification %s: %s (%s, %d attempts, %.1f s)", state.instance_id,
                         outcome.status, outcome.reason, outcome.attempts, took)
                if state.max_attempts and stored.start:  # admitted: settle its reservation
                    await self.settle(state.phone_number or "", stored.start,
                                      tuple(state.wrong_at))
        return state

    async def settle(self, phone: str, origin: str, wrong_codes: tuple[datetime, ...]) -> None:
        settle = Settle(phone_number=phone, origin=origin, wrong_codes=wrong_codes)
        await self.outbox.send(names.admission, phone.encode(), settle.to_bytes())

    async def drop(self, key: bytes, state: Verification, dropped: Dropped) -> None:
        """A held command whose start never came: its record goes to the dead letters."""
        held = next(h for h in state.held if h.origin == dropped.origin)
        topic, partition, offset = dropped.origin.rsplit(":", 2)
        grace = settings.early_command_grace_seconds
        dead = letter(topic, int(partition), int(offset), key, held.raw.encode(),
                      f"no verification {held.instance_id} started within {grace:g} s of "
                      f"this {'response' if isinstance(held, Answer) else 'terminate'}")
        await self.outbox.send(names.dead_letter, key, dead.to_bytes())


def to_command(event: EventT) -> tuple[Command, str | None, tuple[str, int] | None]:
    """The command a record asks for, its origin, and its place in its input sequence
    (``topic:partition``, offset) where redeliveries are recognised by offset."""
    message = event.message
    topic, at = message.topic, record_time(event)
    if topic == names.admitted:
        verdict = Admission.from_bytes(message.value)
        return start_command(verdict), verdict.origin, None
    if topic == names.sms_status:
        status = _sms_status(message.value)
        if isinstance(status, SmsSent):
            return ConfirmSms(instance_id=status.instance_id, command_id=status.command_id,
                              at=at), None, None
        return FailSms(instance_id=status.instance_id, command_id=status.command_id,
                       error=status.error, at=at), None, None
    origin = origin_of(event)
    if topic == names.rerouted:
        headers = dict(message.headers or ())
        if "origin" not in headers:
            raise ValueError("a rerouted record needs its origin header")
        origin = bytes(headers["origin"]).decode()
        topic = origin.rsplit(":", 2)[0]
    source, _, offset = origin.rpartition(":")
    return hold_command(topic, message.value, at, origin), origin, (source, int(offset))


def start_command(verdict: Admission) -> Start | Reject:
    iid = verdict.instance_id
    if verdict.verdict != "admitted":
        return Reject(instance_id=iid, reason=verdict.verdict, at=verdict.requested_at,
                      request_id=verdict.request_id, retry_after=verdict.retry_after,
                      detail=verdict.detail)
    code = draw_code(settings.code_key, iid, settings.verification_code_length)
    return Start(instance_id=iid, phone_number=verdict.phone_number or "",
                 code_hash=hash_code(settings.code_key, iid, code), command_id=f"{iid}/sms/1",
                 at=verdict.requested_at, timeout_seconds=settings.verification_timeout_seconds,
                 max_attempts=verdict.attempts, request_id=verdict.request_id)


def hold_command(topic: str, value: bytes | None, at: datetime, origin: str) -> Answer | Stop:
    """A response or terminate; ``raw`` (code removed) is kept in case it waits in vain."""
    raw = redact(topic, value) or b""
    common = {"at": at, "hold_seconds": settings.early_command_grace_seconds,
              "origin": origin, "raw": raw[:4096].decode("utf-8", "replace")}
    if topic == names.response:
        submit = SubmitCode.from_bytes(value)
        return Answer(instance_id=submit.instance_id, request_id=submit.request_id,
                      code_hash=hash_code(settings.code_key, submit.instance_id, submit.code),
                      **common)
    if topic == names.terminate:
        stop = Terminate.from_bytes(value)
        return Stop(instance_id=stop.instance_id, reason=stop.reason or "terminated",
                    request_id=stop.request_id, **common)
    raise ValueError(f"the actor does not read topic {topic}")


def _sms_status(raw: bytes | None) -> SmsSent | SmsFailed:
    try:
        return SmsSent.from_bytes(raw)
    except ValidationError:
        return SmsFailed.from_bytes(raw)


def sms_command(state: Verification) -> SendSms:
    """The SMS command, with the plain code (drawn again: it is stable per instance)."""
    code = draw_code(settings.code_key, state.instance_id, settings.verification_code_length)
    return SendSms(command_id=state.command_id or "", instance_id=state.instance_id,
                   to=state.phone_number or "", body=sms_body(code))


def due_at(state: Verification) -> float | None:
    """When a tick must next look at this verification (epoch seconds), if ever."""
    if state.status == "pending" and state.deadline is not None:
        return state.deadline.timestamp()
    if state.is_final and state.updated_at is not None:
        kept = timedelta(seconds=settings.verification_retention_seconds)
        return (state.updated_at + kept).timestamp()
    if state.held:
        return min(h.at.timestamp() + h.hold_seconds for h in state.held)
    return None


def _due_entries(partition: int) -> list[tuple[float, bytes]]:
    """Every aggregate of the partition that will be due (one scan, after a rebalance)."""
    entries = []
    for key, raw in verifications.items_in(partition):
        when = from_json(raw).get("due")
        if when is not None:
            entries.append((float(when), key))
    return entries

