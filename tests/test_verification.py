"""The verification decider, given-when-then: given past events, when a command, then events.

Pure and fast: no Kafka, no clock. ``given(*events)`` folds past events onto the initial state;
``decide(command, state)`` is the "when"; the list it returns is the "then".
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import hypothesis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from phoneverify.models.codes import hash_code
from phoneverify.models.verification import (
    TERMINAL,
    Answer,
    CodeRejected,
    ConfirmSms,
    Event,
    Expire,
    Failed,
    FailSms,
    Reject,
    SmsDelivered,
    SmsRequested,
    Start,
    Started,
    Stop,
    Terminated,
    Verification,
    Verified,
    decide,
    evolve,
    fold,
    initial_state,
)

KEY = b"unit-test-code-hash-key"
IID = "verif-1"
PHONE = "+14255550100"
CODE = "0042"
RIGHT = hash_code(KEY, IID, CODE)
WRONG = hash_code(KEY, IID, "0043")
T0 = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
TIMEOUT = 90.0
MAX = 4
DEADLINE = T0 + timedelta(seconds=TIMEOUT)
CMD = f"{IID}/sms/1"

EVENT = TypeAdapter(Event)
EVENTS = TypeAdapter(list[Event])


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def given(*events: Event) -> Verification:
    """The state after ``events``: a fold onto the initial state."""
    return fold(initial_state(IID), events)


def start(when: datetime = T0, **changes: object) -> Start:
    fields: dict[str, object] = dict(instance_id=IID, phone_number=PHONE, code_hash=RIGHT,
                                     command_id=CMD, at=when, timeout_seconds=TIMEOUT,
                                     max_attempts=MAX)
    return Start(**(fields | changes))


def started(when: datetime = T0) -> list[Event]:
    """The events of a start at ``when`` (what ``decide(start(when), new)`` emits)."""
    return [
        Started(instance_id=IID, phone_number=PHONE, code_hash=RIGHT, created_at=when,
                deadline=when + timedelta(seconds=TIMEOUT), max_attempts=MAX, at=when),
        SmsRequested(instance_id=IID, command_id=CMD, at=when),
    ]


def answer(code_hash: str, when: datetime) -> Answer:
    return Answer(instance_id=IID, code_hash=code_hash, at=when)


def rejected(n: int, when: datetime) -> CodeRejected:
    return CodeRejected(instance_id=IID, attempts=n, at=when)


# ---------------------------------------------------------------- start


def test_start_emits_started_and_sms_requested_with_deadline():
    state = given()
    events = decide(start(), state)
    assert events == started()
    assert events[0].deadline == T0 + timedelta(seconds=TIMEOUT)
    after = fold(state, events)
    assert after.status == "pending"
    assert after.sms == "requested"
    assert after.command_id == CMD
    assert after.deadline == DEADLINE
    assert after.created_at == T0
    assert after.version == 2


def test_second_start_for_a_used_id_emits_nothing():
    assert decide(start(at(5), command_id="other"), given(*started())) == []


def test_start_after_a_conclusion_emits_nothing():
    state = given(*started(), Verified(instance_id=IID, attempts=1, at=at(3)))
    assert decide(start(at(5)), state) == []


# ---------------------------------------------------------------- answers


def test_correct_code_inside_the_window_verifies():
    assert decide(answer(RIGHT, at(10)), given(*started())) == [
        Verified(instance_id=IID, attempts=1, at=at(10))]


def test_correct_code_after_wrong_ones_counts_all_attempts():
    state = given(*started(), rejected(1, at(1)), rejected(2, at(2)))
    assert decide(answer(RIGHT, at(3)), state) == [Verified(instance_id=IID, attempts=3,
                                                            at=at(3))]


def test_correct_code_just_before_the_deadline_verifies():
    when = DEADLINE - timedelta(milliseconds=1)
    assert decide(answer(RIGHT, when), given(*started())) == [
        Verified(instance_id=IID, attempts=1, at=when)]


def test_wrong_code_is_rejected_and_counted():
    assert decide(answer(WRONG, at(10)), given(*started())) == [rejected(1, at(10))]
    state = given(*started(), rejected(1, at(10)))
    assert decide(answer(WRONG, at(11)), state) == [rejected(2, at(11))]


def test_the_right_code_of_another_instance_is_wrong():
    other = hash_code(KEY, "verif-2", CODE)
    assert decide(answer(other, at(10)), given(*started())) == [rejected(1, at(10))]


def test_the_last_wrong_code_fails_at_once():
    past = [rejected(n, at(n)) for n in range(1, MAX)]
    assert decide(answer(WRONG, at(MAX)), given(*started(), *past)) == [
        rejected(MAX, at(MAX)),
        Failed(instance_id=IID, reason="too_many_attempts", attempts=MAX, at=at(MAX)),
    ]


def test_max_attempts_of_one_fails_on_the_first_wrong_code():
    state = fold(initial_state(IID), decide(start(max_attempts=1), initial_state(IID)))
    assert decide(answer(WRONG, at(1)), state) == [
        rejected(1, at(1)),
        Failed(instance_id=IID, reason="too_many_attempts", attempts=1, at=at(1)),
    ]


@pytest.mark.parametrize("late", [timedelta(0), timedelta(milliseconds=1), timedelta(hours=1)])
def test_correct_code_at_or_after_the_deadline_expires(late):
    state = given(*started(), rejected(1, at(1)))
    assert decide(answer(RIGHT, DEADLINE + late), state) == [
        Failed(instance_id=IID, reason="expired", attempts=1, at=DEADLINE + late)]


def test_wrong_code_after_the_deadline_expires_without_counting():
    assert decide(answer(WRONG, DEADLINE), given(*started())) == [
        Failed(instance_id=IID, reason="expired", attempts=0, at=DEADLINE)]


# ---------------------------------------------------------------- expiry, stop


@pytest.mark.parametrize("early", [timedelta(milliseconds=1), timedelta(seconds=89)])
def test_expire_before_the_deadline_emits_nothing(early):
    expire = Expire(instance_id=IID, at=DEADLINE - early)
    assert decide(expire, given(*started())) == []


@pytest.mark.parametrize("late", [timedelta(0), timedelta(seconds=1)])
def test_expire_at_or_after_the_deadline_fails_expired(late):
    state = given(*started(), rejected(1, at(1)), rejected(2, at(2)))
    assert decide(Expire(instance_id=IID, at=DEADLINE + late), state) == [
        Failed(instance_id=IID, reason="expired", attempts=2, at=DEADLINE + late)]


def test_stop_terminates():
    state = given(*started(), rejected(1, at(1)))
    assert decide(Stop(instance_id=IID, reason="user cancelled", at=at(5)), state) == [
        Terminated(instance_id=IID, reason="user cancelled", attempts=1, at=at(5))]
    after = fold(state, decide(Stop(instance_id=IID, reason="user cancelled", at=at(5)), state))
    assert (after.status, after.reason, after.detail) == ("terminated", "terminated",
                                                          "user cancelled")


# ---------------------------------------------------------------- SMS status


def test_fail_sms_for_the_current_command_fails_undeliverable():
    fail = FailSms(instance_id=IID, command_id=CMD, error="unreachable", at=at(2))
    assert decide(fail, given(*started())) == [
        Failed(instance_id=IID, reason="sms_undeliverable", attempts=0, at=at(2),
               detail="unreachable")]


def test_fail_sms_for_another_command_emits_nothing():
    fail = FailSms(instance_id=IID, command_id=f"{IID}/sms/0", error="unreachable", at=at(2))
    assert decide(fail, given(*started())) == []


def test_confirm_sms_marks_delivered_once():
    confirm = ConfirmSms(instance_id=IID, command_id=CMD, at=at(1))
    state = given(*started())
    events = decide(confirm, state)
    assert events == [SmsDelivered(instance_id=IID, command_id=CMD, at=at(1))]
    after = fold(state, events)
    assert after.sms == "delivered"
    assert decide(confirm, after) == []


def test_confirm_sms_for_another_command_emits_nothing():
    confirm = ConfirmSms(instance_id=IID, command_id="elsewhere", at=at(1))
    assert decide(confirm, given(*started())) == []


# ---------------------------------------------------------------- rejects


@pytest.mark.parametrize("reason", ["invalid_phone_number", "rate_limited"])
def test_reject_on_a_new_instance_fails_with_its_reason(reason):
    events = decide(Reject(instance_id=IID, reason=reason, at=T0), given())
    assert events == [Failed(instance_id=IID, reason=reason, attempts=0, at=T0)]
    after = fold(initial_state(IID), events)
    assert (after.status, after.reason, after.created_at, after.updated_at) == (
        "failed", reason, T0, T0)


@pytest.mark.parametrize("reason", ["invalid_phone_number", "rate_limited"])
def test_reject_on_a_used_instance_emits_nothing(reason):
    assert decide(Reject(instance_id=IID, reason=reason, at=at(1)),
                  given(*started())) == []


def test_start_after_a_reject_emits_nothing():
    state = given(Failed(instance_id=IID, reason="rate_limited", attempts=0, at=T0))
    assert decide(start(at(1)), state) == []


# ---------------------------------------------------------------- finished, never started


def every_command(when: datetime) -> list[object]:
    return [
        start(when),
        Reject(instance_id=IID, reason="rate_limited", at=when),
        Reject(instance_id=IID, reason="invalid_phone_number", at=when),
        answer(RIGHT, when),
        answer(WRONG, when),
        Stop(instance_id=IID, reason="late", at=when),
        Expire(instance_id=IID, at=when),
        ConfirmSms(instance_id=IID, command_id=CMD, at=when),
        FailSms(instance_id=IID, command_id=CMD, error="x", at=when),
    ]


TERMINALS = [
    Verified(instance_id=IID, attempts=1, at=at(1)),
    Failed(instance_id=IID, reason="too_many_attempts", attempts=MAX, at=at(1)),
    Failed(instance_id=IID, reason="expired", attempts=0, at=DEADLINE),
    Failed(instance_id=IID, reason="sms_undeliverable", attempts=0, at=at(1)),
    Terminated(instance_id=IID, reason="stop", attempts=0, at=at(1)),
]


@pytest.mark.parametrize("terminal", TERMINALS, ids=lambda e: f"{e.type}")
@pytest.mark.parametrize("when", [at(2), DEADLINE, DEADLINE + timedelta(days=1)],
                         ids=["inside", "deadline", "later"])
def test_anything_after_a_terminal_event_emits_nothing(terminal, when):
    state = given(*started(), terminal)
    assert state.is_final
    for command in every_command(when):
        assert decide(command, state) == [], command


@pytest.mark.parametrize("when", [T0, DEADLINE + timedelta(days=1)], ids=["now", "later"])
def test_commands_for_a_never_started_instance_emit_nothing(when):
    state = given()
    for command in every_command(when)[3:]:
        if not isinstance(command, Stop):
            assert decide(command, state) == [], command


def test_a_stop_before_the_start_terminates_it_for_good():
    # The start takes two more hops (intake, rate limit) than a terminate: it may come second.
    stop = Stop(instance_id=IID, reason="changed my mind", at=T0)
    assert decide(stop, given()) == [
        Terminated(instance_id=IID, reason="changed my mind", attempts=0, at=T0)]
    state = fold(given(), decide(stop, given()))
    assert (state.status, state.reason, state.created_at) == ("terminated", "terminated", T0)
    assert decide(start(at(1)), state) == []  # no SMS for a terminated id


# ---------------------------------------------------------------- properties

SHORT = 1.0  # seconds: deadline = start + 1 s, times drawn in ms around it
OTHER_CMD = f"{IID}/sms/2"
WRONG_HASHES = [hash_code(KEY, IID, c) for c in ("0000", "0043", "42", "00042", "9999")] + [
    hash_code(KEY, "verif-2", CODE), hash_code(b"another-key", IID, CODE)]

step_kinds = st.sampled_from(
    ["start", "reject", "right", "right", "wrong", "wrong", "wrong", "stop", "expire",
     "expire", "confirm", "fail"])


def draw_time(data: st.DataObject, state: Verification) -> datetime:
    """A time in ms: anywhere in [-0.5 s, 2 s] of T0, or on or next to the deadline."""
    deadline = state.deadline or (T0 + timedelta(seconds=SHORT))
    return data.draw(st.one_of(
        st.integers(-500, 2000).map(lambda ms: T0 + timedelta(milliseconds=ms)),
        st.sampled_from([-1, 0, 0, 1]).map(lambda ms: deadline + timedelta(milliseconds=ms)),
    ))


def draw_command(data: st.DataObject, state: Verification, max_attempts: int,
                 kind: str | None = None):
    kind = kind or data.draw(step_kinds)
    when = draw_time(data, state)
    match kind:
        case "start":
            return start(when, timeout_seconds=SHORT, max_attempts=max_attempts,
                         command_id=data.draw(st.sampled_from([CMD, OTHER_CMD])))
        case "reject":
            return Reject(instance_id=IID, at=when,
                          reason=data.draw(st.sampled_from(["invalid_phone_number",
                                                            "rate_limited"])))
        case "right":
            return answer(RIGHT, when)
        case "wrong":
            return answer(data.draw(st.sampled_from(WRONG_HASHES)), when)
        case "stop":
            return Stop(instance_id=IID, reason="stopped", at=when)
        case "expire":
            return Expire(instance_id=IID, at=when)
        case "confirm":
            return ConfirmSms(instance_id=IID, at=when,
                              command_id=data.draw(st.sampled_from([CMD, OTHER_CMD])))
        case _:
            return FailSms(instance_id=IID, at=when, error="boom",
                           command_id=data.draw(st.sampled_from([CMD, OTHER_CMD])))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@hypothesis.given(data=st.data(), max_attempts=st.integers(1, 5), length=st.integers(0, 20),
                  first=st.sampled_from(["start"] * 4 + [None]))
def test_random_command_sequences_keep_the_rules(data, max_attempts, length, first):
    state = initial_state(IID)
    emitted: list[Event] = []
    for step in range(length):
        command = draw_command(data, state, max_attempts, first if step == 0 else None)
        events = decide(command, state)
        if state.is_final:
            assert events == []  # nothing after a conclusion
        for event in events:
            if isinstance(event, Verified):
                assert isinstance(command, Answer)
                assert command.code_hash == RIGHT  # never verified with a wrong code
                assert state.deadline is not None
                assert event.at < state.deadline  # never at or after the deadline
            state = evolve(state, event)
        emitted += events

    terminal = [i for i, event in enumerate(emitted) if isinstance(event, TERMINAL)]
    assert len(terminal) <= 1
    if terminal:
        assert terminal[0] == len(emitted) - 1  # nothing after the conclusion
        assert state.is_final
    else:
        assert not state.is_final

    attempts = [e.attempts for e in emitted if isinstance(e, CodeRejected)]
    assert attempts == list(range(1, len(attempts) + 1))
    for event in emitted:
        if hasattr(event, "attempts"):
            assert event.attempts <= max_attempts
    assert state.attempts <= max_attempts
    assert sum(isinstance(e, Started) for e in emitted) <= 1
    assert sum(isinstance(e, SmsRequested) for e in emitted) <= 1
    assert sum(isinstance(e, SmsDelivered) for e in emitted) <= 1

    assert state.version == len(emitted)
    assert fold(initial_state(IID), emitted) == state

    # Events and state survive JSON (the events topic, the table's changelog) unchanged.
    for event in emitted:
        assert EVENT.validate_json(EVENT.dump_json(event)) == event
    assert EVENTS.validate_json(EVENTS.dump_json(emitted)) == emitted
    assert Verification.model_validate_json(state.model_dump_json()) == state
