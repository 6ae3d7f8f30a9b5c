"""Resends, channels and fallbacks in the verification decider (rules 15-17), given-when-then.

Pure and fast, like ``test_verification.py``: ``given(*events)`` is the state, ``decide`` the
"when", the list of events the "then".
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import TypeAdapter

from phoneverify.models.codes import hash_code
from phoneverify.models.verification import (
    Answer,
    Answered,
    ConfirmSms,
    Deliver,
    DeliveryAsked,
    DeliveryFailed,
    DeliveryRefused,
    Dropped,
    Event,
    Expire,
    Failed,
    FailSms,
    Held,
    Reject,
    Resend,
    SmsAccepted,
    SmsRequested,
    Start,
    Verified,
    decide,
    fold,
    initial_state,
    reply_of,
)

IID = "chan-1"
KEY = b"unit-test-code-hash-key"
RIGHT = hash_code(KEY, IID, "1708")
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
INTERVAL = 30.0
EVENTS = TypeAdapter(list[Event])


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def start(**changes: object) -> Start:
    fields: dict[str, object] = dict(
        instance_id=IID, phone_number="+14255550100", code_hash=RIGHT,
        command_id=f"{IID}/sms/1", at=T0, timeout_seconds=90.0, max_attempts=4,
        resend_limit=2, resend_interval=INTERVAL)
    return Start(**(fields | changes))


def given(*commands: Start | Resend | Deliver | FailSms | ConfirmSms) -> tuple[
        list[Event], object]:
    """The events of ``commands`` decided one after another from a new verification."""
    events: list[Event] = []
    state = initial_state(IID)
    for command in commands:
        caused = decide(command, state)
        events += caused
        state = fold(state, caused)
    return events, state


def resend(seconds: float, channel: str | None = None, rid: str | None = "r1") -> Resend:
    return Resend(instance_id=IID, channel=channel, at=at(seconds), request_id=rid,
                  hold_seconds=10.0, origin=f"verification.resend:0:{int(seconds * 1000)}")


def deliver(command: Resend | str, seconds: float, admitted: bool = True,
            retry_after: float | None = None, blocked: str = "") -> Deliver:
    origin = command if isinstance(command, str) else command.origin
    return Deliver(instance_id=IID, origin=origin, admitted=admitted, at=at(seconds),
                   retry_after=retry_after, blocked=blocked)


def fail(command_id: str, seconds: float, error: str = "twilio receipt: undelivered") -> FailSms:
    return FailSms(instance_id=IID, command_id=command_id, error=error, at=at(seconds))


def answered(result: str, seconds: float, rid: str = "r1", **more: object) -> Answered:
    return Answered(instance_id=IID, request_id=rid, command="resend", result=result,
                    at=at(seconds), **more)


# ---------------------------------------------------------------- rule 15: resend


def test_a_resend_too_soon_is_rate_limited_with_when_to_retry():
    _, state = given(start())
    events = decide(resend(10), state)
    assert events == [answered("rate_limited", 10, retry_after=20.0,
                               detail="the code was sent less than 30 s ago")]
    reply = reply_of(events[0], fold(state, events))
    assert (reply.retry_after, reply.resends_left, reply.status) == (20.0, 2, "pending")


def test_a_resend_after_the_interval_asks_admission_then_sends_the_same_code():
    _, state = given(start())
    asked = decide(resend(31), state)
    assert asked == [DeliveryAsked(instance_id=IID, origin=resend(31).origin, channel="sms",
                                   reason="resend", at=at(31), request_id="r1")]
    state = fold(state, asked)
    events = decide(deliver(resend(31), 31.5), state)
    assert events == [
        SmsRequested(instance_id=IID, command_id=f"{IID}/sms/2", at=at(31.5), channel="sms",
                     reason="resend"),
        answered("resent", 31.5)]
    after = fold(state, events)
    # The same code, deadline and attempts; one resend fewer.
    assert (after.code_hash, after.deadline, after.attempts_left) == (
        state.code_hash, state.deadline, state.attempts_left)
    reply = reply_of(events[1], after)
    assert (reply.result, reply.channel, reply.resends_left) == ("resent", "sms", 1)
    assert after.resend_at == at(31.5 + INTERVAL)


def test_a_resend_over_another_channel_uses_it():
    _, state = given(start(), resend(40, "call"))
    events = decide(deliver(resend(40, "call"), 41), state)
    assert events[0] == SmsRequested(instance_id=IID, command_id=f"{IID}/call/2", at=at(41),
                                     channel="call", reason="resend")


def test_no_resend_is_left_after_the_limit():
    first, second = resend(31, rid="a"), resend(62, rid="b")
    _, state = given(start(), first, deliver(first, 31), second, deliver(second, 62))
    assert state.resends_left == 0 and state.resend_at is None
    assert decide(resend(80, rid="c"), state) == [
        answered("rate_limited", 80, rid="c", detail="no resend is left (at most 2)")]


def test_a_second_resend_while_one_waits_for_admission_is_too_soon():
    _, state = given(start(), resend(31, rid="a"))
    events = decide(resend(40, rid="b"), state)
    assert [(e.result, e.retry_after) for e in events] == [("rate_limited", 21.0)]


def test_admission_refusing_a_resend_answers_rate_limited_and_sends_nothing():
    _, state = given(start(), resend(31))
    events = decide(deliver(resend(31), 31.2, admitted=False, retry_after=500.0), state)
    assert events == [
        DeliveryRefused(instance_id=IID, origin=resend(31).origin, at=at(31.2),
                        retry_after=500.0),
        answered("rate_limited", 31.2, retry_after=500.0)]
    after = fold(state, events)
    assert after.asking is None and after.resends == 0 and len(after.deliveries) == 1


BLOCK = "suspected SMS pumping to +44740012…, blocked until 03:12 UTC"


def test_a_resend_to_a_blocked_prefix_answers_blocked_number_and_sends_nothing():
    _, state = given(start(), resend(31))
    events = decide(deliver(resend(31), 31.2, admitted=False, blocked=BLOCK), state)
    assert events == [
        DeliveryRefused(instance_id=IID, origin=resend(31).origin, at=at(31.2), detail=BLOCK),
        answered("blocked_number", 31.2, detail=BLOCK)]
    after = fold(state, events)
    assert after.asking is None and len(after.deliveries) == 1 and after.status == "pending"


def test_a_resend_names_its_client_address_and_a_refusal_by_it_says_why():
    """Rule 20: the address goes with the asked delivery (the guard counts it); refused over
    the address's limit, the reply says so in words, with when to retry."""
    asked = resend(31).model_copy(update={"client_ip": "198.51.100.7"})
    events, state = given(start(), asked)
    assert events[-1] == DeliveryAsked(instance_id=IID, origin=asked.origin, channel="sms",
                                       reason="resend", at=at(31), request_id="r1",
                                       client_ip="198.51.100.7")
    why = "too many codes requested from 198.51.100.7: at most 20 starts and resends in 3600 s"
    refused = deliver(asked, 31.2, admitted=False, retry_after=900.0).model_copy(
        update={"detail": why})
    assert decide(refused, state) == [
        DeliveryRefused(instance_id=IID, origin=asked.origin, at=at(31.2), retry_after=900.0,
                        detail=why),
        answered("rate_limited", 31.2, retry_after=900.0, detail=why)]


def test_a_verdict_delivered_again_changes_nothing():
    _, state = given(start(), resend(31), deliver(resend(31), 31.5))
    assert decide(deliver(resend(31), 32), state) == []


def test_a_resend_of_a_concluded_verification_is_ended():
    _, state = given(start())
    state = fold(state, [Verified(instance_id=IID, attempts=1, at=at(5))])
    assert decide(resend(40), state) == [answered("ended", 40)]


def test_a_resend_before_its_start_is_held_then_decided_with_the_start():
    early = resend(-1)
    events, state = given(early)
    assert events == [Held(instance_id=IID, command=early, at=at(-1))]
    events = decide(start(request_id="s"), state)
    # Decided at the start: the code is just being sent, so a resend is too soon.
    assert answered("rate_limited", -1, retry_after=31.0,
                    detail="the code was sent less than 30 s ago") in events


def test_a_resend_whose_start_never_comes_is_dropped_as_unknown():
    _, state = given(resend(0))
    events = decide(Expire(instance_id=IID, at=at(11)), state)
    assert events == [Dropped(instance_id=IID, origin=resend(0).origin, at=at(11)),
                      answered("unknown", 11)]


# ---------------------------------------------------------------- rule 16: channels


def test_a_channel_the_number_cannot_take_is_refused_naming_those_that_would():
    _, state = given(start(channels=("call",), command_id=f"{IID}/call/1", channel="call"))
    events = decide(resend(40, "sms"), state)
    assert events == [answered("channel_unavailable", 40, detail=(
        "sms cannot reach this number here; channels that would work for this number: call"))]


def test_auto_resends_by_call_to_a_landline():
    _, state = given(start(channels=("call",), command_id=f"{IID}/call/1", channel="call"))
    assert decide(resend(40, "auto"), state)[0].channel == "call"


def test_a_start_refused_for_its_channel_leaves_the_id_free():
    refuse = Reject(instance_id=IID, reason="channel_unavailable", at=T0, request_id="s",
                    detail="channels that would work for this number: call")
    events, state = given(refuse)
    assert events == [Answered(instance_id=IID, request_id="s", command="start",
                               result="channel_unavailable", at=T0,
                               detail="channels that would work for this number: call")]
    assert state.is_empty
    assert reply_of(events[0], state).detail == "channels that would work for this number: call"


# ---------------------------------------------------------------- rule 17: fallback


def test_an_undelivered_sms_falls_back_to_a_call_with_the_same_code():
    _, state = given(start(fallback=("call",)))
    events = decide(fail(f"{IID}/sms/1", 5), state)
    origin = f"{IID}/sms/1/fallback"
    assert events == [
        DeliveryFailed(instance_id=IID, command_id=f"{IID}/sms/1", channel="sms",
                       error="twilio receipt: undelivered", at=at(5)),
        DeliveryAsked(instance_id=IID, origin=origin, channel="call", reason="fallback",
                      at=at(5), detail="sms failed: twilio receipt: undelivered")]
    state = fold(state, events)
    events = decide(deliver(origin, 5.1), state)
    assert events == [SmsRequested(instance_id=IID, command_id=f"{IID}/call/2", at=at(5.1),
                                   channel="call", reason="fallback",
                                   detail="sms failed: twilio receipt: undelivered")]
    state = fold(state, events)
    assert state.status == "pending" and state.resends == 0  # a fallback is no resend
    # The call fails too (no answer): no channel is left.
    events = decide(fail(f"{IID}/call/2", 40, "call status: no-answer"), state)
    assert events[-1] == Failed(instance_id=IID, reason="sms_undeliverable", attempts=0,
                                at=at(40), detail="call status: no-answer")


def test_without_a_fallback_a_failed_delivery_concludes_undeliverable():
    _, state = given(start())
    assert decide(fail(f"{IID}/sms/1", 5), state)[-1].reason == "sms_undeliverable"


def test_a_fallback_channel_the_number_cannot_take_is_skipped():
    _, state = given(start(fallback=("whatsapp", "call"), channels=("sms", "call")))
    events = decide(fail(f"{IID}/sms/1", 5), state)
    assert events[-1].channel == "call"


def test_a_fallback_refused_by_the_number_limit_concludes_undeliverable():
    events, state = given(start(fallback=("call",)), fail(f"{IID}/sms/1", 5))
    events = decide(deliver(f"{IID}/sms/1/fallback", 5.1, admitted=False, retry_after=9), state)
    assert isinstance(events[0], DeliveryRefused)
    assert events[-1].reason == "sms_undeliverable"
    assert "fallback was refused" in events[-1].detail


def test_a_failed_resend_keeps_it_pending_while_the_first_was_accepted():
    accepted = ConfirmSms(instance_id=IID, command_id=f"{IID}/sms/1", at=at(1))
    _, state = given(start(), accepted, resend(31, "whatsapp"),
                     deliver(resend(31, "whatsapp"), 31))
    events = decide(fail(f"{IID}/whatsapp/2", 33, "twilio error 63016"), state)
    assert [type(e) for e in events] == [DeliveryFailed]
    assert fold(state, events).status == "pending"


def test_a_failure_of_an_earlier_delivery_only_records_it():
    _, state = given(start(fallback=("call",)), resend(31), deliver(resend(31), 31))
    events = decide(fail(f"{IID}/sms/1", 32), state)
    assert [type(e) for e in events] == [DeliveryFailed]


def test_concluding_while_a_resend_waits_for_admission_answers_it_ended():
    _, state = given(start(), resend(31))
    events = decide(Answer(instance_id=IID, code_hash=RIGHT, at=at(32)), state)
    assert events == [Verified(instance_id=IID, attempts=1, at=at(32)),
                      answered("ended", 32)]
    assert decide(deliver(resend(31), 33), fold(state, events)) == []


# ---------------------------------------------------------------- replay


def test_the_events_rebuild_the_same_state_from_their_json():
    accepted = ConfirmSms(instance_id=IID, command_id=f"{IID}/sms/1", at=at(1))
    events, state = given(start(fallback=("call",)), accepted, resend(31, "whatsapp"),
                          deliver(resend(31, "whatsapp"), 31), fail(f"{IID}/whatsapp/2", 33))
    assert SmsAccepted in {type(e) for e in events}
    rebuilt = fold(initial_state(IID), EVENTS.validate_json(EVENTS.dump_json(events)))
    assert rebuilt == state
    assert [d.channel for d in state.deliveries] == ["sms", "whatsapp"]
