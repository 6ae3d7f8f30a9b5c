"""The verification actor: folds admitted starts, responses, terminations, ticks and SMS
statuses into the ``verifications`` table through the pure decider.

Per batch of records: parse each record into a command, ``decide``, fold, and collect what it
caused (events, replies, outcomes, settlements for the number's budget, SMS commands, dead
letters of held commands that waited in vain). Then, in this order:

1. the state: one changelog record per changed verification, and first, in each partition,
   an *outbox* record listing what the batch is about to publish from that partition, each
   output tagged with the version its verification has after the batch;
2. the outputs, and the SMS commands (nobody can answer a code before its verification is
   durable).

Outputs are only ever those of decisions that are durable. A crash before step 1 completes
redelivers the batch's records, which are decided again, maybe in another order (records of
different topics arrive in no fixed order), and nothing of the first attempt was published. A
crash after it: the redelivered records are recognised (responses and terminates by their
offset in their original partition, starts by their origin; ticks and SMS statuses change
nothing twice), and the first batch after a restart or a rebalance publishes the partition's
last outbox again, the outputs whose verification's durable version shows their decision
stuck. So copies after a crash are identical, and nothing decided is lost.

Records that a client's partitioner put on another partition than the service's are moved to
their partition first (``verification.rerouted``), before they touch any state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from faust.types import EventT, StreamT
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from phoneverify.agents.app import app, names, settings
from phoneverify.agents.batch import Outbox, aggregate_table, batches, guarded
from phoneverify.agents.deadlines import DueIndex
from phoneverify.agents.records import (
    dead_letter,
    describe,
    letter,
    origin_of,
    record_time,
    redact,
    tick_time,
)
from phoneverify.agents.sender import sent
from phoneverify.agents.transactions import EXACTLY_ONCE
from phoneverify.models.codes import draw_code, hash_code
from phoneverify.models.fraud import ADDRESS, Concluded, Delivered, prefix_of
from phoneverify.models.messages import (
    Admission,
    DeadLetter,
    PhoneDelivery,
    ResendCode,
    RoutedCode,
    SendSms,
    Settle,
    SmsFailed,
    SmsSent,
    SubmitCode,
    Terminate,
)
from phoneverify.models.templates.render import body
from phoneverify.models.verification import (
    MAX_HELD,
    TERMINAL,
    Answer,
    Answered,
    Command,
    ConfirmSms,
    Deliver,
    DeliveryAsked,
    Dropped,
    Event,
    Expire,
    FailSms,
    Held,
    Reject,
    Resend,
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
from phoneverify.ops import metrics
from phoneverify.topics import partition_for

log = logging.getLogger("phoneverify")
DUPLICATES_KEPT = 16
#: A table key no instance id can be (``#`` is not in their alphabet): a partition's outbox.
OUTBOX = b"#outbox/"
#: In an outbox, the topic that stands for "the SMS command for this verification" (the
#: command carries the plain code, so it is drawn again when sent, never stored).
SMS_MARK = "#sms"


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


#: One output: topic, record key, value, partition; then the verification it comes from and
#: the version that verification has once the decision that caused it is durable.
Output = tuple[str, str, str, int, str, int]

verifications = aggregate_table("verifications")
due = DueIndex()
#: Partitions whose last outbox this worker has published again since they were assigned.
_republished: set[int] = set()
#: Partitions whose outbox, as last written by this worker, is not empty.
_outbox_full: set[int] = set()
#: Pending and kept verifications per partition (counted when its due index is built).
_pending: dict[int, int] = {}
_kept: dict[int, int] = {}


def _reassigned(*args: Any, **kwargs: Any) -> None:
    due.forget_all()
    _republished.clear()
    _outbox_full.clear()
    _pending.clear()
    _kept.clear()
    metrics.pending.set(0)
    metrics.kept.set(0)


app.on_partitions_assigned.connect(_reassigned)
app.on_partitions_revoked.connect(_reassigned)

inputs = app.topic(names.admitted, names.response, names.terminate, names.tick,
                   names.sms_status, names.rerouted, names.resend, key_type=bytes, value_type=bytes,
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
        await guarded("actor", Batch().run(records))


class Batch:
    """One batch of records: decided in memory, then written in the safe order."""

    def __init__(self) -> None:
        self.changed: dict[bytes, tuple[int, Stored | None]] = {}
        self.outputs: dict[int, list[Output]] = defaultdict(list)
        self.stateless = Outbox()  # dead letters of bad records, forwards: no state involved
        self.written_outboxes: set[int] = set()
        #: Whether this batch's outbox records list its outputs (not under exactly once).
        self.outputs_kept = True
        #: For the metrics, once published: (kind, label, record time of the command).
        self.published: list[tuple[str, str, float | None]] = []
        #: Dead letters of commands refused without a change of state.
        self.refused: list[DeadLetter] = []

    async def run(self, records: Iterable[EventT]) -> None:
        global _inflight
        _inflight = self.changed
        try:
            records = list(records)
            for partition in {event.message.partition for event in records} - _republished:
                self.republish(partition)
                if not due.ready(partition):  # and count its pending and kept verifications
                    due.build(partition, await _due_entries(partition))
            for event in records:
                try:
                    await self.take(event)
                except (ValidationError, ValueError, OverflowError) as error:
                    await dead_letter(self.stateless, event, describe(error))
            await verifications.write(self.writes())  # 1. the state, and what it publishes
            await sent.write({key: (partition, None) for key, (partition, stored)
                              in self.changed.items() if stored is None})
        finally:
            _inflight = {}
        for key, (partition, stored) in self.changed.items():
            if stored is not None and stored.due is not None:
                due.schedule(partition, stored.due, key)
        outbox = self.stateless  # 2. the outputs, the SMS among them
        for dead in self.refused:
            await outbox.send(names.dead_letter, dead.key.encode() if dead.key else None,
                              dead.to_bytes())
        for outputs in self.outputs.values():
            for topic, key, value, target, _iid, _version in outputs:
                if topic == SMS_MARK:
                    stored = self.load(key.encode(), target)
                    if stored is None:
                        continue
                    topic, value = names.sms, sms_command(stored.state,
                                                          value).model_dump_json()
                await outbox.send(topic, key.encode(), value.encode(), partition=target)
        await outbox.flush()
        _outbox_full.difference_update(self.written_outboxes)
        if self.outputs_kept:
            _outbox_full.update(p for p, outputs in self.outputs.items() if outputs)
        self.count()

    def count(self) -> None:
        """The metrics of what this batch published (now acknowledged by Kafka)."""
        now = time.time()
        for kind, label, since in self.published:
            if kind == "outcome":
                metrics.outcomes.labels(label).inc()
                if since is not None:
                    metrics.response_to_outcome.observe(max(0.0, now - since))
            elif kind == "reply":
                metrics.replies.labels(label).inc()
            else:  # the latency of a reply to a command
                metrics.reply_latency.labels(label).observe(max(0.0, now - (since or now)))
        metrics.pending.set(sum(_pending.values()))
        metrics.kept.set(sum(_kept.values()))

    def writes(self) -> dict[bytes, tuple[int, bytes | None]]:
        """Each partition's outbox first, then the states (see the module's docstring). An
        outbox this worker left full is emptied: its outputs went out with its batch."""
        writes: dict[bytes, tuple[int, bytes | None]] = {}
        if EXACTLY_ONCE:  # the outputs commit with the state: no outbox (an old one emptied)
            self.written_outboxes, self.outputs_kept = set(_outbox_full), False
        else:
            self.written_outboxes = set(self.outputs) | _outbox_full
        for partition in sorted(self.written_outboxes):
            outputs = self.outputs.get(partition, []) if self.outputs_kept else []
            writes[OUTBOX + str(partition).encode()] = (
                partition, zlib.compress(json.dumps(outputs).encode(), 1))
        for key, (partition, stored) in self.changed.items():
            writes[key] = (partition, None if stored is None
                           else stored.model_dump_json().encode())
        return writes

    def republish(self, partition: int) -> None:
        """The partition's last outbox again: the outputs whose decision is durable."""
        _republished.add(partition)
        raw = verifications.read(OUTBOX + str(partition).encode(), partition)
        if not raw:
            return
        outputs = json.loads(zlib.decompress(raw))
        if outputs:
            _outbox_full.add(partition)  # emptied by the next write (under exactly once)
        versions: dict[str, int] = {}
        for output in outputs:
            iid = output[4]
            if iid not in versions:
                stored = self.load(iid.encode(), partition)
                versions[iid] = -1 if stored is None else stored.state.version
            if versions[iid] >= output[5]:
                self.outputs[partition].append(tuple(output))  # type: ignore[arg-type]
        log.info("partition %d: published its last outbox again (%d of %d outputs durable)",
                 partition, len(self.outputs[partition]), len(outputs))

    # ------------------------------------------------------------ records -> commands

    async def take(self, event: EventT) -> None:
        message = event.message
        topic, key, partition = message.topic, message.key, message.partition
        if topic == names.tick:
            self.tick(partition, tick_time(event))
            return
        if key is None:
            raise ValueError("record key must be the instance_id (UTF-8)")
        if topic in (names.response, names.terminate, names.resend) and (
                partition_for(key, settings.partitions) != partition):
            await self.forward(event)
            return
        command, origin, sequence = to_command(event)
        if key != command.instance_id.encode():
            raise ValueError("record key must be the instance_id (UTF-8)")
        self.apply(key, partition, command, origin, sequence)

    async def forward(self, event: EventT) -> None:
        """Move a record to its instance's partition, with its time and where it came from."""
        message = event.message
        assert message.key is not None
        metrics.misrouted.labels(message.topic.removeprefix(names.prefix)).inc()
        target = partition_for(message.key, settings.partitions)
        log.info("moving %s[%d]@%d to partition %d (the client's partitioner is not "
                 "murmur2)", message.topic, message.partition, message.offset, target)
        value = message.value
        if message.topic == names.response:  # the code travels on as its keyed hash only
            submit = SubmitCode.from_bytes(value)  # a bad one is a dead letter here
            value = RoutedCode(instance_id=submit.instance_id, request_id=submit.request_id,
                               code_hash=hash_code(settings.code_key, submit.instance_id,
                                                   submit.code)).to_bytes()
        await self.stateless.send(names.rerouted, message.key, value, partition=target,
                                  timestamp=message.timestamp,
                                  headers=[("origin", origin_of(event).encode())])

    # ------------------------------------------------------------ state

    def load(self, key: bytes, partition: int) -> Stored | None:
        if key in self.changed:
            return self.changed[key][1]
        raw = verifications.read(key, partition)
        return Stored.model_validate_json(raw) if raw is not None else None

    def store(self, key: bytes, partition: int, stored: Stored | None) -> None:
        """Keep ``stored`` for ``key`` (``None``: forget it), counting what changes."""
        before = self.load(key, partition)
        if partition in _pending:
            pending = stored is not None and stored.state.status == "pending"
            _pending[partition] += pending - (before is not None
                                              and before.state.status == "pending")
            _kept[partition] += (stored is not None) - (before is not None)
        if stored is not None:
            stored = stored.model_copy(update={"due": due_at(stored.state)})
        self.changed[key] = (partition, stored)

    def apply(self, key: bytes, partition: int, command: Command, origin: str | None,
              sequence: tuple[str, int] | None) -> None:
        stored = self.load(key, partition) or Stored(
            life=origin or "", state=initial_state(command.instance_id))
        if sequence is not None and sequence[1] <= stored.seen.get(sequence[0], -1):
            return  # delivered again after a crash: already applied
        changes: dict[str, object] = {}
        if isinstance(command, Start | Reject):
            if origin == stored.start:
                self.start_again(partition, stored, command)
                return
            if origin in stored.duplicates:
                return
            if stored.state.status == "new":
                changes["start"] = origin
            else:
                changes["duplicates"] = [*stored.duplicates, origin][-DUPLICATES_KEPT:]
                if isinstance(command, Start):  # admitted: give its reservation back
                    self.settle(partition, stored.state, origin or "", command.phone_number, ())
        if sequence is not None:
            changes["seen"] = {**stored.seen, sequence[0]: sequence[1]}
        events = decide(command, stored.state)
        if isinstance(command, Answer | Stop | Resend) and stored.state.status == "new" and not any(
                isinstance(event, Held) for event in events):
            self.refuse(command, f"more than {MAX_HELD} commands wait for the start of "
                                 f"{command.instance_id}: this one is not kept")
        if not events and not changes:
            return
        state = self.publish(key, partition, stored, events, command)
        self.store(key, partition, stored.model_copy(update={**changes, "state": state}))

    def start_again(self, partition: int, stored: Stored, command: Start | Reject) -> None:
        """A start seen before: give back attempts admission reserved for it once more."""
        state = stored.state
        if isinstance(command, Start) and not state.max_attempts:
            # Refused the first time, admitted now (admission saw it again after its window
            # moved): this verdict's reservation is not used by anything.
            self.settle(partition, state, stored.start or "", command.phone_number, ())
        elif state.is_final and state.max_attempts and stored.start:
            # Admission may have reserved again for a start it saw twice: settle once more.
            self.settle(partition, state, stored.start, state.phone_number or "",
                        state.wrong_at)

    def tick(self, partition: int, now: datetime) -> None:
        """Expire what is due on this partition; costs time in the number due, not kept.
        (The partition's due index was built when the batch began.)"""
        for key in due.pop_due(partition, now.timestamp()):
            stored = self.load(key, partition)
            if stored is None or stored.due is None:
                continue
            if stored.due > now.timestamp():
                due.schedule(partition, stored.due, key)  # its due time moved
            elif stored.state.is_final or stored.state.is_empty:
                self.store(key, partition, None)  # retention is over: forget it
            else:
                command = Expire(instance_id=stored.state.instance_id, at=now)
                state = self.publish(key, partition, stored, decide(command, stored.state),
                                     command)
                self.store(key, partition, stored.model_copy(update={"state": state}))

    # ------------------------------------------------------------ outputs

    def output(self, partition: int, topic: str, value: str, state: Verification,
               key: str | None = None, target: int | None = None) -> None:
        """Publish ``value`` after the batch's state is durable: keyed by the verification's
        id, in its partition, unless ``key`` and ``target`` say otherwise."""
        iid = state.instance_id
        self.outputs[partition].append((topic, key or iid, value,
                                        partition if target is None else target, iid,
                                        state.version))

    def publish(self, key: bytes, partition: int, stored: Stored, events: list[Event],
                cause: Command) -> Verification:
        """Collect what ``events`` (decided on ``cause``) cause, in order; returns the state
        after them."""
        state = stored.state
        for event in events:
            before, state = state, evolve(state, event)
            record = event.model_dump_json()
            header = json.dumps({"seq": state.version, "life": stored.life})[:-1]
            self.output(partition, names.events, header + "," + record[1:], state)
            if isinstance(event, Answered):
                self.output(partition, names.replies, reply_of(event, state).model_dump_json(),
                            state)
                self.published.append(("reply", event.result, None))
                if event.result != "unknown":  # an unknown one waited out its grace
                    self.published.append(("latency", event.command, event.at.timestamp()))
            elif isinstance(event, SmsRequested):
                self.output(partition, SMS_MARK, event.command_id, state)
                self.guard(partition, state, Delivered(
                    instance_id=state.instance_id, phone_number=state.phone_number or "",
                    at=event.at))
            elif isinstance(event, DeliveryAsked):  # a resend or fallback: rule 9 counts it
                self.ask_delivery(partition, state, event)
            elif isinstance(event, Dropped):
                self.drop(partition, before, event, state)
            elif isinstance(event, TERMINAL):
                outcome = outcome_of(state)
                self.output(partition, names.outcome, outcome.model_dump_json(), state)
                self.published.append(("outcome", outcome.reason, event.at.timestamp()
                                       if isinstance(cause, Answer) else None))
                took = (outcome.completed_at - outcome.created_at).total_seconds()
                log.info("verification %s: %s (%s, %d attempt%s, %.1f s)", state.instance_id,
                         outcome.status, outcome.reason, outcome.attempts,
                         "" if outcome.attempts == 1 else "s", took,
                         extra={"instance_id": state.instance_id, "status": outcome.status,
                                "reason": outcome.reason, "attempts": outcome.attempts,
                                "duration_s": round(took, 3)})
                if state.max_attempts and stored.start:  # admitted: settle its reservation
                    self.settle(partition, state, stored.start, state.phone_number or "",
                                state.wrong_at)
                if state.sms != "none":  # its deliveries are judged
                    self.guard(partition, state, Concluded(
                        instance_id=state.instance_id, phone_number=state.phone_number or "",
                        verified=state.status == "verified", at=event.at))
        return state

    def ask_delivery(self, partition: int, state: Verification, event: DeliveryAsked) -> None:
        """Ask the number's admission (rule 9) whether the delivery may go out; a resend that
        names its client's address asks the fraud guard's stage first (rule 20)."""
        phone = state.phone_number or ""
        ask = PhoneDelivery(instance_id=state.instance_id, phone_number=phone,
                            requested_at=event.at, origin=event.origin,
                            client_ip=event.client_ip)
        key = phone
        topic = names.admission
        if event.client_ip is not None and settings.http_starts_per_ip:
            key, topic = ADDRESS + event.client_ip, names.guard
        self.output(partition, topic, ask.model_dump_json(), state, key=key,
                    target=partition_for(key.encode(), settings.partitions))

    def guard(self, partition: int, state: Verification, signal: Delivered | Concluded) -> None:
        """Tell the fraud guard about a delivery or a conclusion (keyed by the prefix)."""
        if not settings.fraud_guard or not signal.phone_number:
            return
        prefix = prefix_of(signal.phone_number)
        self.output(partition, names.guard, signal.model_dump_json(), state, key=prefix,
                    target=partition_for(prefix.encode(), settings.partitions))

    def settle(self, partition: int, state: Verification, origin: str, phone: str,
               wrong_codes: tuple[datetime, ...]) -> None:
        """Tell the number's admission what the start ``origin`` spent; idempotent there."""
        settle = Settle(phone_number=phone, origin=origin, wrong_codes=wrong_codes)
        self.output(partition, names.admission, settle.model_dump_json(), state, key=phone,
                    target=partition_for(phone.encode(), settings.partitions))

    def refuse(self, command: Answer | Stop | Resend, why: str) -> None:
        """A command not kept: its record goes to the dead letters (it comes again, identical,
        if a crash makes the batch run again)."""
        topic, source, offset = command.origin.rsplit(":", 2)
        dead = letter(topic, int(source), int(offset), command.instance_id.encode(),
                      command.raw.encode(), why)
        self.refused.append(dead)

    def drop(self, partition: int, state: Verification, dropped: Dropped,
             after: Verification) -> None:
        """A held command whose start never came: its record goes to the dead letters."""
        held = next(h for h in state.held if h.origin == dropped.origin)
        topic, source, offset = dropped.origin.rsplit(":", 2)
        grace = settings.early_command_grace_seconds
        dead = letter(topic, int(source), int(offset), held.instance_id.encode(),
                      held.raw.encode(),
                      f"no verification {held.instance_id} started within {grace:g} s of "
                      f"this {_NAMES[held.kind]}", level=logging.INFO)  # answered unknown
        self.output(partition, names.dead_letter, dead.model_dump_json(), after)


def to_command(event: EventT) -> tuple[Command, str | None, tuple[str, int] | None]:
    """The command a record asks for, its origin, and its place in its input sequence
    (``topic:partition``, offset) where redeliveries are recognised by offset."""
    message = event.message
    topic, at = message.topic, record_time(event)
    if topic == names.admitted:
        verdict = Admission.from_bytes(message.value)
        if verdict.kind == "delivery":  # the number's word on a resend or fallback
            return Deliver(instance_id=verdict.instance_id, origin=verdict.origin,
                           admitted=verdict.verdict == "admitted", at=verdict.requested_at,
                           retry_after=verdict.retry_after,
                           blocked=verdict.detail if verdict.verdict == "blocked_number"
                           else "", detail=verdict.detail if verdict.verdict == "rate_limited"
                           else ""), None, None
        return start_command(verdict), verdict.origin, None
    if topic == names.sms_status:
        status = _sms_status(message.value)
        if isinstance(status, SmsSent):
            return ConfirmSms(instance_id=status.instance_id, command_id=status.command_id,
                              at=at, receipt=status.receipt == "delivered"), None, None
        return FailSms(instance_id=status.instance_id, command_id=status.command_id,
                       error=status.error, at=at), None, None
    origin = origin_of(event)
    routed = topic == names.rerouted
    if routed:
        headers = dict(message.headers or ())
        if "origin" not in headers:
            raise ValueError("a rerouted record needs its origin header")
        origin = bytes(headers["origin"]).decode()
        topic = origin.rsplit(":", 2)[0]
    source, _, offset = origin.rpartition(":")
    command = hold_command(topic, message.value, at, origin, routed)
    return command, origin, (source, int(offset))


def start_command(verdict: Admission) -> Start | Reject:
    iid = verdict.instance_id
    if verdict.verdict != "admitted":
        return Reject(instance_id=iid, reason=verdict.verdict, at=verdict.requested_at,
                      request_id=verdict.request_id, retry_after=verdict.retry_after,
                      detail=verdict.detail)
    code = draw_code(settings.code_key, iid, settings.verification_code_length)
    return Start(instance_id=iid, phone_number=verdict.phone_number or "",
                 code_hash=hash_code(settings.code_key, iid, code),
                 command_id=f"{iid}/{verdict.channel}/1", at=verdict.requested_at,
                 timeout_seconds=settings.verification_timeout_seconds,
                 max_attempts=verdict.attempts, request_id=verdict.request_id,
                 locale=verdict.locale, channel=verdict.channel, channels=verdict.channels,
                 fallback=settings.fallback, resend_limit=settings.resend_limit,
                 resend_interval=settings.resend_interval_seconds)


def hold_command(topic: str, value: bytes | None, at: datetime, origin: str,
                 routed: bool = False) -> Answer | Stop | Resend:
    """A response or terminate (``routed``: as the actor moved it, the code hashed); ``raw``
    (code removed) is kept in case it waits in vain."""
    raw = redact(topic, value) or b""
    common = {"at": at, "hold_seconds": settings.early_command_grace_seconds,
              "origin": origin, "raw": raw[:4096].decode("utf-8", "replace")}
    if topic == names.response and routed:
        code = RoutedCode.from_bytes(value)
        return Answer(instance_id=code.instance_id, request_id=code.request_id,
                      code_hash=code.code_hash, **common)
    if topic == names.response:
        submit = SubmitCode.from_bytes(value)
        return Answer(instance_id=submit.instance_id, request_id=submit.request_id,
                      code_hash=hash_code(settings.code_key, submit.instance_id, submit.code),
                      **common)
    if topic == names.resend:
        resend = ResendCode.from_bytes(value)
        return Resend(instance_id=resend.instance_id, channel=resend.channel,
                      request_id=resend.request_id, client_ip=resend.client_ip, **common)
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


def sms_command(state: Verification, command_id: str = "") -> SendSms:
    """The delivery command ``command_id`` (the last one if not given), with the plain code
    (drawn again: it is stable per instance, so every delivery carries the same code), over
    its channel, in the verification's locale (rule 18; WebOTP line, rule 19)."""
    command_id = command_id or state.command_id or ""
    channel = next((d.channel for d in state.deliveries if d.command_id == command_id), "sms")
    code = draw_code(settings.code_key, state.instance_id, settings.verification_code_length)
    template = settings.templates.get(state.locale, settings.locale)
    text = body(template, channel, code, settings.app_name, settings.minutes,
                settings.web_otp_domain)
    return SendSms(command_id=command_id, instance_id=state.instance_id,
                   to=state.phone_number or "", body=text, locale=template.locale,
                   channel=channel)


_NAMES = {"answer": "response", "stop": "terminate", "resend": "resend"}


def due_at(state: Verification) -> float | None:
    """When a tick must next look at this verification (epoch seconds), if ever."""
    if state.is_empty:  # its held commands were dropped: forget it at the next tick
        return state.updated_at.timestamp() if state.updated_at else 0.0
    if state.status == "pending" and state.deadline is not None:
        return state.deadline.timestamp()
    if state.is_final and state.updated_at is not None:
        kept = timedelta(seconds=settings.verification_retention_seconds)
        return (state.updated_at + kept).timestamp()
    if state.held:
        return min(h.at.timestamp() + h.hold_seconds for h in state.held)
    return None


async def _due_entries(partition: int) -> list[tuple[float, bytes]]:
    """Every aggregate of the partition that will be due (one scan, after a rebalance; it lets
    the event loop run every few thousand, so the worker keeps answering meanwhile)."""
    entries, pending, kept = [], 0, 0
    for n, (key, raw) in enumerate(verifications.items_in(partition), start=1):
        if n % 5000 == 0:
            await asyncio.sleep(0)
        if key.startswith(OUTBOX):
            continue
        stored = from_json(raw)
        when = stored.get("due")
        if when is not None:
            entries.append((float(when), key))
        pending += stored["state"]["status"] == "pending"
        kept += 1
    _pending[partition], _kept[partition] = pending, kept
    return entries

