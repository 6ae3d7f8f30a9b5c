"""The wire messages: strict parsing of what comes in, the exact shape of what goes out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from phoneverify.models.messages import (
    Admission,
    DeadLetter,
    Outcome,
    PhoneStart,
    Reply,
    SendSms,
    Settle,
    StartVerification,
    SubmitCode,
    Terminate,
    Tick,
)


def raw(**fields: object) -> bytes:
    return json.dumps(fields).encode()


# ---------------------------------------------------------------- SubmitCode


def test_submit_code_rejects_a_numeric_code():
    with pytest.raises(ValidationError) as error:
        SubmitCode.from_bytes(raw(instance_id="abc", code=42))
    assert error.value.errors()[0]["loc"] == ("code",)


def test_submit_code_keeps_leading_zeros():
    submit = SubmitCode.from_bytes(raw(instance_id="abc", code="0042"))
    assert submit.code == "0042"


@pytest.mark.parametrize("code", ["", "12a4", " 1234", "12 34", "-1", "1.5", "٣٤٥٦"])
def test_submit_code_rejects_non_digits(code):
    with pytest.raises(ValidationError):
        SubmitCode.from_bytes(raw(instance_id="abc", code=code))


# ---------------------------------------------------------------- StartVerification


@pytest.mark.parametrize("iid", ["a", "A" * 64, "abc-DEF_0.9", "0f1e2d3c4b5a69788796a5b4c3d2e1f0"])
def test_start_accepts_good_instance_ids(iid):
    start = StartVerification.from_bytes(raw(instance_id=iid, phone_number="+1 425-555-0100"))
    assert start.instance_id == iid


@pytest.mark.parametrize("iid", ["", "a" * 65, "has space", "a/b", "a\\b", "é", "a\nb", 7, None])
def test_start_rejects_bad_instance_ids(iid):
    with pytest.raises(ValidationError) as error:
        StartVerification.from_bytes(raw(instance_id=iid, phone_number="+14255550100"))
    assert error.value.errors()[0]["loc"] == ("instance_id",)


@pytest.mark.parametrize("bad", [3, ["fr"], {"tag": "fr"}, "x" * 600])
def test_a_locale_that_cannot_be_one_counts_as_absent_never_loses_the_start(bad):
    start = StartVerification.from_bytes(
        raw(instance_id="abc", phone_number="+14255550100", locale=bad, accept_language=bad))
    assert start.locale is None and start.accept_language is None
    given = StartVerification.from_bytes(
        raw(instance_id="abc", phone_number="+14255550100", locale="not a tag!"))
    assert given.locale == "not a tag!"  # kept as given: the intake finds it unknown


def test_start_tolerates_extra_fields():
    start = StartVerification.from_bytes(
        raw(instance_id="abc", phone_number="+14255550100", tenant="acme", extra={"x": 1}))
    assert start.model_dump(exclude_none=True) == {"instance_id": "abc",
                                                   "phone_number": "+14255550100"}


def test_a_start_may_name_its_clients_address_a_malformed_one_is_refused():
    start = StartVerification.from_bytes(
        raw(instance_id="abc", phone_number="+14255550100", client_ip="2001:DB8::1"))
    assert start.client_ip == "2001:db8::1"
    for bad in ("", "1.2.3", "203.0.113.9, 10.0.0.1", 7):
        with pytest.raises(ValidationError) as error:
            StartVerification.from_bytes(
                raw(instance_id="abc", phone_number="+14255550100", client_ip=bad))
        assert [item["loc"] for item in error.value.errors()] == [("client_ip",)]


@pytest.mark.parametrize("value", [b"", b"not json", b"[]", b'"+14255550100"', b"{}",
                                   raw(instance_id="abc"), raw(instance_id="abc", phone_number=1)])
def test_start_rejects_malformed_values(value):
    with pytest.raises(ValidationError):
        StartVerification.from_bytes(value)


def test_a_missing_value_is_refused():
    with pytest.raises(ValueError, match="empty"):
        StartVerification.from_bytes(None)


def test_terminate_reason_is_optional():
    assert Terminate.from_bytes(raw(instance_id="abc")).reason == ""


# ---------------------------------------------------------------- Tick


@pytest.mark.parametrize(("text", "expected"), [
    ("2025-01-02T03:04:05Z", datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2025-01-02T03:04:05.123Z", datetime(2025, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)),
    ("2025-01-02T04:04:05+01:00", datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)),
])
def test_tick_parses_iso_times(text, expected):
    tick = Tick.from_bytes(raw(partition=3, now=text))
    assert tick.now == expected
    assert tick.now.utcoffset() == timedelta(0)
    assert tick.partition == 3


@pytest.mark.parametrize("fields", [
    {"partition": 0, "now": "2025-01-02T03:04:05"},  # no time zone
    {"partition": -1, "now": "2025-01-02T03:04:05Z"},
    {"partition": "0", "now": "2025-01-02T03:04:05Z"},
    {"partition": 0, "now": "yesterday"},
])
def test_tick_rejects_bad_fields(fields):
    with pytest.raises(ValidationError):
        Tick.from_bytes(raw(**fields))


# ---------------------------------------------------------------- Outcome


def test_outcome_serializes_times_as_iso_utc_with_z():
    plus_two = timezone(timedelta(hours=2))
    outcome = Outcome(instance_id="abc", verified=True, status="verified", reason="code_matched",
                      attempts=1, created_at=datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
                      completed_at=datetime(2025, 1, 2, 5, 5, 0, tzinfo=plus_two))
    wire = json.loads(outcome.to_bytes())
    assert wire == {"instance_id": "abc", "verified": True, "status": "verified",
                    "reason": "code_matched", "attempts": 1,
                    "created_at": "2025-01-02T03:04:05.678Z",
                    "completed_at": "2025-01-02T03:05:00.000Z"}
    assert Outcome.from_bytes(outcome.to_bytes()).completed_at == outcome.completed_at


def test_naive_times_are_refused():
    with pytest.raises(ValidationError):
        Outcome(instance_id="abc", verified=False, status="failed", reason="expired",
                attempts=0, created_at=datetime(2025, 1, 2), completed_at=datetime(2025, 1, 2))


# ---------------------------------------------------------------- DeadLetter, SendSms


def test_dead_letter_cuts_the_value_at_4_kib():
    letter = DeadLetter.of("verification.start", 1, 2, b"k", b"x" * 10_000, "bad")
    assert letter.value == "x" * 4096
    wire = json.loads(letter.to_bytes())
    assert wire == {"topic": "verification.start", "partition": 1, "offset": 2, "key": "k",
                    "value": "x" * 4096, "error": "bad"}


def test_dead_letter_decodes_invalid_utf8_with_replacement():
    letter = DeadLetter.of("t", 0, 0, b"\xffkey", b'{"a": "\xff\xfe"}', "not json")
    assert letter.key == "\ufffdkey"
    assert letter.value == '{"a": "\ufffd\ufffd"}'
    json.loads(letter.to_bytes())  # still valid JSON on the wire


def test_dead_letter_of_a_missing_key_and_value():
    letter = DeadLetter.of("t", 0, 5, None, None, "empty record value")
    assert (letter.key, letter.value) == (None, "")


def test_dead_letter_cut_inside_a_multibyte_character_stays_decodable():
    letter = DeadLetter.of("t", 0, 0, None, b"a" * 4095 + "é".encode(), "x")
    assert len(letter.value) == 4096
    assert letter.value.endswith("\ufffd")


def test_send_sms_repr_hides_the_body():
    sms = SendSms(command_id="abc/sms/1", instance_id="abc", to="+14255550100",
                  body="Your verification code is 0042")
    for text in (repr(sms), str(sms), f"{sms}", f"{sms!r}", repr([sms])):
        assert "0042" not in text
        assert "abc/sms/1" in text
    assert json.loads(sms.to_bytes())["body"] == "Your verification code is 0042"


# ---------------------------------------------------------------- request_id

COMMANDS = [
    (StartVerification, {"instance_id": "abc", "phone_number": "+14255550100"}),
    (SubmitCode, {"instance_id": "abc", "code": "0042"}),
    (Terminate, {"instance_id": "abc", "reason": "bye"}),
]


@pytest.mark.parametrize(("kind", "fields"), COMMANDS, ids=lambda v: getattr(v, "__name__", ""))
def test_request_id_is_optional(kind, fields):
    assert kind.from_bytes(raw(**fields)).request_id is None


@pytest.mark.parametrize(("kind", "fields"), COMMANDS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("rid", ["r", "R" * 64, "abc-DEF_0.9", "0f1e2d3c4b5a69788796a5b4c3d2e1f0"])
def test_commands_accept_good_request_ids(kind, fields, rid):
    assert kind.from_bytes(raw(**fields, request_id=rid)).request_id == rid


@pytest.mark.parametrize(("kind", "fields"), COMMANDS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("rid", ["", "a" * 65, "has space", "a/b", "é", "a\nb", 7, True, ["a"]])
def test_commands_reject_bad_request_ids_naming_the_field(kind, fields, rid):
    with pytest.raises(ValidationError) as error:
        kind.from_bytes(raw(**fields, request_id=rid))
    assert [item["loc"] for item in error.value.errors()] == [("request_id",)]


@pytest.mark.parametrize(("kind", "fields"), COMMANDS, ids=lambda v: getattr(v, "__name__", ""))
def test_commands_ignore_unknown_fields(kind, fields):
    parsed = kind.from_bytes(raw(**fields, request_id="r1", trace={"id": 1}, tenant="acme"))
    assert parsed.model_dump(exclude_none=True) == {**fields, "request_id": "r1"}


# ---------------------------------------------------------------- Reply

T = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)  # the wire keeps milliseconds
REPLY_FIELDS = {"request_id", "instance_id", "command", "result", "status", "attempts_left",
                "deadline"}
RESULTS = {
    "start": ["started", "duplicate", "rate_limited", "invalid_phone_number", "blocked_number"],
    "response": ["verified", "wrong_code", "too_many_attempts", "expired", "ended", "unknown"],
    "terminate": ["terminated", "ended", "unknown"],
}


def reply(**changes: object) -> Reply:
    fields: dict[str, object] = dict(
        request_id="r1", instance_id="abc", command="start", result="started",
        status="pending", attempts_left=4, deadline=T)
    return Reply(**(fields | changes))


def test_reply_has_the_contracts_fields_and_json_types():
    wire = json.loads(reply(deadline=T.replace(microsecond=678901)).to_bytes())
    assert set(wire) >= REPLY_FIELDS
    # Additions, never required (channel and resends_left: rules 15 and 16).
    assert set(wire) - REPLY_FIELDS <= {"retry_after", "detail", "locale", "channel",
                                        "resends_left"}
    assert wire["request_id"] == "r1"
    assert wire["instance_id"] == "abc"
    assert wire["command"] == "start"
    assert wire["result"] == "started"
    assert wire["status"] == "pending"
    assert wire["attempts_left"] == 4
    assert type(wire["attempts_left"]) is int
    assert wire["deadline"] == "2025-01-02T03:04:05.678Z"  # ISO-8601 UTC with a Z


def test_reply_deadline_in_another_zone_is_written_in_utc():
    wire = json.loads(reply(deadline=T.astimezone(timezone(timedelta(hours=-7)))).to_bytes())
    assert wire["deadline"] == "2025-01-02T03:04:05.678Z"


def test_reply_nulls_are_json_nulls():
    wire = json.loads(reply(result="duplicate", status="unknown", attempts_left=None,
                            deadline=None).to_bytes())
    assert wire["attempts_left"] is None
    assert wire["deadline"] is None


@pytest.mark.parametrize(("command", "result"),
                         [(c, r) for c, results in RESULTS.items() for r in results])
def test_reply_accepts_every_result_the_contract_lists(command, result):
    wire = reply(command=command, result=result, status="failed", deadline=None).to_bytes()
    parsed = Reply.from_bytes(wire)
    assert (parsed.command, parsed.result) == (command, result)


@pytest.mark.parametrize("status", ["pending", "verified", "failed", "terminated", "unknown"])
def test_reply_accepts_every_status(status):
    assert Reply.from_bytes(reply(status=status).to_bytes()).status == status


@pytest.mark.parametrize("changes", [
    {"command": "answer"}, {"result": "ok"}, {"status": "new"}, {"request_id": "a b"},
    {"attempts_left": "4"}, {"deadline": "tomorrow"},
])
def test_reply_refuses_what_the_contract_does_not_list(changes):
    wire = json.loads(reply().to_bytes()) | changes
    with pytest.raises(ValidationError):
        Reply.from_bytes(json.dumps(wire).encode())


def test_reply_round_trips_and_a_reader_ignores_unknown_fields():
    original = reply(result="rate_limited", status="failed", attempts_left=None, deadline=None,
                     retry_after=12.5, detail="too many starts")
    wire = json.loads(original.to_bytes()) | {"new_field": [1, 2]}
    assert Reply.from_bytes(json.dumps(wire).encode()) == original


def test_reply_of_a_client_that_knows_only_the_contract_fields():
    wire = {"request_id": "r1", "instance_id": "abc", "command": "response",
            "result": "wrong_code", "status": "pending", "attempts_left": 3,
            "deadline": "2025-01-02T03:04:05Z"}
    parsed = Reply.from_bytes(json.dumps(wire).encode())
    assert parsed.deadline == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert (parsed.retry_after, parsed.detail) == (None, None)


# ---------------------------------------------------------------- Outcome reasons

REASONS = ["code_matched", "expired", "too_many_attempts", "terminated", "invalid_phone_number",
           "blocked_number", "sms_undeliverable", "rate_limited"]


@pytest.mark.parametrize("reason", REASONS)
def test_outcome_accepts_every_reason_of_the_contract(reason):
    outcome = Outcome(instance_id="abc", verified=reason == "code_matched",
                      status="verified" if reason == "code_matched" else "failed",
                      reason=reason, attempts=0, created_at=T, completed_at=T)
    assert json.loads(outcome.to_bytes())["reason"] == reason
    assert Outcome.from_bytes(outcome.to_bytes()) == outcome


def test_outcome_refuses_an_unknown_reason_and_ignores_unknown_fields():
    wire = {"instance_id": "abc", "verified": False, "status": "failed", "reason": "blocked_number",
            "attempts": 0, "created_at": "2025-01-02T03:04:05Z",
            "completed_at": "2025-01-02T03:04:05Z", "extra": 1}
    assert Outcome.from_bytes(json.dumps(wire).encode()).reason == "blocked_number"
    with pytest.raises(ValidationError):
        Outcome.from_bytes(json.dumps(wire | {"reason": "blocked"}).encode())


# ---------------------------------------------------------------- internal messages


def test_internal_messages_round_trip():
    start = PhoneStart(instance_id="abc", phone_number="+14255550100", requested_at=T,
                       origin="verification.start:3:17", request_id="r1")
    settle = Settle(phone_number="+14255550100", origin="verification.start:3:17",
                    wrong_codes=(T, T + timedelta(seconds=1)))
    verdict = Admission(instance_id="abc", verdict="blocked_number", requested_at=T,
                        origin="verification.start:3:17", detail="premium rate numbers")
    for message in (start, settle, verdict):
        assert type(message).from_bytes(message.to_bytes()) == message
    assert json.loads(settle.to_bytes())["wrong_codes"] == ["2025-01-02T03:04:05.678Z",
                                                            "2025-01-02T03:04:06.678Z"]
