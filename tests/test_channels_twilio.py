"""WhatsApp and voice calls through Twilio (rule 16), and a call's status feeding the fallback
path (rule 17): the official twilio client against the local fake, then a worker with
SMS_BACKEND=twilio whose status callbacks are posted and signed as Twilio does."""

from __future__ import annotations

import re
from urllib.parse import urlencode

import aiohttp
import pytest
from twilio.request_validator import RequestValidator
from yarl import URL

from phoneverify.delivery.console import ConsoleBackend
from phoneverify.delivery.twilio_sender import TwilioBackend, call_twiml

from fake_twilio import ACCOUNT_SID, AUTH_TOKEN, FakeTwilio
from support import Client, Deployment, Worker

# The twilio client's basic auth goes through aiohttp's deprecated ``auth=``; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(BasicAuth|'auth' parameter).*:DeprecationWarning")

FROM = "+14255550199"
WHATSAPP = "+14155238886"


def speech_body(code: str) -> str:
    """What a code call says in English (the shipped en template)."""
    digits = ", ".join(code)
    return f"Your verification code is: {digits}. Once again, your code is: {digits}."


def backend(fake: FakeTwilio, whatsapp: str = WHATSAPP) -> TwilioBackend:
    return TwilioBackend(ACCOUNT_SID, AUTH_TOKEN, FROM, base_url=fake.base_url,
                         whatsapp_number=whatsapp,
                         status_callback="https://verify.example.com")


def test_a_call_says_the_body_in_the_message_language():
    spoken = speech_body("1708")
    assert call_twiml(spoken) == ('<?xml version="1.0" encoding="UTF-8"?><Response>'
                                  f'<Say language="en-US">{spoken}</Say></Response>')
    assert '<Say language="fr-FR">' in call_twiml(spoken, "fr")
    assert '<Say language="pt-BR">' in call_twiml(spoken, "pt-BR")


async def test_whatsapp_and_calls_through_the_twilio_client():
    async with FakeTwilio() as fake:
        sender = backend(fake)
        try:
            sent = await sender.send("+14255550100", "Your verification code is 1708",
                                     instance_id="i1", command_id="i1/whatsapp/1",
                                     channel="whatsapp")
            assert sent.ok and sent.provider_id.startswith("SM")
            [message] = fake.messages
            assert (message.to, message.from_) == ("whatsapp:+14255550100",
                                                   f"whatsapp:{WHATSAPP}")
            assert "command_id=i1%2Fwhatsapp%2F1" in message.status_callback

            called = await sender.send("+442079460958", speech_body("1708"), instance_id="i2",
                                       command_id="i2/call/1", channel="call", locale="de")
            assert called.ok and called.provider_id.startswith("CA")
            [call] = fake.calls
            assert (call.to, call.from_) == ("+442079460958", FROM)
            assert '<Say language="de-DE">' in call.body
            assert call.body.count("1, 7, 0, 8") == 2
            assert call.status_callback.startswith("https://verify.example.com/twilio/status?")
        finally:
            await sender.close()


async def test_whatsapp_without_a_sender_number_fails_for_good():
    async with FakeTwilio() as fake:
        sender = backend(fake, whatsapp="")
        delivery = await sender.send("+14255550100", "code 1708", channel="whatsapp")
        await sender.close()
    assert (delivery.ok, delivery.permanent) == (False, True)
    assert "TWILIO_WHATSAPP_NUMBER" in delivery.error
    assert fake.requests == []


async def test_the_console_prints_the_channel(capsys):
    await ConsoleBackend().send("+14255550100", speech_body("0042"), instance_id="i3",
                                channel="call")
    assert capsys.readouterr().out == ("[call to +14255550100 for i3] Your verification code "
                                       "is: 0, 0, 4, 2. Once again, your code is: 0, 0, 4, 2.\n")


async def call_status(url: str, status: str) -> int:
    """Post a call's status callback as Twilio does: a form signed with the auth token."""
    params = {"CallSid": "CA" + "1" * 32, "CallStatus": status, "AccountSid": ACCOUNT_SID,
              "To": "+14255550140", "Direction": "outbound-api"}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, params)
    async with aiohttp.ClientSession() as session, session.post(
            URL(url, encoded=True), data=urlencode(params), headers={
                "X-Twilio-Signature": signature,
                "Content-Type": "application/x-www-form-urlencoded"}) as response:
        return response.status


async def test_an_unanswered_fallback_call_fails_and_an_answered_one_verifies(
        deployment: Deployment) -> None:
    from test_sms_e2e import receipt

    async with FakeTwilio() as fake, Client(deployment) as client:
        worker = Worker(deployment, "calls")
        worker.env.update({
            "SMS_BACKEND": "twilio", "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_PHONE_NUMBER": FROM,
            "TWILIO_BASE_URL": fake.base_url, "FALLBACK_CHANNELS": "call",
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{worker.web_port}"})
        worker.start()
        try:
            unanswered = await client.start("+1 425-555-0140")
            answered = await client.start("+1 425-555-0141")
            for iid in (unanswered, answered):
                await client.read("verification.events", lambda r: any(
                    e["type"] == "sms_accepted" for e in r), key=iid)
            for message in fake.messages:  # neither SMS reaches its phone
                assert await receipt(message.status_callback, "undelivered",
                                     ErrorCode="30003") == 204
            await client.read("verification.sms", lambda r: len(r) >= 2, key=answered)
            await client.read("verification.events", lambda r: sum(
                e["type"] == "sms_accepted" for e in r) == 2, key=answered)
            calls = {c.to: c for c in fake.calls}
            assert set(calls) == {"+14255550140", "+14255550141"}
            # The two starts go out in either order (their ids fall on any partitions).
            [sms] = [m for m in fake.messages if m.to == "+14255550141"]
            code = re.search(r"\d+", sms.body).group()
            assert calls["+14255550141"].body.count(", ".join(code)) == 2  # the same code

            assert await call_status(calls["+14255550140"].status_callback, "ringing") == 204
            assert await call_status(calls["+14255550140"].status_callback, "no-answer") == 204
            [outcome] = await client.outcomes(unanswered)
            assert outcome["reason"] == "sms_undeliverable"

            assert await call_status(calls["+14255550141"].status_callback, "completed") == 204
            await client.read("verification.events", lambda r: any(
                e["type"] == "sms_delivered" for e in r), key=answered)
            await client.respond(answered, code)
            [outcome] = await client.outcomes(answered)
            assert outcome["reason"] == "code_matched"
        finally:
            worker.stop()
