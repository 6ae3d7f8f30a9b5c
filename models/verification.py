"""The verification aggregate: commands, events, state, ``decide`` and ``evolve``. The whole domain.

A pure decider: no I/O, no clock, no randomness. The code is drawn outside and arrives as its
keyed hash in the command; time arrives in the command (record timestamps, ticks). The seed's
rules: one SMS per start, a window of ``timeout`` from the start record's time, ``max_attempts``
tries, then exactly one conclusion (verified, failed or terminated) and nothing after it.

Resends, channels and fallbacks (rules 15-17) are commands and events of this same aggregate:
a resend is checked here (its interval and limit, its channel) and then *asked* of the number's
admission (rule 9 counts every delivery), whose verdict comes back as :class:`Deliver`; a
delivery that fails for good asks for the next channel of the fallback list the same way.
Every delivery is one ``SmsRequested`` naming its channel and why it went out.

Two additions of the contract live here too. A response or terminate that arrives before its
start is *held* (it overtook the start, which takes more hops) and applied, in arrival order,
when the start is decided; past its grace it is dropped. And every command that carries a
``request_id`` is *answered* exactly once, by an :class:`Answered` event, when it is decided:
the agent turns those into ``Reply`` records (:func:`reply_of`).

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

from phoneverify.models.messages import (
    CHANNELS,
    Channel,
    ChannelChoice,
    CommandName,
    InstanceId,
    Outcome,
    OutcomeReason,
    RefusalReason,
    Reply,
    ReplyResult,
    RequestId,
    UtcTime,
)

Status = Literal["new", "pending", "verified", "failed", "terminated"]
FINAL: frozenset[Status] = frozenset({"verified", "failed", "terminated"})
#: Most commands held for one start: a person sends a few codes, and perhaps a terminate;
#: more is someone filling the state (they are answered ``unknown`` at once).
MAX_HELD = 16


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
    request_id: RequestId | None = None
    #: The locale of its messages, chosen at intake (rule 18).
    locale: str | None = None
    #: The first delivery's channel; the offered channels the number may use; the fallback
    #: list; the resend limit and interval (rules 15-17, from settings).
    channel: Channel = "sms"
    channels: tuple[Channel, ...] = CHANNELS
    fallback: tuple[Channel, ...] = ()
    resend_limit: int = 4
    resend_interval: float = 30.0


class Reject(_Frozen):
    """A start refused before it reached the actor (number policy, rate limit, guess budget)."""

    kind: Literal["reject"] = "reject"
    instance_id: InstanceId
    reason: RefusalReason | Literal["channel_unavailable"]
    at: UtcTime
    request_id: RequestId | None = None
    retry_after: float | None = None
    detail: str = ""


class Answer(_Frozen):
    """A code sent back by the person, as its keyed hash.

    ``hold_seconds`` is how long it may wait for a start that has not arrived yet; ``origin``
    and ``raw`` (the record, code removed) say where it came from if it is dropped unapplied.
    """

    kind: Literal["answer"] = "answer"
    instance_id: InstanceId
    code_hash: str
    at: UtcTime
    request_id: RequestId | None = None
    hold_seconds: float = 0.0
    origin: str = ""
    raw: str = ""


class Stop(_Frozen):
    kind: Literal["stop"] = "stop"
    instance_id: InstanceId
    reason: str
    at: UtcTime
    request_id: RequestId | None = None
    hold_seconds: float = 0.0
    origin: str = ""
    raw: str = ""


class Resend(_Frozen):
    """The same code again (rule 15), over ``channel`` (``None``: the channel used last)."""

    kind: Literal["resend"] = "resend"
    instance_id: InstanceId
    channel: ChannelChoice | None = None
    at: UtcTime
    request_id: RequestId | None = None
    hold_seconds: float = 0.0
    origin: str = ""
    raw: str = ""
    #: The person's client address: the delivery counts against its limit (rule 20).
    client_ip: str | None = None


class Deliver(_Frozen):
    """The number's admission on the delivery asked as ``origin``: admitted, or not."""

    kind: Literal["deliver"] = "deliver"
    instance_id: InstanceId
    origin: str
    admitted: bool
    at: UtcTime
    retry_after: float | None = None
    #: Refused by a fraud block in force (rule 20): the refusal in words; else empty.
    blocked: str = ""
    #: Refused as rate limited: why, in words, when not the number's own limit (rule 20:
    #: its client address asked for too many).
    detail: str = ""


class Expire(_Frozen):
    """Time has passed (a tick): the deadline, and the grace of held commands, are checked."""

    kind: Literal["expire"] = "expire"
    instance_id: InstanceId
    at: UtcTime


class ConfirmSms(_Frozen):
    """The provider accepted the SMS, or (``receipt``) reported it delivered to the phone."""

    kind: Literal["confirm_sms"] = "confirm_sms"
    instance_id: InstanceId
    command_id: str
    at: UtcTime
    receipt: bool = False


class FailSms(_Frozen):
    kind: Literal["fail_sms"] = "fail_sms"
    instance_id: InstanceId
    command_id: str
    error: str
    at: UtcTime


Command = Start | Reject | Answer | Stop | Resend | Deliver | Expire | ConfirmSms | FailSms
Holdable = Annotated[Answer | Stop | Resend, Field(discriminator="kind")]
#: Why a delivery went out.
Because = Literal["start", "resend", "fallback"]


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
    locale: str | None = None
    channels: tuple[Channel, ...] = CHANNELS
    fallback: tuple[Channel, ...] = ()
    resend_limit: int = 4
    resend_interval: float = 30.0


class SmsRequested(_Frozen):
    """A delivery of the code (any channel; the name is the first round's): ``reason`` says
    why it goes out, ``detail`` for a fallback which delivery failed and how."""

    type: Literal["sms_requested"] = "sms_requested"
    instance_id: InstanceId
    command_id: str
    at: UtcTime
    channel: Channel = "sms"
    reason: Because = "start"
    detail: str = ""


class DeliveryAsked(_Frozen):
    """A resend or fallback passed the verification's own checks; the number's admission
    (rule 9) is asked whether it may go out."""

    type: Literal["delivery_asked"] = "delivery_asked"
    instance_id: InstanceId
    origin: str
    channel: Channel
    reason: Literal["resend", "fallback"]
    at: UtcTime
    request_id: RequestId | None = None
    detail: str = ""
    #: A resend's client address: the fraud guard counts it first (rule 20).
    client_ip: str | None = None


class DeliveryRefused(_Frozen):
    """The asked delivery was refused: the number's limit (rule 9), a fraud block or the
    limit of its client address (rule 20); ``detail`` says which, in words."""

    type: Literal["delivery_refused"] = "delivery_refused"
    instance_id: InstanceId
    origin: str
    at: UtcTime
    retry_after: float | None = None
    detail: str = ""


class DeliveryFailed(_Frozen):
    """A delivery failed for good (refused by the provider, or its receipt or call status)."""

    type: Literal["delivery_failed"] = "delivery_failed"
    instance_id: InstanceId
    command_id: str
    channel: Channel
    error: str
    at: UtcTime


class SmsAccepted(_Frozen):
    """The SMS provider took the message (the console backend: printed it)."""

    type: Literal["sms_accepted"] = "sms_accepted"
    instance_id: InstanceId
    command_id: str
    at: UtcTime


class SmsDelivered(_Frozen):
    """The provider's delivery receipt: the phone got it."""

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
    reason: Literal["expired", "too_many_attempts", "invalid_phone_number", "blocked_number",
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


class Held(_Frozen):
    """A response or terminate that arrived before its start; applied when the start is."""

    type: Literal["held"] = "held"
    instance_id: InstanceId
    command: Holdable
    at: UtcTime


class Dropped(_Frozen):
    """A held command whose start did not arrive within its grace (``origin`` names it)."""

    type: Literal["dropped"] = "dropped"
    instance_id: InstanceId
    origin: str
    at: UtcTime


class Answered(_Frozen):
    """The command with ``request_id`` was decided: the state after this event is its answer."""

    type: Literal["answered"] = "answered"
    instance_id: InstanceId
    request_id: RequestId
    command: CommandName
    result: ReplyResult
    at: UtcTime
    retry_after: float | None = None
    detail: str = ""


Event = Annotated[
    Started | SmsRequested | SmsAccepted | SmsDelivered | CodeRejected | Verified | Failed
    | Terminated | DeliveryAsked | DeliveryRefused | DeliveryFailed
    | Held | Dropped | Answered,
    Field(discriminator="type"),
]
TERMINAL = (Verified, Failed, Terminated)


# ---------------------------------------------------------------- state


class Delivery(_Frozen):
    """One delivery of the code and how far it got."""

    command_id: str
    channel: Channel
    at: UtcTime
    status: Literal["requested", "accepted", "delivered", "failed"] = "requested"


class Asked(_Frozen):
    """A delivery asked of the number's admission, not answered yet."""

    origin: str
    channel: Channel
    reason: Literal["resend", "fallback"]
    at: UtcTime
    request_id: RequestId | None = None
    detail: str = ""


class Verification(_Frozen):
    """Everything known about one verification; ``version`` counts the events folded in."""

    instance_id: InstanceId
    status: Status = "new"
    phone_number: str | None = None
    code_hash: str | None = None
    command_id: str | None = None
    #: The last delivery's status (``command_id`` is its command).
    sms: Literal["none", "requested", "accepted", "delivered", "failed"] = "none"
    created_at: UtcTime | None = None
    deadline: UtcTime | None = None
    max_attempts: int = 0
    attempts: int = 0
    #: When each wrong code came: they count against the number's guess budget.
    wrong_at: tuple[UtcTime, ...] = ()
    reason: OutcomeReason | None = None
    detail: str = ""
    #: The locale of every message it sends (rule 18; ``None``: DEFAULT_LOCALE).
    locale: str | None = None
    updated_at: UtcTime | None = None
    #: Commands that arrived before the start, in arrival order.
    held: tuple[Holdable, ...] = ()
    #: Rules 15-17: every delivery so far, the offered channels the number may use, the
    #: fallback list, the resends made and allowed, and a delivery asked of admission.
    deliveries: tuple[Delivery, ...] = ()
    channels: tuple[Channel, ...] = CHANNELS
    fallback: tuple[Channel, ...] = ()
    resends: int = 0
    resend_limit: int = 4
    resend_interval: float = 30.0
    asking: Asked | None = None
    version: int = 0

    @property
    def is_final(self) -> bool:
        return self.status in FINAL

    @property
    def is_empty(self) -> bool:
        """Nothing started and nothing held: the instance id is free (nothing to keep)."""
        return self.status == "new" and not self.held

    @property
    def attempts_left(self) -> int:
        return max(self.max_attempts - self.attempts, 0)

    @property
    def channel(self) -> Channel | None:
        """The last delivery's channel."""
        return self.deliveries[-1].channel if self.deliveries else None

    @property
    def resends_left(self) -> int:
        return max(self.resend_limit - self.resends, 0)

    @property
    def resend_at(self) -> datetime | None:
        """When a resend is allowed next (``None``: none is left, or it is not pending)."""
        if self.status != "pending" or self.resends_left == 0:
            return None
        last = self.deliveries[-1].at if self.deliveries else self.created_at
        return None if last is None else last + timedelta(seconds=self.resend_interval)


def initial_state(instance_id: str) -> Verification:
    return Verification(instance_id=instance_id)


# ---------------------------------------------------------------- decide

_COMMAND_NAMES: dict[str, CommandName] = {"start": "start", "reject": "start",
                                          "answer": "response", "stop": "terminate",
                                          "resend": "resend"}


def decide(command: Command, state: Verification) -> list[Event]:
    """The events that ``command`` causes in ``state``; ``[]`` when it changes nothing."""
    events = _decide(command, state)
    asked = state.asking
    if (asked is not None and asked.request_id is not None and not state.is_final
            and any(isinstance(event, TERMINAL) for event in events)):
        # It concluded while a resend waited for admission: that resend is answered now.
        events.append(Answered(instance_id=state.instance_id, request_id=asked.request_id,
                               command="resend", result="ended", at=command.at))
    return events


def _decide(command: Command, state: Verification) -> list[Event]:
    iid, at = command.instance_id, command.at
    if state.is_final:
        # Exactly one conclusion, ever: a late or repeated command changes nothing.
        return _answered(command, "duplicate" if command.kind in ("start", "reject") else "ended")
    match command:
        case Start() if state.status == "new":
            return _start(command, state)
        case Reject(reason="channel_unavailable") if state.status == "new":
            # Nothing starts: the instance id stays free for a start over another channel.
            return _answered(command, "channel_unavailable", detail=command.detail)
        case Reject() if state.status == "new":
            failed = Failed(instance_id=iid, reason=command.reason, attempts=0, at=at,
                            detail=command.detail)
            return [failed, *_release_held(state, evolve(state, failed)),
                    *_answered(command, command.reason, command.retry_after)]
        case Start() | Reject():
            return _answered(command, "duplicate")  # a used instance_id sends nothing
    if state.status == "new":
        match command:
            case Answer() | Stop() | Resend() if len(state.held) >= MAX_HELD:
                return _answered(command, "unknown")
            case Answer() | Stop() | Resend():
                return [Held(instance_id=iid, command=command, at=at)]
            case Expire():
                return _drop_expired_holds(state, at)
        return []  # nothing to confirm or expire yet
    assert state.deadline is not None and state.code_hash is not None
    if isinstance(command, Answer | Stop | Resend) and state.created_at is not None:
        # Never dated more than its grace before the start: one stamped earlier still (it lagged
        # behind its start, or waited past its grace for want of a tick) counts from there, so
        # its wrong code stays inside the guess budget's ``hold`` margin (models/admission.py).
        at = max(at, state.created_at - timedelta(seconds=command.hold_seconds))
    if at >= state.deadline and not isinstance(command, Answer | Expire):
        # Past the deadline it has expired, whether or not a tick said so yet.
        expired = _failed(state, "expired", at)
        return [expired, *decide(command, evolve(state, expired))]
    match command:
        case Answer() if at >= state.deadline:
            return [_failed(state, "expired", at), *_answered(command, "expired")]
        case Answer() if hmac.compare_digest(command.code_hash, state.code_hash):
            return [Verified(instance_id=iid, attempts=state.attempts + 1, at=at),
                    *_answered(command, "verified")]
        case Answer():
            attempts = state.attempts + 1
            rejected = CodeRejected(instance_id=iid, attempts=attempts, at=at)
            if attempts >= state.max_attempts:
                return [rejected, Failed(instance_id=iid, reason="too_many_attempts",
                                         attempts=attempts, at=at),
                        *_answered(command, "too_many_attempts")]
            return [rejected, *_answered(command, "wrong_code")]
        case Stop():
            return [Terminated(instance_id=iid, reason=command.reason,
                               attempts=state.attempts, at=at),
                    *_answered(command, "terminated")]
        case Expire() if at >= state.deadline:
            return [_failed(state, "expired", at)]
        case Resend():
            return _resend(command, state)
        case Deliver():
            return _deliver(command, state)
        case ConfirmSms() | FailSms():
            return _delivery_status(command, state)
    return []


def available(channels: tuple[Channel, ...]) -> str:
    """The channels that would work, in words (for ``channel_unavailable``)."""
    if not channels:
        return "no channel can reach this number"
    return f"channels that would work for this number: {', '.join(channels)}"


def auto_channel(channels: tuple[Channel, ...]) -> Channel | None:
    """``auto``: sms for numbers that take it, a call for landlines, else the first offered."""
    for channel in ("sms", "call"):
        if channel in channels:
            return channel  # type: ignore[return-value]
    return channels[0] if channels else None


def _resend(command: Resend, state: Verification) -> list[Event]:
    """Rule 15: the same code again, if its interval, its limit and its channel allow."""
    at, wanted = command.at, command.channel or state.channel or "sms"
    channel = auto_channel(state.channels) if wanted == "auto" else wanted
    if channel not in state.channels:
        return _answered(command, "channel_unavailable",
                         detail=f"{wanted} cannot reach this number here; "
                                f"{available(state.channels)}")
    if state.resends_left == 0:
        return _answered(command, "rate_limited",
                         detail=f"no resend is left (at most {state.resend_limit})")
    allowed = state.resend_at
    if state.asking is not None:  # one already waits for admission: it counts as the last
        allowed = state.asking.at + timedelta(seconds=state.resend_interval)
    if allowed is not None and at < allowed:
        wait = round((allowed - at).total_seconds(), 3)
        return _answered(command, "rate_limited", retry_after=wait,
                         detail=f"the code was sent less than {state.resend_interval:g} s ago")
    return [DeliveryAsked(instance_id=command.instance_id, origin=command.origin,
                          channel=channel, reason="resend", at=at,
                          request_id=command.request_id, client_ip=command.client_ip)]


def _deliver(command: Deliver, state: Verification) -> list[Event]:
    """The number's admission answered the asked delivery: it goes out, or it is refused."""
    asked, iid, at = state.asking, command.instance_id, command.at
    if asked is None or asked.origin != command.origin:
        return []  # delivered again: decided already

    def reply(result: ReplyResult, retry_after: float | None = None,
              detail: str = "") -> list[Event]:
        return [] if asked.request_id is None else [
            Answered(instance_id=iid, request_id=asked.request_id, command="resend",
                     result=result, at=at, retry_after=retry_after, detail=detail)]
    if not command.admitted:
        blocked = command.blocked
        refused = DeliveryRefused(instance_id=iid, origin=asked.origin, at=at,
                                  retry_after=None if blocked else command.retry_after,
                                  detail=blocked or command.detail)
        events: list[Event] = [refused, *(
            reply("blocked_number", detail=blocked) if blocked
            else reply("rate_limited", retry_after=command.retry_after,
                       detail=command.detail))]
        if asked.reason == "fallback" and not _may_have_arrived(state):
            why = blocked or "too many deliveries to this number lately"
            events.append(_failed(state, "sms_undeliverable", at,
                                  f"{asked.detail}; the {asked.channel} fallback was refused: "
                                  f"{why}"))
        return events
    number = len(state.deliveries) + 1
    return [SmsRequested(instance_id=iid, command_id=f"{iid}/{asked.channel}/{number}",
                         at=at, channel=asked.channel, reason=asked.reason,
                         detail=asked.detail),
            *reply("resent")]


def _delivery_status(command: ConfirmSms | FailSms, state: Verification) -> list[Event]:
    """The provider's word on one delivery; a failure of the last one falls back (rule 17)."""
    iid, at, cid = command.instance_id, command.at, command.command_id
    delivery = next((d for d in state.deliveries if d.command_id == cid), None)
    if delivery is None or delivery.status == "failed":
        return []
    if isinstance(command, ConfirmSms):
        if command.receipt and delivery.status != "delivered":
            return [SmsDelivered(instance_id=iid, command_id=cid, at=at)]
        if delivery.status == "requested":
            return [SmsAccepted(instance_id=iid, command_id=cid, at=at)]
        return []
    failed = DeliveryFailed(instance_id=iid, command_id=cid, channel=delivery.channel,
                            error=command.error, at=at)
    after = evolve(state, failed)
    if cid != state.command_id or state.asking is not None:
        return [failed]  # a later delivery is on its way
    tried = {d.channel for d in after.deliveries if d.status == "failed"}
    left = [c for c in state.fallback if c in state.channels and c not in tried]
    if left:
        return [failed, DeliveryAsked(instance_id=iid, origin=f"{cid}/fallback", channel=left[0],
                                      reason="fallback", at=at,
                                      detail=f"{delivery.channel} failed: {command.error}")]
    if _may_have_arrived(after):
        return [failed]  # an earlier delivery may have reached the person
    return [failed, _failed(state, "sms_undeliverable", at, command.error)]


def _may_have_arrived(state: Verification) -> bool:
    """Some delivery was accepted by its provider and has not failed since."""
    return any(d.status in ("accepted", "delivered") for d in state.deliveries)


def _start(command: Start, state: Verification) -> list[Event]:
    """Start, then apply the held commands in arrival order; no SMS if they conclude it."""
    iid, at = command.instance_id, command.at
    started = Started(instance_id=iid, phone_number=command.phone_number,
                      code_hash=command.code_hash, created_at=at,
                      deadline=at + timedelta(seconds=command.timeout_seconds),
                      max_attempts=command.max_attempts, at=at, locale=command.locale,
                      channels=command.channels, fallback=command.fallback,
                      resend_limit=command.resend_limit, resend_interval=command.resend_interval)
    after = evolve(state, started)
    released = _release_held(state, after)
    sms = [] if fold(after, released).is_final else [
        SmsRequested(instance_id=iid, command_id=command.command_id, at=at,
                     channel=command.channel)]
    return [started, *sms, *released, *_answered(command, "started")]


def _release_held(before: Verification, state: Verification) -> list[Event]:
    """The events of ``before``'s held commands, decided one after another from ``state``."""
    events: list[Event] = []
    for held in before.held:
        caused = decide(held, state)
        events += caused
        state = fold(state, caused)
    return events


def _drop_expired_holds(state: Verification, now: datetime) -> list[Event]:
    events: list[Event] = []
    for held in state.held:
        if held.at + timedelta(seconds=held.hold_seconds) <= now:
            events += [Dropped(instance_id=state.instance_id, origin=held.origin, at=now),
                       *_answered(held, "unknown", at=now)]
    return events


def _answered(command: Command, result: ReplyResult, retry_after: float | None = None,
              at: datetime | None = None, detail: str = "") -> list[Event]:
    request_id = getattr(command, "request_id", None)
    if request_id is None or command.kind not in _COMMAND_NAMES:
        return []
    return [Answered(instance_id=command.instance_id, request_id=request_id,
                     command=_COMMAND_NAMES[command.kind], result=result,
                     at=at or command.at, retry_after=retry_after, detail=detail)]


def _failed(state: Verification, reason: str, at: datetime, detail: str = "") -> Failed:
    return Failed(instance_id=state.instance_id, reason=reason, attempts=state.attempts,
                  at=at, detail=detail)


# ---------------------------------------------------------------- evolve


def evolve(state: Verification, event: Event) -> Verification:
    """The state after ``event``: a plain fold, no decisions."""
    changes: dict[str, object] = {"version": state.version + 1}
    match event:
        case Started():
            changes |= {"status": "pending", "phone_number": event.phone_number,
                        "code_hash": event.code_hash, "created_at": event.created_at,
                        "deadline": event.deadline, "max_attempts": event.max_attempts,
                        "locale": event.locale,
                        "channels": event.channels, "fallback": event.fallback,
                        "resend_limit": event.resend_limit,
                        "resend_interval": event.resend_interval,
                        "held": ()}  # the held commands are decided with the start
        case SmsRequested():
            delivery = Delivery(command_id=event.command_id, channel=event.channel, at=event.at)
            changes |= {"sms": "requested", "command_id": event.command_id, "asking": None,
                        "deliveries": (*state.deliveries, delivery),
                        "resends": state.resends + (event.reason == "resend")}
        case SmsAccepted():
            changes |= _delivery(state, event.command_id, "accepted")
        case SmsDelivered():
            changes |= _delivery(state, event.command_id, "delivered")
        case DeliveryFailed():
            changes |= _delivery(state, event.command_id, "failed")
        case DeliveryAsked():
            changes |= {"asking": Asked(origin=event.origin, channel=event.channel,
                                        reason=event.reason, at=event.at,
                                        request_id=event.request_id, detail=event.detail)}
        case DeliveryRefused():
            changes |= {"asking": None}
        case CodeRejected():
            changes |= {"attempts": event.attempts, "wrong_at": (*state.wrong_at, event.at)}
        case Verified():
            changes |= {"status": "verified", "reason": "code_matched",
                        "attempts": event.attempts}
        case Failed():
            changes |= {"status": "failed", "reason": event.reason, "attempts": event.attempts,
                        "detail": event.detail}
        case Terminated():
            changes |= {"status": "terminated", "reason": "terminated",
                        "attempts": event.attempts, "detail": event.reason}
        case Held():
            changes |= {"held": (*state.held, event.command)}
        case Dropped():
            changes |= {"held": tuple(h for h in state.held if h.origin != event.origin)}
        case Answered():
            return state.model_copy(update=changes)  # a fact for the log; the state is as it was
    changes["updated_at"] = event.at
    if isinstance(event, TERMINAL):
        changes["asking"] = None
        changes["held"] = ()  # held commands are answered in the decision that concludes
        if state.created_at is None:
            changes["created_at"] = event.at  # a start refused upstream concludes at once
    return state.model_copy(update=changes)


def _delivery(state: Verification, command_id: str, status: str) -> dict[str, object]:
    """The changes that mark one delivery ``status`` (and ``sms`` if it is the last)."""
    deliveries = tuple(d.model_copy(update={"status": status}) if d.command_id == command_id
                       else d for d in state.deliveries)
    changes: dict[str, object] = {"deliveries": deliveries}
    if command_id == state.command_id:
        changes["sms"] = status
    return changes


def fold(state: Verification, events: Iterable[Event]) -> Verification:
    return reduce(evolve, events, state)


# ---------------------------------------------------------------- projections (wire messages)

_REFUSALS = frozenset({"rate_limited", "invalid_phone_number", "blocked_number"})


def public_status(state: Verification) -> Literal["pending", "verified", "failed",
                                                   "terminated", "unknown"]:
    return "unknown" if state.status == "new" else state.status


def reply_of(answered: Answered, state: Verification) -> Reply:
    """The ``Reply`` for ``answered``; ``state`` is the state right after that event."""
    if answered.result == "started":
        attempts_left: int | None = state.max_attempts  # all it was admitted with
    else:
        attempts_left = state.attempts_left if state.max_attempts > 0 else None
    delivers = answered.result in ("started", "resent") and state.status == "pending"
    detail = answered.detail or (state.detail if answered.result in _REFUSALS else "")
    return Reply(request_id=answered.request_id, instance_id=answered.instance_id,
                 command=answered.command, result=answered.result,
                 status=public_status(state), attempts_left=attempts_left,
                 deadline=state.deadline if state.status == "pending" else None,
                 retry_after=answered.retry_after, detail=detail or None,
                 locale=state.locale if answered.command == "start" else None,
                 channel=state.channel if delivers else None,
                 resends_left=state.resends_left if delivers or (
                     answered.command == "resend" and state.status == "pending") else None)


def outcome_of(state: Verification) -> Outcome:
    """The one ``Outcome`` of a concluded verification."""
    assert state.is_final and state.reason is not None
    assert state.created_at is not None and state.updated_at is not None
    return Outcome(instance_id=state.instance_id, verified=state.status == "verified",
                   status=state.status, reason=state.reason, attempts=state.attempts,
                   created_at=state.created_at, completed_at=state.updated_at)
