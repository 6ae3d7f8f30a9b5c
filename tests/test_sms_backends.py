"""SMS backends: Twilio through the real twilio client against a local fake, and the console."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from phoneverify.delivery import Delivery, TransientSmsError, backend_from, send_with_retry
from phoneverify.delivery.console import ConsoleBackend
from phoneverify.delivery.twilio_sender import TwilioBackend
from phoneverify.settings import Settings

from fake_twilio import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, INVALID_NUMBER, FakeTwilio

# The twilio client's basic auth goes through aiohttp's deprecated ``auth=``; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(BasicAuth|'auth' parameter).*:DeprecationWarning")

TO = "+14255550100"
BODY = "Your verification code is 2168"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio() as server:
        yield server


@pytest.fixture
async def backend(fake: FakeTwilio) -> AsyncIterator[TwilioBackend]:
    sender = TwilioBackend(ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, base_url=fake.base_url)
    yield sender
    await sender.close()


def twilio_settings(**overrides: str) -> Settings:
    values = {"sms_backend": "twilio", "twilio_account_sid": ACCOUNT_SID,
              "twilio_auth_token": AUTH_TOKEN, "twilio_phone_number": FROM_NUMBER, **overrides}
    return Settings(**values)  # type: ignore[arg-type]


async def test_sends_one_message_with_the_right_to_from_body_and_auth(
        fake: FakeTwilio, backend: TwilioBackend) -> None:
    delivery = await backend.send(TO, BODY)

    [message] = fake.requests
    assert (message.to, message.from_, message.body) == (TO, FROM_NUMBER, BODY)
    assert message.auth == (ACCOUNT_SID, AUTH_TOKEN)
    assert message.account_sid == ACCOUNT_SID
    assert message.status == 201
    assert delivery == Delivery(ok=True, provider_id=message.sid)
    assert (delivery.provider_id or "").startswith("SM")


async def test_backend_from_settings_sends_through_twilio(fake: FakeTwilio) -> None:
    sender = backend_from(twilio_settings(twilio_base_url=fake.base_url))
    try:
        assert isinstance(sender, TwilioBackend)
        assert (await sender.send(TO, BODY)).ok
    finally:
        await sender.close()
    assert [(m.to, m.body) for m in fake.messages] == [(TO, BODY)]


@pytest.mark.parametrize("missing", ["twilio_account_sid", "twilio_auth_token",
                                     "twilio_phone_number"])
def test_missing_setting_is_a_clear_error_at_construction(missing: str) -> None:
    with pytest.raises(ValueError, match=missing.upper()):
        backend_from(twilio_settings(**{missing: ""}))


async def test_invalid_number_is_a_permanent_failure_without_the_body(
        fake: FakeTwilio, backend: TwilioBackend) -> None:
    delivery = await backend.send(INVALID_NUMBER, BODY)

    assert not delivery.ok
    assert delivery.permanent
    assert delivery.provider_id is None
    assert "21211" in delivery.error
    assert "not a valid phone number" in delivery.error
    assert BODY not in delivery.error
    assert "2168" not in delivery.error
    assert [r.status for r in fake.requests] == [400]
    assert fake.messages == []


async def test_wrong_credentials_are_a_permanent_failure(fake: FakeTwilio) -> None:
    sender = TwilioBackend(ACCOUNT_SID, "not-the-token", FROM_NUMBER, base_url=fake.base_url)
    try:
        delivery = await sender.send(TO, BODY)
    finally:
        await sender.close()
    assert not delivery.ok
    assert delivery.permanent
    assert "20003" in delivery.error


@pytest.mark.parametrize(("status", "code"), [(429, "20429"), (500, "20500"), (503, "20503")])
async def test_rate_limit_and_server_errors_are_transient(
        fake: FakeTwilio, backend: TwilioBackend, status: int, code: str) -> None:
    fake.fail(status)

    with pytest.raises(TransientSmsError, match=code) as raised:
        await backend.send(TO, BODY)

    assert "2168" not in str(raised.value)
    assert fake.messages == []
    # The failure was only the next answer: the same backend works again.
    assert (await backend.send(TO, BODY)).ok


async def test_any_other_client_error_is_permanent(
        fake: FakeTwilio, backend: TwilioBackend) -> None:
    fake.fail(404)

    delivery = await backend.send(TO, BODY)

    assert (delivery.ok, delivery.permanent) == (False, True)
    assert "HTTP 404" in delivery.error


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    sender = TwilioBackend(ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER,
                           base_url=f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(TransientSmsError):
            await sender.send(TO, BODY)
    finally:
        await sender.close()


async def test_no_answer_in_time_is_transient(fake: FakeTwilio) -> None:
    fake.stall()
    sender = TwilioBackend(ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, base_url=fake.base_url,
                           timeout=0.3)
    try:
        with pytest.raises(TransientSmsError, match="no answer"):
            await sender.send(TO, BODY)
    finally:
        await sender.close()
    assert [r.status for r in fake.requests] == [0]


async def test_server_error_then_success_with_retry_delivers_once(
        fake: FakeTwilio, backend: TwilioBackend) -> None:
    fake.fail(500)

    delivery = await send_with_retry(backend, TO, BODY, tries=3, first_delay=0.001)

    assert delivery.ok
    assert [r.status for r in fake.requests] == [500, 201]
    [message] = fake.messages
    assert delivery.provider_id == message.sid
    assert (message.to, message.body) == (TO, BODY)


async def test_persistent_rate_limit_gives_up_with_a_non_permanent_failure(
        fake: FakeTwilio, backend: TwilioBackend) -> None:
    fake.fail(429, times=None)

    delivery = await send_with_retry(backend, TO, BODY, tries=3, first_delay=0.001)

    assert (delivery.ok, delivery.permanent) == (False, False)
    assert "gave up after 3 tries" in delivery.error
    assert "20429" in delivery.error
    assert BODY not in delivery.error
    assert [r.status for r in fake.requests] == [429, 429, 429]


async def test_the_body_never_reaches_the_log(
        fake: FakeTwilio, backend: TwilioBackend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake.fail(500)

    assert (await send_with_retry(backend, TO, BODY, tries=2, first_delay=0.001)).ok
    assert not (await backend.send(INVALID_NUMBER, BODY)).ok

    assert caplog.records, "expected the twilio client to log its requests"
    assert "2168" not in caplog.text


def test_fake_serves_from_its_own_thread_for_blocking_tests() -> None:
    async def send_two(base_url: str) -> None:
        sender = TwilioBackend(ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, base_url=base_url)
        try:
            await sender.send(TO, BODY)
            await sender.send(TO, "Your verification code is 0042")
        finally:
            await sender.close()

    with FakeTwilio().in_thread() as fake:
        asyncio.run(send_two(fake.base_url))
        messages = fake.wait_for_messages(2, timeout=10)
    assert [m.body for m in messages] == [BODY, "Your verification code is 0042"]


async def test_close_is_safe_before_use_and_twice() -> None:
    sender = TwilioBackend(ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, base_url="http://127.0.0.1:9")
    await sender.close()
    await sender.close()


async def test_console_backend_prints_the_body(capsys: pytest.CaptureFixture[str]) -> None:
    console = ConsoleBackend()

    first = await console.send(TO, BODY)
    second = await console.send(TO, BODY)
    await console.close()

    assert first.ok
    assert first.provider_id != second.provider_id
    assert capsys.readouterr().out.splitlines() == [f"[sms to {TO}] {BODY}"] * 2


async def test_console_line_names_the_verification(capsys: pytest.CaptureFixture[str]) -> None:
    """Two codes for one number: a script tells them apart by the instance id on the line."""
    console = ConsoleBackend()

    await send_with_retry(console, TO, BODY, instance_id="signup-42")
    await console.send(TO, "Your verification code is 0042", instance_id="login-7")

    assert capsys.readouterr().out.splitlines() == [
        f"[sms to {TO} for signup-42] {BODY}",
        f"[sms to {TO} for login-7] Your verification code is 0042",
    ]


async def test_twilio_backend_does_not_send_the_instance_id(
        fake: FakeTwilio, backend: TwilioBackend) -> None:
    assert (await send_with_retry(backend, TO, BODY, instance_id="signup-42")).ok

    [message] = fake.messages
    assert (message.to, message.body) == (TO, BODY)
