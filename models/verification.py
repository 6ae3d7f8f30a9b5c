"""The verification aggregate: commands, events, state, ``decide`` and ``evolve``. The whole domain.

A pure decider: no I/O, no clock, no randomness. The code is drawn outside and arrives as its
keyed hash in the command; time arrives in the command (record timestamps, ticks). The seed's
rules: one SMS per start, a window of ``timeout`` from the start record's time, ``max_attempts``
tries, then exactly one conclusion (verified, failed or terminated) and nothing after it.

    state  = reduce(evolve, events, initial_state(instance_id))
    events = decide(command, state)
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from datetime import datetime, timedelta
from functools import reduce
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from phoneverify.models.messages import InstanceId, OutcomeReason, UtcTime

Status = Literal["new", "pending", "verified", "failed", "terminated"]
FINAL: frozenset[Status] = frozenset({"verified", "failed", "terminated"})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------- commands (what is asked)


class Start(_Frozen):
    """Open a verification; ``code_hash`` is the keyed hash of the code the SMS will carry."""

    kind: Literal["start"] = "start"
    instance_id: InstanceId
    phone_number: str
    code_hash: str
    command_id: str
    at: UtcTime
    timeout_seconds: float
    max_attempts: int


class Reject(_Frozen):
    """A start refused before it reached the actor (bad phone number, rate limit)."""

    kind: Literal["reject"] = "reject"
    instance_id: InstanceId
    reason: Literal["invalid_phone_number", "rate_limited"]
    at: UtcTime


class Answer(_Frozen):
    """A code sent back by the person, as its keyed hash."""

    kind: Literal["answer"] = "answer"
    instance_id: InstanceId
    code_hash: str
    at: UtcTime


class Stop(_Frozen):
    kind: Literal["stop"] = "stop"
    instance_id: InstanceId
    reason: str
    at: UtcTime


class Expire(_Frozen):
    """Sent for a verification whose deadline a tick has passed."""

    kind: Literal["expire"] = "expire"
    instance_id: InstanceId
    at: UtcTime


class ConfirmSms(_Frozen):
    kind: Literal["confirm_sms"] = "confirm_sms"
    instance_id: InstanceId
    command_id: str
    at: UtcTime


class FailSms(_Frozen):
    kind: Literal["fail_sms"] = "fail_sms"
    instance_id: InstanceId
    command_id: str
    error: str
    at: UtcTime


Command = Start | Reject | Answer | Stop | Expire | ConfirmSms | FailSms


# ---------------------------------------------------------------- events (what happened)


class Started(_Frozen):
    type: Literal["started"] = "started"
    instance_id: InstanceId
    phone_number: str
    code_hash: str
    created_at: UtcTime
    deadline: UtcTime
    max_attempts: int
    at: UtcTime


class SmsRequested(_Frozen):
    type: Literal["sms_requested"] = "sms_requested"
    instance_id: InstanceId
    command_id: str
    at: UtcTime


class SmsDelivered(_Frozen):
    type: Literal["sms_delivered"] = "sms_delivered"
    instance_id: InstanceId
    command_id: str
    at: UtcTime


class CodeRejected(_Frozen):
    type: Literal["code_rejected"] = "code_rejected"
    instance_id: InstanceId
    attempts: int
    at: UtcTime


class Verified(_Frozen):
    type: Literal["verified"] = "verified"
    instance_id: InstanceId
    attempts: int
    at: UtcTime


class Failed(_Frozen):
    type: Literal["failed"] = "failed"
    instance_id: InstanceId
    reason: Literal["expired", "too_many_attempts", "invalid_phone_number",
                    "sms_undeliverable", "rate_limited"]
    attempts: int
    at: UtcTime
    detail: str = ""


class Terminated(_Frozen):
    type: Literal["terminated"] = "terminated"
    instance_id: InstanceId
    reason: str
    attempts: int
    at: UtcTime


Event = Annotated[
    Started | SmsRequested | SmsDelivered | CodeRejected | Verified | Failed | Terminated,
    Field(discriminator="type"),
]
TERMINAL = (Verified, Failed, Terminated)


# ---------------------------------------------------------------- state


class Verification(_Frozen):
    """Everything known about one verification; ``version`` counts the events folded in."""

    instance_id: InstanceId
    status: Status = "new"
    phone_number: str | None = None
    code_hash: str | None = None
    command_id: str | None = None
    sms: Literal["none", "requested", "delivered"] = "none"
    created_at: UtcTime | None = None
    deadline: UtcTime | None = None
    max_attempts: int = 0
    attempts: int = 0
    reason: OutcomeReason | None = None
    detail: str = ""
    updated_at: UtcTime | None = None
    version: int = 0

    @property
    def is_final(self) -> bool:
        return self.status in FINAL


def initial_state(instance_id: str) -> Verification:
    return Verification(instance_id=instance_id)


# ---------------------------------------------------------------- decide


def decide(command: Command, state: Verification) -> list[Event]:
    """The events that ``command`` causes in ``state``; ``[]`` when it changes nothing."""
    iid, at = command.instance_id, command.at
    if state.is_final:
        return []  # exactly one conclusion, ever; a replayed or late command changes nothing
    match command:
        case Start() if state.status == "new":
            deadline = at + timedelta(seconds=command.timeout_seconds)
            return [
                Started(instance_id=iid, phone_number=command.phone_number,
                        code_hash=command.code_hash, created_at=at, deadline=deadline,
                        max_attempts=command.max_attempts, at=at),
                SmsRequested(instance_id=iid, command_id=command.command_id, at=at),
            ]
        case Reject() if state.status == "new":
            return [Failed(instance_id=iid, reason=command.reason, attempts=0, at=at)]
        case Start() | Reject():
            return []  # a second start for a used instance_id sends nothing
    if state.status == "new":
        if isinstance(command, Stop):  # terminated before its start arrived: it never runs
            return [Terminated(instance_id=iid, reason=command.reason, attempts=0, at=at)]
        return []  # nothing to answer or expire yet
    assert state.deadline is not None and state.code_hash is not None
    match command:
        case Answer() if at >= state.deadline:
            return [_failed(state, "expired", at)]
        case Answer() if hmac.compare_digest(command.code_hash, state.code_hash):
            return [Verified(instance_id=iid, attempts=state.attempts + 1, at=at)]
        case Answer():
            attempts = state.attempts + 1
            rejected = CodeRejected(instance_id=iid, attempts=attempts, at=at)
            if attempts >= state.max_attempts:
                return [rejected, Failed(instance_id=iid, reason="too_many_attempts",
                                         attempts=attempts, at=at)]
            return [rejected]
        case Stop():
            return [Terminated(instance_id=iid, reason=command.reason,
                               attempts=state.attempts, at=at)]
        case Expire() if at >= state.deadline:
            return [_failed(state, "expired", at)]
        case ConfirmSms() if command.command_id == state.command_id and state.sms == "requested":
            return [SmsDelivered(instance_id=iid, command_id=command.command_id, at=at)]
        case FailSms() if command.command_id == state.command_id:
            return [_failed(state, "sms_undeliverable", at, command.error)]
    return []


def _failed(state: Verification, reason: str, at: datetime, detail: str = "") -> Failed:
    return Failed(instance_id=state.instance_id, reason=reason, attempts=state.attempts,
                  at=at, detail=detail)


# ---------------------------------------------------------------- evolve


def evolve(state: Verification, event: Event) -> Verification:
    """The state after ``event``: a plain fold, no decisions."""
    changes: dict[str, object] = {"version": state.version + 1, "updated_at": event.at}
    match event:
        case Started():
            changes |= {"status": "pending", "phone_number": event.phone_number,
                        "code_hash": event.code_hash, "created_at": event.created_at,
                        "deadline": event.deadline, "max_attempts": event.max_attempts}
        case SmsRequested():
            changes |= {"sms": "requested", "command_id": event.command_id}
        case SmsDelivered():
            changes |= {"sms": "delivered"}
        case CodeRejected():
            changes |= {"attempts": event.attempts}
        case Verified():
            changes |= {"status": "verified", "reason": "code_matched",
                        "attempts": event.attempts}
        case Failed():
            changes |= {"status": "failed", "reason": event.reason, "attempts": event.attempts,
                        "detail": event.detail}
        case Terminated():
            changes |= {"status": "terminated", "reason": "terminated",
                        "attempts": event.attempts, "detail": event.reason}
    if event.type in ("verified", "failed", "terminated") and state.created_at is None:
        changes["created_at"] = event.at  # a start refused upstream concludes at once
    return state.model_copy(update=changes)


def fold(state: Verification, events: Iterable[Event]) -> Verification:
    return reduce(evolve, events, state)
