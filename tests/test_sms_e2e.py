"""The Twilio path end to end: a worker with SMS_BACKEND=twilio against a local fake Twilio,
and Twilio's delivery receipts through the worker's real endpoint, signed by the twilio
library itself."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

import aiohttp
from twilio.request_validator import RequestValidator
from yarl import URL

from fake_twilio import ACCOUNT_SID, AUTH_TOKEN, INVALID_NUMBER, FakeTwilio
from support import Client, Deployment, Worker

FROM = "+14255550199"
KEY = {"X-API-Key": "test-api-key"}


def twilio_env(fake: FakeTwilio, **extra: str) -> dict[str, str]:
    return {"SMS_BACKEND": "twilio", "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_PHONE_NUMBER": FROM,
            "TWILIO_BASE_URL": fake.base_url, **extra}


async def test_verified_through_twilio_and_undeliverable_number_fails(
        deployment: Deployment, start_worker) -> None:
    async with FakeTwilio() as fake, Client(deployment) as client:
        start_worker(**twilio_env(fake))

        iid = await client.start("+1 425-555-0100")
        events = await client.read("verification.events",
                                   lambda r: any(e["type"] == "sms_accepted" for e in r), key=iid)
        [message] = fake.messages
        assert (message.to, message.from_) == ("+14255550100", FROM)
        assert message.status_callback is None  # no PUBLIC_BASE_URL: no receipts asked for
        await client.respond(iid, re.search(r"[0-9]+", message.body).group())
        [outcome] = await client.outcomes(iid)
        assert outcome["verified"] is True
        assert [e["type"] for e in events][:3] == ["started", "sms_requested", "sms_accepted"]

        bad = await client.start(INVALID_NUMBER)
        [outcome] = await client.outcomes(bad)
        assert (outcome["verified"], outcome["status"], outcome["reason"]) == (
            False, "failed", "sms_undeliverable")
        [failed] = await client.read("verification.sms-status", lambda r: len(r) >= 1, key=bad)
        assert "21211" in failed["error"]
        assert len(fake.messages) == 1  # nothing was delivered to the invalid number


async def receipt(url: str, status: str, signature_token: str = AUTH_TOKEN,
                  signed_url: str | None = None, **extra: str) -> int:
    """Post a status callback to ``url`` as Twilio does: a form, signed with the auth token
    (over ``signed_url``, by default the URL posted to)."""
    params = {"MessageSid": "SM" + "1" * 32, "MessageStatus": status,
              "AccountSid": ACCOUNT_SID, "To": "+14255550130", **extra}
    signature = RequestValidator(signature_token).compute_signature(signed_url or url, params)
    async with aiohttp.ClientSession() as session, session.post(
            URL(url, encoded=True), data=urlencode(params), headers={  # the URL as Twilio has it
                "X-Twilio-Signature": signature,
                "Content-Type": "application/x-www-form-urlencoded"}) as response:
        return response.status


async def status(worker: Worker, iid: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{worker.web_port}/verifications/{iid}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=KEY) as response:
        return await response.json()


async def test_delivery_receipts_mark_delivered_or_fail_at_once(
        deployment: Deployment, start_worker) -> None:
    async with FakeTwilio() as fake, Client(deployment) as client:
        worker = Worker(deployment, "receipts")
        worker.env.update(twilio_env(fake, PUBLIC_BASE_URL=f"http://127.0.0.1:{worker.web_port}"))
        worker.start()
        try:
            delivered = await client.start("+1 425-555-0130")
            failing = await client.start("+1 425-555-0131")
            for iid in (delivered, failing):
                await client.read("verification.events", lambda r: any(
                    e["type"] == "sms_accepted" for e in r), key=iid)
            callbacks = {m.to: m.status_callback for m in fake.messages}
            url = callbacks["+14255550130"]
            assert url is not None and url.startswith(
                f"http://127.0.0.1:{worker.web_port}/twilio/status?instance_id={delivered}")

            assert await receipt(url, "sent") == 204  # on its way: nothing to record
            assert await receipt(url, "delivered", signature_token="wrong-token") == 403
            assert await receipt(url + "&x=1", "delivered", signed_url=url) == 403  # URL signed
            assert (await status(worker, delivered))["sms"] == "sent"
            assert await receipt(url, "delivered") == 204
            await client.read("verification.events", lambda r: any(
                e["type"] == "sms_delivered" for e in r), key=delivered)
            assert (await status(worker, delivered))["sms"] == "delivered"
            assert await receipt(url, "delivered") == 204  # Twilio may repeat itself

            assert await receipt(callbacks["+14255550131"], "undelivered",
                                 ErrorCode="30003") == 204
            [outcome] = await client.outcomes(failing)
            assert (outcome["status"], outcome["reason"]) == ("failed", "sms_undeliverable")
            state = await status(worker, failing)
            assert state["runtimeStatus"] == "Completed" and state["output"] is False
            [delivered_outcome] = await client.read_all("verification.outcome",
                                                        key=delivered) or [None]
            assert delivered_outcome is None  # a receipt never concludes a verification
        finally:
            worker.stop()
