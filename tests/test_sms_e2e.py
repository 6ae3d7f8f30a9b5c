"""The Twilio path end to end: a worker with SMS_BACKEND=twilio against a local fake Twilio."""

from __future__ import annotations

from fake_twilio import ACCOUNT_SID, AUTH_TOKEN, INVALID_NUMBER, FakeTwilio
from support import Client, Deployment

FROM = "+14255550199"


def twilio_env(fake: FakeTwilio) -> dict[str, str]:
    return {"SMS_BACKEND": "twilio", "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_PHONE_NUMBER": FROM,
            "TWILIO_BASE_URL": fake.base_url}


async def test_verified_through_twilio_and_undeliverable_number_fails(
        deployment: Deployment, start_worker) -> None:
    async with FakeTwilio() as fake, Client(deployment) as client:
        start_worker(**twilio_env(fake))

        iid = await client.start("+1 425-555-0100")
        events = await client.read("verification.events",
                                   lambda r: any(e["type"] == "sms_delivered" for e in r), key=iid)
        [message] = fake.messages
        assert (message.to, message.from_) == ("+14255550100", FROM)
        await client.respond(iid, message.body.rsplit(" ", 1)[1])
        [outcome] = await client.outcomes(iid)
        assert outcome["verified"] is True
        assert [e["type"] for e in events][:3] == ["started", "sms_requested", "sms_delivered"]

        bad = await client.start(INVALID_NUMBER)
        [outcome] = await client.outcomes(bad)
        assert (outcome["verified"], outcome["status"], outcome["reason"]) == (
            False, "failed", "sms_undeliverable")
        [failed] = await client.read("verification.sms-status", lambda r: len(r) >= 1, key=bad)
        assert "21211" in failed["error"]
        assert len(fake.messages) == 1  # nothing was delivered to the invalid number
