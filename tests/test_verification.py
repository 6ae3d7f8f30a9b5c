"""The verification decider, given-when-then: given past events, when a command, then events.

Pure and fast: no Kafka, no clock. ``given(*events)`` folds past events onto the initial state;
``decide(command, state)`` is the "when"; the list it returns is the "then". A command with a
``request_id`` is answered by an ``Answered`` event; ``replies(command, state)`` also turns
each into the ``Reply`` the agent would publish (``reply_of`` on the state right after it).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import hypothesis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from phoneverify.models.codes import hash_code
from phoneverify.models.messages import Reply
from phoneverify.models.verification import (
    MAX_HELD,
    TERMINAL,
    Answer,
    Answered,
    CodeRejected,
    Command,
    ConfirmSms,
    DeliveryFailed,
    Dropped,
    Event,
    Expire,
    Failed,
    FailSms,
    Held,
    Reject,
    SmsAccepted,
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
    outcome_of,
    public_status,
    reply_of,
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
GRACE = 10.0
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


def started(when: datetime = T0, max_attempts: int = MAX) -> list[Event]:
    """The events of a start at ``when`` (what ``decide(start(when), new)`` emits)."""
    return [
        Started(instance_id=IID, phone_number=PHONE, code_hash=RIGHT, created_at=when,
                deadline=when + timedelta(seconds=TIMEOUT), max_attempts=max_attempts, at=when),
        SmsRequested(instance_id=IID, command_id=CMD, at=when),
    ]


def answer(code_hash: str, when: datetime, request_id: str | None = None,
           origin: str = "") -> Answer:
    return Answer(instance_id=IID, code_hash=code_hash, at=when, request_id=request_id,
                  hold_seconds=GRACE, origin=origin or f"verification.response:0:{when:%S%f}")


def stop(when: datetime, request_id: str | None = None, origin: str = "",
         reason: str = "user cancelled") -> Stop:
    return Stop(instance_id=IID, reason=reason, at=when, request_id=request_id,
                hold_seconds=GRACE, origin=origin or f"verification.terminate:0:{when:%S%f}")


def reject(reason: str, when: datetime = T0, **changes: object) -> Reject:
    return Reject(instance_id=IID, reason=reason, at=when, **changes)


def rejected(n: int, when: datetime) -> CodeRejected:
    return CodeRejected(instance_id=IID, attempts=n, at=when)


def answered(request_id: str, command: str, result: str, when: datetime,
             retry_after: float | None = None) -> Answered:
    return Answered(instance_id=IID, request_id=request_id, command=command, result=result,
                    at=when, retry_after=retry_after)


def replies(command: Command, state: Verification) -> list[Reply]:
    """The replies the agent publishes for ``decide(command, state)``, in order."""
    out = []
    for event in decide(command, state):
        state = evolve(state, event)
        if isinstance(event, Answered):
            out.append(reply_of(event, state))
    return out


def reply(request_id: str, command: str, result: str, status: str,
          attempts_left: int | None, deadline: datetime | None, **extra: object) -> Reply:
    return Reply(request_id=request_id, instance_id=IID, command=command, result=result,
                 status=status, attempts_left=attempts_left, deadline=deadline, **extra)


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


def test_the_locale_is_kept_from_the_start_and_said_in_its_reply():
    """Rule 18: chosen once (at intake), carried by ``Started``, so replay rebuilds it and
    every later delivery uses it; the start's reply says it, other replies do not."""
    events = decide(start(locale="pt-BR", request_id="r1"), given())
    assert events[0].locale == "pt-BR"
    state = given(*EVENTS.validate_json(EVENTS.dump_json(events)))  # as replay reads them
    assert state.locale == "pt-BR"
    assert replies(start(locale="pt-BR", request_id="r1"), given())[0].locale == "pt-BR"
    answered_code = replies(answer(RIGHT, at(3), request_id="r2"), state)
    assert answered_code[0].result == "verified" and answered_code[0].locale is None
    assert given(*started()).locale is None  # events from before: the default at send time


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


def test_wrong_code_is_rejected_counted_and_its_time_kept():
    assert decide(answer(WRONG, at(10)), given(*started())) == [rejected(1, at(10))]
    state = given(*started(), rejected(1, at(10)))
    assert decide(answer(WRONG, at(11)), state) == [rejected(2, at(11))]
    assert given(*started(), rejected(1, at(10)), rejected(2, at(11))).wrong_at == (
        at(10), at(11))  # for the number's guess budget


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
    events = decide(stop(at(5)), state)
    assert events == [
        Terminated(instance_id=IID, reason="user cancelled", attempts=1, at=at(5))]
    after = fold(state, events)
    assert (after.status, after.reason, after.detail) == ("terminated", "terminated",
                                                          "user cancelled")


# ---------------------------------------------------------------- SMS status


def test_fail_sms_for_the_current_command_fails_undeliverable():
    fail = FailSms(instance_id=IID, command_id=CMD, error="unreachable", at=at(2))
    assert decide(fail, given(*started())) == [
        DeliveryFailed(instance_id=IID, command_id=CMD, channel="sms", error="unreachable",
                       at=at(2)),
        Failed(instance_id=IID, reason="sms_undeliverable", attempts=0, at=at(2),
               detail="unreachable")]


def test_fail_sms_for_another_command_emits_nothing():
    fail = FailSms(instance_id=IID, command_id=f"{IID}/sms/0", error="unreachable", at=at(2))
    assert decide(fail, given(*started())) == []


def test_confirm_sms_marks_accepted_once():
    confirm = ConfirmSms(instance_id=IID, command_id=CMD, at=at(1))
    state = given(*started())
    events = decide(confirm, state)
    assert events == [SmsAccepted(instance_id=IID, command_id=CMD, at=at(1))]
    after = fold(state, events)
    assert after.sms == "accepted"
    assert decide(confirm, after) == []


def test_a_delivery_receipt_marks_delivered_once_whenever_it_comes():
    receipt = ConfirmSms(instance_id=IID, command_id=CMD, at=at(2), receipt=True)
    accepted = given(*started(), SmsAccepted(instance_id=IID, command_id=CMD, at=at(1)))
    for state in (accepted, given(*started())):  # before the acceptance, too
        events = decide(receipt, state)
        assert events == [SmsDelivered(instance_id=IID, command_id=CMD, at=at(2))]
        after = fold(state, events)
        assert after.sms == "delivered"
        assert decide(receipt, after) == []
        acceptance = ConfirmSms(instance_id=IID, command_id=CMD, at=at(3))
        assert decide(acceptance, after) == []  # never back from delivered


def test_confirm_sms_for_another_command_emits_nothing():
    confirm = ConfirmSms(instance_id=IID, command_id="elsewhere", at=at(1))
    assert decide(confirm, given(*started())) == []


# ---------------------------------------------------------------- rejects

REFUSALS = ["invalid_phone_number", "blocked_number", "rate_limited"]


@pytest.mark.parametrize("reason", REFUSALS)
def test_reject_on_a_new_instance_fails_with_its_reason(reason):
    events = decide(reject(reason, detail="why"), given())
    assert events == [Failed(instance_id=IID, reason=reason, attempts=0, at=T0, detail="why")]
    after = fold(initial_state(IID), events)
    assert (after.status, after.reason, after.created_at, after.updated_at) == (
        "failed", reason, T0, T0)
    outcome = outcome_of(after)
    assert (outcome.verified, outcome.status, outcome.reason, outcome.attempts) == (
        False, "failed", reason, 0)
    assert outcome.created_at == outcome.completed_at == T0


@pytest.mark.parametrize("reason", REFUSALS)
def test_reject_on_a_used_instance_emits_nothing(reason):
    assert decide(reject(reason, at(1)), given(*started())) == []


def test_start_after_a_reject_emits_nothing():
    state = given(Failed(instance_id=IID, reason="rate_limited", attempts=0, at=T0))
    assert decide(start(at(1)), state) == []


# ---------------------------------------------------------------- finished, never started


def every_command(when: datetime, request_id: str | None = None) -> list[Command]:
    rid = {"request_id": request_id}
    return [
        start(when, **rid),
        reject("rate_limited", when, **rid),
        reject("invalid_phone_number", when, **rid),
        reject("blocked_number", when, **rid),
        answer(RIGHT, when, **rid),
        answer(WRONG, when, **rid),
        stop(when, reason="late", **rid),
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


@pytest.mark.parametrize("terminal", TERMINALS, ids=lambda e: f"{e.type}")
def test_anything_after_a_terminal_event_is_only_answered(terminal):
    state = given(*started(), terminal)
    for command in every_command(at(2), request_id="r9"):
        events = decide(command, state)
        if isinstance(command, Expire | ConfirmSms | FailSms):
            assert events == []
        else:
            result = "duplicate" if isinstance(command, Start | Reject) else "ended"
            assert [(e.type, e.result) for e in events] == [("answered", result)], command


@pytest.mark.parametrize("when", [T0, DEADLINE + timedelta(days=1)], ids=["now", "later"])
def test_expire_and_sms_status_for_a_never_started_instance_emit_nothing(when):
    state = given()
    for command in every_command(when)[7:]:
        assert decide(command, state) == [], command


@pytest.mark.parametrize("kind", ["answer", "stop"])
def test_a_response_or_terminate_before_the_start_is_held(kind):
    command = answer(WRONG, T0, "r1") if kind == "answer" else stop(T0, "r1")
    events = decide(command, given())
    assert events == [Held(instance_id=IID, command=command, at=T0)]  # answered later
    state = fold(given(), events)
    assert state.status == "new"
    assert state.held == (command,)
    assert not state.is_empty  # the instance id is kept while something waits for it
    assert EVENT.validate_json(EVENT.dump_json(events[0])) == events[0]


@pytest.mark.parametrize("request_id", [None, "r1"])
@pytest.mark.parametrize("state", ["new", "held", "pending", "final", "refused"])
def test_no_answer_without_a_request_id_and_one_with_it(state, request_id):
    states = {
        "new": given(),
        "held": given(Held(instance_id=IID, command=stop(at(-1)), at=at(-1))),
        "pending": given(*started()),
        "final": given(*started(), TERMINALS[0]),
        "refused": given(Failed(instance_id=IID, reason="rate_limited", attempts=0, at=T0)),
    }
    for command in every_command(at(2), request_id):
        events = decide(command, states[state])
        answers = [e for e in events if isinstance(e, Answered)]
        if request_id is None or isinstance(command, Expire | ConfirmSms | FailSms):
            assert answers == [], command
        elif state in ("new", "held") and isinstance(command, Answer | Stop):
            assert answers == [], command  # held: answered when the start comes, or dropped
        else:
            assert [a.request_id for a in answers] == [request_id], command


# ---------------------------------------------------------------- replies: start


def test_start_replies_started_with_the_attempts_admitted_and_the_deadline():
    events = decide(start(request_id="s1", max_attempts=3), given())
    assert events == [*started(max_attempts=3), answered("s1", "start", "started", T0)]
    assert replies(start(request_id="s1", max_attempts=3), given()) == [
        reply("s1", "start", "started", "pending", 3, DEADLINE, channel="sms",
              resends_left=4)]


def test_start_on_a_pending_instance_replies_duplicate_and_sends_nothing():
    state = given(*started(), rejected(1, at(1)))
    for command in (start(at(5), request_id="s2", command_id="other"),
                    reject("rate_limited", at(5), request_id="s2")):
        assert decide(command, state) == [answered("s2", "start", "duplicate", at(5))]
        assert replies(command, state) == [
            reply("s2", "start", "duplicate", "pending", MAX - 1, DEADLINE)]


def test_start_on_a_concluded_instance_replies_duplicate():
    state = given(*started(), Verified(instance_id=IID, attempts=1, at=at(3)))
    assert replies(start(at(5), request_id="s2"), state) == [
        reply("s2", "start", "duplicate", "verified", MAX - 1, None)]
    refused = given(Failed(instance_id=IID, reason="rate_limited", attempts=0, at=T0))
    assert replies(start(at(5), request_id="s2"), refused) == [
        reply("s2", "start", "duplicate", "failed", None, None)]


@pytest.mark.parametrize("reason", REFUSALS)
def test_a_refused_start_replies_its_reason(reason):
    retry = 42.5 if reason == "rate_limited" else None
    command = reject(reason, request_id="s1", retry_after=retry, detail="in words")
    assert decide(command, given()) == [
        Failed(instance_id=IID, reason=reason, attempts=0, at=T0, detail="in words"),
        answered("s1", "start", reason, T0, retry_after=retry),
    ]
    assert replies(command, given()) == [
        reply("s1", "start", reason, "failed", None, None, retry_after=retry, detail="in words")]


# ---------------------------------------------------------------- replies: response


def test_the_right_code_replies_verified():
    state = given(*started(), rejected(1, at(1)))
    assert decide(answer(RIGHT, at(3), "a1"), state) == [
        Verified(instance_id=IID, attempts=2, at=at(3)),
        answered("a1", "response", "verified", at(3))]
    assert replies(answer(RIGHT, at(3), "a1"), state) == [
        reply("a1", "response", "verified", "verified", MAX - 2, None)]


@pytest.mark.parametrize("past", range(MAX - 1))
def test_a_wrong_code_replies_wrong_code_with_at_least_one_attempt_left(past):
    state = given(*started(), *(rejected(n, at(n)) for n in range(1, past + 1)))
    assert replies(answer(WRONG, at(10), "a1"), state) == [
        reply("a1", "response", "wrong_code", "pending", MAX - past - 1, DEADLINE)]
    assert MAX - past - 1 >= 1


def test_the_last_wrong_code_replies_too_many_attempts():
    state = given(*started(), *(rejected(n, at(n)) for n in range(1, MAX)))
    assert replies(answer(WRONG, at(10), "a1"), state) == [
        reply("a1", "response", "too_many_attempts", "failed", 0, None)]


def test_a_code_at_the_deadline_replies_expired():
    state = given(*started(), rejected(1, at(1)))
    for code in (RIGHT, WRONG):
        assert replies(answer(code, DEADLINE, "a1"), state) == [
            reply("a1", "response", "expired", "failed", MAX - 1, None)]


@pytest.mark.parametrize("terminal", TERMINALS, ids=lambda e: f"{e.type}")
def test_a_code_after_the_conclusion_replies_ended(terminal):
    state = given(*started(), terminal)
    status = public_status(state)
    assert replies(answer(RIGHT, at(2), "a1"), state) == [
        reply("a1", "response", "ended", status, state.attempts_left, None)]
    assert replies(stop(at(2), "t1"), state) == [
        reply("t1", "terminate", "ended", status, state.attempts_left, None)]


@pytest.mark.parametrize("kind", ["answer", "stop"])
def test_a_command_whose_start_never_came_replies_unknown(kind):
    command = answer(RIGHT, T0, "a1") if kind == "answer" else stop(T0, "a1")
    state = fold(given(), decide(command, given()))
    assert decide(Expire(instance_id=IID, at=at(GRACE - 0.001)), state) == []
    expire = Expire(instance_id=IID, at=at(GRACE))
    name = "response" if kind == "answer" else "terminate"
    assert decide(expire, state) == [
        Dropped(instance_id=IID, origin=command.origin, at=at(GRACE)),
        answered("a1", name, "unknown", at(GRACE))]
    assert replies(expire, state) == [reply("a1", name, "unknown", "unknown", None, None)]
    after = fold(state, decide(expire, state))
    assert after.is_empty  # the instance id is free for a later start
    assert decide(start(at(GRACE + 1), request_id="s1"), after)[:2] == started(at(GRACE + 1))


# ---------------------------------------------------------------- replies: terminate


def test_terminate_replies_terminated():
    state = given(*started(), rejected(1, at(1)))
    assert decide(stop(at(5), "t1"), state) == [
        Terminated(instance_id=IID, reason="user cancelled", attempts=1, at=at(5)),
        answered("t1", "terminate", "terminated", at(5))]
    assert replies(stop(at(5), "t1"), state) == [
        reply("t1", "terminate", "terminated", "terminated", MAX - 1, None)]


# ---------------------------------------------------------------- held commands


def hold(*commands: Answer | Stop) -> Verification:
    """The state after ``commands`` arrived before any start (each one held)."""
    state = given()
    for command in commands:
        events = decide(command, state)
        assert events == [Held(instance_id=IID, command=command, at=command.at)]
        state = fold(state, events)
    return state


def test_held_codes_are_applied_in_arrival_order_wrong_then_right():
    first, second = answer(WRONG, at(-2), "a1"), answer(RIGHT, at(-1), "a2")
    state = hold(first, second)
    events = decide(start(request_id="s1"), state)
    assert events == [
        started()[0],  # no SMS: the held commands concluded it
        rejected(1, at(-2)), answered("a1", "response", "wrong_code", at(-2)),
        Verified(instance_id=IID, attempts=2, at=at(-1)),
        answered("a2", "response", "verified", at(-1)),
        answered("s1", "start", "started", T0),
    ]
    assert replies(start(request_id="s1"), state) == [
        reply("a1", "response", "wrong_code", "pending", MAX - 1, DEADLINE),
        reply("a2", "response", "verified", "verified", MAX - 2, None),
        reply("s1", "start", "started", "verified", MAX, None),  # all it was admitted with
    ]
    after = fold(state, events)
    assert (after.held, after.sms, after.wrong_at) == ((), "none", (at(-2),))


def test_held_codes_in_the_other_order_verify_at_once():
    state = hold(answer(RIGHT, at(-2), "a1"), answer(WRONG, at(-1), "a2"))
    assert [(r.request_id, r.result) for r in replies(start(request_id="s1"), state)] == [
        ("a1", "verified"), ("a2", "ended"), ("s1", "started")]


def test_held_wrong_codes_are_counted_and_the_sms_still_goes():
    state = hold(answer(WRONG, at(-2), "a1"), answer(WRONG, at(-1), "a2"))
    events = decide(start(request_id="s1"), state)
    assert events == [
        *started(),
        rejected(1, at(-2)), answered("a1", "response", "wrong_code", at(-2)),
        rejected(2, at(-1)), answered("a2", "response", "wrong_code", at(-1)),
        answered("s1", "start", "started", T0),
    ]
    assert [(r.result, r.attempts_left) for r in replies(start(request_id="s1"), state)] == [
        ("wrong_code", MAX - 1), ("wrong_code", MAX - 2), ("started", MAX)]
    assert fold(state, events).wrong_at == (at(-2), at(-1))


def test_held_wrong_codes_can_use_up_every_attempt_before_the_sms():
    state = hold(*(answer(WRONG, at(-5 + n), f"a{n}") for n in range(MAX + 1)))
    events = decide(start(request_id="s1", max_attempts=2), state)
    assert not any(isinstance(e, SmsRequested) for e in events)
    assert [r.result for r in replies(start(request_id="s1", max_attempts=2), state)] == [
        "wrong_code", "too_many_attempts", *["ended"] * (MAX - 1), "started"]
    after = fold(state, events)
    assert (after.status, after.reason, after.attempts) == ("failed", "too_many_attempts", 2)


def test_a_held_terminate_ends_the_verification_without_an_sms():
    state = hold(stop(at(-1), "t1"))
    command = start(request_id="s1", max_attempts=2)
    events = decide(command, state)
    assert events == [
        started(max_attempts=2)[0],
        Terminated(instance_id=IID, reason="user cancelled", attempts=0, at=at(-1)),
        answered("t1", "terminate", "terminated", at(-1)),
        answered("s1", "start", "started", T0),
    ]
    assert replies(command, state) == [
        reply("t1", "terminate", "terminated", "terminated", 2, None),
        reply("s1", "start", "started", "terminated", 2, None),
    ]
    after = fold(state, events)
    assert (after.status, after.reason, after.sms) == ("terminated", "terminated", "none")
    assert decide(start(at(1)), after) == []  # no SMS for a terminated id, ever


def test_commands_held_after_a_terminate_are_ended():
    state = hold(answer(WRONG, at(-3), "a1"), stop(at(-2), "t1"), answer(RIGHT, at(-1), "a2"))
    assert [(r.request_id, r.result, r.status) for r in replies(start(), state)] == [
        ("a1", "wrong_code", "pending"), ("t1", "terminated", "terminated"),
        ("a2", "ended", "terminated")]


@pytest.mark.parametrize("reason", REFUSALS)
def test_commands_held_for_a_refused_start_are_ended(reason):
    state = hold(answer(RIGHT, at(-2), "a1"), stop(at(-1), "t1"))
    command = reject(reason, request_id="s1")
    assert decide(command, state) == [
        Failed(instance_id=IID, reason=reason, attempts=0, at=T0),
        answered("a1", "response", "ended", at(-2)),
        answered("t1", "terminate", "ended", at(-1)),
        answered("s1", "start", reason, T0),
    ]
    assert replies(command, state) == [
        reply("a1", "response", "ended", "failed", None, None),
        reply("t1", "terminate", "ended", "failed", None, None),
        reply("s1", "start", reason, "failed", None, None),
    ]
    assert fold(state, decide(command, state)).held == ()


def test_expire_drops_only_the_held_commands_past_their_grace():
    first = answer(WRONG, T0, "a1", origin="verification.response:0:1")
    second = stop(at(5), "t2", origin="verification.terminate:0:2")
    patient = Answer(instance_id=IID, code_hash=RIGHT, at=at(1), request_id="a3",
                     hold_seconds=30, origin="verification.response:1:3")
    state = hold(first, second, patient)
    assert decide(Expire(instance_id=IID, at=at(GRACE - 0.001)), state) == []
    events = decide(Expire(instance_id=IID, at=at(GRACE)), state)
    assert events == [Dropped(instance_id=IID, origin=first.origin, at=at(GRACE)),
                      answered("a1", "response", "unknown", at(GRACE))]
    state = fold(state, events)
    assert state.held == (second, patient)
    events = decide(Expire(instance_id=IID, at=at(20)), state)
    assert events == [Dropped(instance_id=IID, origin=second.origin, at=at(20)),
                      answered("t2", "terminate", "unknown", at(20))]
    state = fold(state, events)
    assert state.held == (patient,)
    # The start comes: only what is still held is applied.
    assert [(r.request_id, r.result) for r in replies(start(at(21), request_id="s1"), state)] == [
        ("a3", "verified"), ("s1", "started")]


def test_a_held_command_without_a_request_id_is_dropped_without_an_answer():
    command = answer(WRONG, T0)
    state = hold(command)
    assert decide(Expire(instance_id=IID, at=at(GRACE)), state) == [
        Dropped(instance_id=IID, origin=command.origin, at=at(GRACE))]


def test_a_start_then_commands_equals_commands_held_for_it():
    commands = [answer(WRONG, at(1), "a1"), answer(WRONG, at(2), "a2"), stop(at(3), "t1")]
    direct = given(*started())
    direct_replies = []
    for command in commands:
        direct_replies += replies(command, direct)
        direct = fold(direct, decide(command, direct))
    held = hold(*commands)
    via_hold = fold(held, decide(start(), held))
    assert replies(start(), held) == direct_replies
    same = ("status", "reason", "attempts", "wrong_at", "detail", "updated_at")
    assert {f: getattr(via_hold, f) for f in same} == {f: getattr(direct, f) for f in same}


def test_a_code_stamped_long_before_its_start_counts_from_one_grace_before_it():
    # It overtook nothing: it lagged behind its start on the way (or was stamped by a clock
    # that is behind). The guess budget counts a wrong code from ``hold`` before its start.
    state = given(*started())
    assert decide(answer(WRONG, at(-60), "a1"), state) == [
        rejected(1, at(-GRACE)), answered("a1", "response", "wrong_code", at(-60))]
    assert decide(answer(RIGHT, at(-60)), state) == [
        Verified(instance_id=IID, attempts=1, at=at(-GRACE))]
    assert decide(stop(at(-60)), state) == [
        Terminated(instance_id=IID, reason="user cancelled", attempts=0, at=at(-GRACE))]
    assert decide(answer(WRONG, at(-GRACE + 1)), state) == [rejected(1, at(-GRACE + 1))]


def test_a_code_held_past_its_grace_for_want_of_a_tick_counts_from_one_grace_before_the_start():
    state = hold(answer(WRONG, at(-60), "a1"))  # no tick came to drop it
    events = decide(start(request_id="s1"), state)
    assert events[2] == rejected(1, at(-GRACE))
    assert fold(state, events).wrong_at == (at(-GRACE),)


# ---------------------------------------------------------------- outcomes


def test_outcome_of_each_conclusion():
    for terminal in TERMINALS:
        state = given(*started(), terminal)
        outcome = outcome_of(state)
        assert outcome.verified == isinstance(terminal, Verified)
        assert outcome.status == state.status
        assert outcome.reason == state.reason
        assert (outcome.created_at, outcome.completed_at) == (T0, terminal.at)
        wire = outcome.to_bytes().decode()
        assert RIGHT not in wire


# ---------------------------------------------------------------- properties

SHORT = 1.0  # seconds: deadline = start + 1 s, times drawn in ms around it
OTHER_CMD = f"{IID}/sms/2"
WRONG_HASHES = [hash_code(KEY, IID, c) for c in ("0000", "0043", "42", "00042", "9999")] + [
    hash_code(KEY, "verif-2", CODE), hash_code(b"another-key", IID, CODE)]
HASHES = [RIGHT, *WRONG_HASHES]
COMMAND_NAMES = {"start": "start", "reject": "start", "answer": "response", "stop": "terminate"}

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


def draw_command(data: st.DataObject, state: Verification, max_attempts: int, n: int,
                 grace: float, kind: str | None = None) -> Command:
    """Command number ``n``: a random kind, time and (sometimes) ``request_id``."""
    kind = kind or data.draw(step_kinds)
    when = draw_time(data, state)
    rid = {"request_id": f"r{n}" if data.draw(st.booleans(), label="request_id") else None}
    early = {"hold_seconds": grace, "origin": f"verification.{kind}:0:{n}", "raw": "{}"}
    match kind:
        case "start":
            return start(when, timeout_seconds=SHORT, max_attempts=max_attempts,
                         command_id=data.draw(st.sampled_from([CMD, OTHER_CMD])), **rid)
        case "reject":
            return Reject(instance_id=IID, at=when, retry_after=1.5, detail="no", **rid,
                          reason=data.draw(st.sampled_from(REFUSALS)))
        case "right":
            return Answer(instance_id=IID, code_hash=RIGHT, at=when, **rid, **early)
        case "wrong":
            return Answer(instance_id=IID, code_hash=data.draw(st.sampled_from(WRONG_HASHES)),
                          at=when, **rid, **early)
        case "stop":
            return Stop(instance_id=IID, reason="stopped", at=when, **rid, **early)
        case "expire":
            return Expire(instance_id=IID, at=when)
        case "confirm":
            return ConfirmSms(instance_id=IID, at=when,
                              command_id=data.draw(st.sampled_from([CMD, OTHER_CMD])))
        case _:
            return FailSms(instance_id=IID, at=when, error="boom",
                           command_id=data.draw(st.sampled_from([CMD, OTHER_CMD])))


def check_reply(event: Answered, state: Verification, asked: dict[str, Command]) -> None:
    """The reply to ``event`` (``state`` is right after it) is as the contract describes."""
    command = asked[event.request_id]
    assert event.command == COMMAND_NAMES[command.kind]
    answer = reply_of(event, state)
    wire = answer.to_bytes().decode()
    for code_hash in (*HASHES, state.code_hash or RIGHT):
        assert code_hash not in wire  # a reply never carries a code hash
    assert json.loads(wire)["request_id"] == event.request_id
    assert answer.status == public_status(state)
    assert (answer.deadline is not None) == (answer.status == "pending")
    match answer.result:
        case "started":
            assert isinstance(command, Start)
            assert answer.attempts_left == command.max_attempts
        case "wrong_code":
            assert answer.status == "pending"
            assert answer.attempts_left is not None and answer.attempts_left >= 1
        case "verified":
            assert answer.status == "verified"
        case "too_many_attempts":
            assert (answer.status, answer.attempts_left) == ("failed", 0)
        case "expired":
            assert answer.status == "failed"
        case "terminated":
            assert answer.status == "terminated"
        case "unknown":
            assert (answer.status, answer.attempts_left, answer.deadline) == (
                "unknown", None, None)
        case "rate_limited" | "invalid_phone_number" | "blocked_number":
            assert isinstance(command, Reject) and command.reason == answer.result
            assert answer.status == "failed"
        case "ended":
            assert answer.status in ("verified", "failed", "terminated")
        case "duplicate":
            assert isinstance(command, Start | Reject)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@hypothesis.given(data=st.data(), max_attempts=st.integers(1, 5), length=st.integers(0, 20),
                  first=st.sampled_from(["start"] * 4 + [None]),
                  grace=st.sampled_from([0.25, 1.0, 10.0]))
def test_random_command_sequences_keep_the_rules(data, max_attempts, length, first, grace):
    state = initial_state(IID)
    emitted: list[Event] = []
    asked: dict[str, Command] = {}
    answers: dict[str, int] = {}
    for step in range(length):
        command = draw_command(data, state, max_attempts, step, grace,
                               first if step == 0 else None)
        if getattr(command, "request_id", None):
            asked[command.request_id] = command
        events = decide(command, state)
        before = state
        deciding = [command, *before.held] if isinstance(command, Start) else [command]
        if before.is_final:
            assert all(isinstance(e, Answered) for e in events)  # nothing after a conclusion
        for event in events:
            if isinstance(event, Verified):
                # Never verified with a wrong code, nor at or after the deadline.
                assert any(isinstance(c, Answer) and c.code_hash == RIGHT for c in deciding)
                assert state.deadline is not None
                assert event.at < state.deadline
            if isinstance(event, CodeRejected | Verified):
                # A code is never dated more than its grace before the start: the guess budget
                # (models/admission.py) counts wrong codes from ``hold`` before their start.
                assert state.created_at is not None
                assert event.at >= state.created_at - timedelta(seconds=grace)
                assert event.at < state.deadline
            if isinstance(event, SmsRequested):
                assert isinstance(command, Start)
            state = evolve(state, event)
            if isinstance(event, Answered):
                answers[event.request_id] = answers.get(event.request_id, 0) + 1
                check_reply(event, state, asked)
        emitted += events
        if isinstance(command, Start) and any(isinstance(e, Started) for e in events):
            # No SMS when the held commands concluded it; else exactly one.
            sms = sum(isinstance(e, SmsRequested) for e in events)
            assert sms == (0 if state.is_final else 1)
        # A command with a request_id is answered now, or once it is no longer held.
        rid = getattr(command, "request_id", None)
        if rid is not None:
            held_now = any(h is command for h in state.held)
            assert answers.get(rid, 0) == (0 if held_now else 1), command
        assert all(count == 1 for count in answers.values())

    for rid, command in asked.items():
        assert answers.get(rid, 0) == (0 if command in state.held else 1), command
    assert set(answers) <= set(asked)

    terminal = [i for i, event in enumerate(emitted) if isinstance(event, TERMINAL)]
    assert len(terminal) <= 1
    if terminal:
        assert all(isinstance(e, Answered) for e in emitted[terminal[0] + 1:])
        assert state.is_final
        assert state.held == ()
    else:
        assert not state.is_final

    attempts = [e.attempts for e in emitted if isinstance(e, CodeRejected)]
    assert attempts == list(range(1, len(attempts) + 1))
    assert len(state.wrong_at) == len(attempts)
    for event in emitted:
        if hasattr(event, "attempts"):
            assert event.attempts <= max_attempts
    assert state.attempts <= max_attempts
    assert sum(isinstance(e, Started) for e in emitted) <= 1
    assert sum(isinstance(e, SmsRequested) for e in emitted) <= 1
    assert sum(isinstance(e, SmsAccepted) for e in emitted) <= 1
    assert sum(isinstance(e, SmsDelivered) for e in emitted) <= 1

    assert state.version == len(emitted)
    assert fold(initial_state(IID), emitted) == state

    # Events and state survive JSON (the events topic, the table's changelog) unchanged.
    for event in emitted:
        assert EVENT.validate_json(EVENT.dump_json(event)) == event
    assert EVENTS.validate_json(EVENTS.dump_json(emitted)) == emitted
    assert Verification.model_validate_json(state.model_dump_json()) == state


@settings(max_examples=200, deadline=None)
@hypothesis.given(
    codes=st.lists(st.tuples(st.sampled_from(["right", "wrong", "stop"]), st.booleans()),
                   max_size=8),
    max_attempts=st.integers(1, 5),
)
def test_commands_held_for_the_start_act_as_if_they_came_after_it(codes, max_attempts):
    """Held commands, applied at the start, give the same replies and conclusion as the same
    commands arriving just after the start (the start's own reply aside)."""
    commands: list[Answer | Stop] = []
    for n, (kind, with_id) in enumerate(codes):
        rid, when = f"c{n}" if with_id else None, at(-len(codes) + n)
        origin = f"verification.{kind}:0:{n}"
        commands.append(stop(when, rid, origin) if kind == "stop" else
                        answer(RIGHT if kind == "right" else WRONG, when, rid, origin))
    go = start(request_id="s1", max_attempts=max_attempts)
    direct = fold(given(), decide(go, given()))
    direct_replies = []
    for command in commands:
        direct_replies += replies(command, direct)
        direct = fold(direct, decide(command, direct))
    held = hold(*commands)
    via_hold = fold(held, decide(go, held))
    *held_replies, started_reply = replies(go, held)
    assert held_replies == direct_replies
    assert (started_reply.result, started_reply.attempts_left) == ("started", max_attempts)
    same = ("status", "reason", "attempts", "wrong_at", "held")
    assert {f: getattr(via_hold, f) for f in same} == {f: getattr(direct, f) for f in same}
    assert via_hold.sms == ("none" if via_hold.is_final else "requested")


def test_a_terminate_or_sms_failure_after_the_deadline_finds_it_expired():
    state = given(*started())
    stop = Stop(instance_id=IID, reason="late", at=DEADLINE, request_id="r-late")
    events = decide(stop, state)
    assert [e.type for e in events] == ["failed", "answered"]
    assert events[0].reason == "expired" and events[1].result == "ended"
    assert reply_of(events[1], fold(state, events)).status == "failed"
    failure = FailSms(instance_id=IID, command_id=CMD, error="late", at=at(TIMEOUT + 1))
    [expired] = decide(failure, state)
    assert (expired.type, expired.reason) == ("failed", "expired")


def test_at_most_max_held_commands_wait_for_a_start():
    state = initial_state(IID)
    for n in range(MAX_HELD):
        state = fold(state, decide(Answer(instance_id=IID, code_hash=WRONG, at=at(n),
                                          hold_seconds=10, origin=f"r:0:{n}"), state))
    assert len(state.held) == MAX_HELD
    one_more = Answer(instance_id=IID, code_hash=WRONG, at=at(20), request_id="r-more",
                      hold_seconds=10, origin="r:0:99")
    [answered] = decide(one_more, state)
    assert (answered.type, answered.result) == ("answered", "unknown")
    assert decide(one_more.model_copy(update={"request_id": None}), state) == []
