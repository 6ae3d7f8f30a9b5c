"""The wire messages: strict parsing of what comes in, the exact shape of what goes out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from phoneverify.models.messages import (
    DeadLetter,
    Outcome,
    SendSms,
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


def test_start_tolerates_extra_fields():
    start = StartVerification.from_bytes(
        raw(instance_id="abc", phone_number="+14255550100", locale="en", extra={"x": 1}))
    assert start.model_dump() == {"instance_id": "abc", "phone_number": "+14255550100"}


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
