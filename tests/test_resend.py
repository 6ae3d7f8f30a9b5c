"""Resend, channels and fallback (rules 15-17) end to end through Kafka, as a client sees them.

One worker serves the module: a short resend interval, two resends, three deliveries per
number per window (rule 9 counts starts and resends alike) and a call as the fallback.
A delivery failing for good is written to ``verification.sms-status`` as the sender or a
provider's receipt would write it.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from support import Client, Deployment, Worker

INTERVAL = 2.0
GRACE = 2.0
LANDLINE = "+44 20 7946 0958"  # a UK fixed line: calls only


@pytest.fixture(scope="module")
def resend_deployment(kafka: str,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(kafka, tmp_path_factory.mktemp("resend"), settings={
        "VERIFICATION_TIMEOUT_SECONDS": "60",
        "EARLY_COMMAND_GRACE_SECONDS": str(GRACE),
        "RESEND_INTERVAL_SECONDS": str(INTERVAL),
        "RESEND_LIMIT": "2",
        "RATE_LIMIT_STARTS": "3",
        "FALLBACK_CHANNELS": "call",
    })
    worker = Worker(deployment).start()
    yield deployment
    worker.stop()


@pytest.fixture
async def client(resend_deployment: Deployment) -> AsyncIterator[Client]:
    async with Client(resend_deployment) as c:
        yield c


def new_phone() -> str:
    return f"+1 425 555 {secrets.randbelow(10_000):04d}"


async def deliveries(client: Client, iid: str, count: int) -> list[dict[str, Any]]:
    return await client.read("verification.sms", lambda r: len(r) >= count, key=iid)


async def started(client: Client, phone: str | None = None, **more: Any) -> dict[str, Any]:
    iid = uuid.uuid4().hex
    reply = await client.ask("verification.start",
                             {"instance_id": iid, "phone_number": phone or new_phone(), **more})
    return reply


async def resend(client: Client, iid: str, **more: Any) -> dict[str, Any]:
    return await client.ask("verification.resend", {"instance_id": iid, **more})


async def wait_out(reply: dict[str, Any]) -> None:
    """Wait as long as a refused resend's ``retry_after`` says, as a client does."""
    assert reply["result"] == "rate_limited" and reply["retry_after"] is not None, reply
    await asyncio.sleep(reply["retry_after"])


async def resend_when_allowed(client: Client, iid: str, **more: Any) -> dict[str, Any]:
    """Resend, and again after ``retry_after`` while it is only too soon."""
    reply = await resend(client, iid, **more)
    while reply["result"] == "rate_limited" and (reply["retry_after"] or 99) <= INTERVAL:
        await wait_out(reply)
        reply = await resend(client, iid, **more)
    return reply


async def test_a_resend_sends_the_same_code_again_once_its_interval_passed(client: Client):
    start = await started(client)
    iid = start["instance_id"]
    assert (start["result"], start["channel"], start["resends_left"]) == ("started", "sms", 2)
    too_soon = await resend(client, iid)
    assert too_soon["result"] == "rate_limited"
    assert 0 < too_soon["retry_after"] <= INTERVAL
    assert too_soon["status"] == "pending" and too_soon["resends_left"] == 2
    await wait_out(too_soon)
    again = await resend(client, iid)
    assert (again["result"], again["channel"], again["resends_left"]) == ("resent", "sms", 1)
    assert again["deadline"] == start["deadline"]
    assert again["attempts_left"] == start["attempts_left"]
    first, second = await deliveries(client, iid, 2)
    assert first["body"] == second["body"]  # the same code
    assert (first["command_id"], second["command_id"]) == (f"{iid}/sms/1", f"{iid}/sms/2")
    code = re.search(r"\d+", second["body"]).group()
    verified = await client.ask("verification.response", {"instance_id": iid, "code": code})
    assert verified["result"] == "verified"


async def test_a_resend_by_call_reads_the_digits_twice(client: Client):
    iid = (await started(client))["instance_id"]
    reply = await resend_when_allowed(client, iid, channel="call")
    assert (reply["result"], reply["channel"]) == ("resent", "call")
    sms, call = await deliveries(client, iid, 2)
    code = re.search(r"\d+", sms["body"]).group()
    spoken = ", ".join(code)
    assert call["channel"] == "call" and call["command_id"] == f"{iid}/call/2"
    assert call["body"].count(spoken) == 2


async def test_every_delivery_counts_against_the_number_limit(client: Client):
    phone = new_phone()
    one = (await started(client, phone))["instance_id"]
    await started(client, phone)
    assert (await resend_when_allowed(client, one))["result"] == "resent"  # the third
    by_number = await resend_when_allowed(client, one)
    assert by_number["result"] == "rate_limited" and by_number["retry_after"] > 60
    third = await started(client, phone)  # a start is a delivery too: refused as well
    assert third["result"] == "rate_limited"
    assert len(await client.read_all("verification.sms", key=one)) == 2


async def test_a_landline_is_verified_by_a_call(client: Client):
    auto = await started(client, LANDLINE, channel="auto")
    assert (auto["result"], auto["channel"]) == ("started", "call")
    [call] = await deliveries(client, auto["instance_id"], 1)
    assert call["channel"] == "call"
    code = re.search(r"\d", call["body"]).group()
    assert code  # the digits are spoken one by one
    refused = await started(client, LANDLINE, channel="sms")
    assert refused["result"] == "channel_unavailable" and refused["status"] == "unknown"
    assert refused["detail"] == ("sms cannot reach this number; channels that would work "
                                 "for this number: call")
    assert await client.read_all("verification.sms", key=refused["instance_id"]) == []
    # The id stays free: the same id may start over a channel that works.
    again = await client.ask("verification.start", {
        "instance_id": refused["instance_id"], "phone_number": LANDLINE, "channel": "call"})
    assert again["result"] == "started"


async def test_an_undelivered_sms_falls_back_to_a_call_then_fails_when_none_is_left(
        client: Client):
    iid = (await started(client))["instance_id"]
    [sms] = await deliveries(client, iid, 1)
    await client.send("verification.sms-status", {
        "type": "sms_failed", "command_id": sms["command_id"], "instance_id": iid,
        "error": "twilio receipt: undelivered (error 30003)"})
    _, call = await deliveries(client, iid, 2)
    assert call["channel"] == "call" and call["command_id"] == f"{iid}/call/2"
    assert ", ".join(re.search(r"\d+", sms["body"]).group()) in call["body"]
    await client.send("verification.sms-status", {
        "type": "sms_failed", "command_id": call["command_id"], "instance_id": iid,
        "error": "call status: no-answer"})
    [outcome] = await client.outcomes(iid)
    assert outcome["reason"] == "sms_undeliverable"
    events = await client.read_all("verification.events", key=iid)
    asked, fallback = [e for e in events if e.get("reason") == "fallback"]
    assert asked["type"] == "delivery_asked"  # of the number's admission (rule 9)
    assert fallback["type"] == "sms_requested" and fallback["channel"] == "call"
    assert fallback["detail"] == "sms failed: twilio receipt: undelivered (error 30003)"


async def test_a_resend_for_an_unknown_id_is_held_then_unknown(client: Client):
    iid = uuid.uuid4().hex
    reply = await resend(client, iid)
    assert (reply["result"], reply["status"]) == ("unknown", "unknown")
    dead = await client.read("verification.dead-letter", lambda r: len(r) >= 1, key=iid)
    assert len(dead) == 1, dead
    [dead] = dead
    assert "no verification" in dead["error"] and "resend" in dead["error"]


async def test_an_unknown_channel_is_a_dead_letter_with_the_reason(client: Client):
    iid = (await started(client))["instance_id"]
    await client.send("verification.resend", {"instance_id": iid, "channel": "pigeon"})
    bad_start = uuid.uuid4().hex
    await client.send("verification.start", {"instance_id": bad_start,
                                             "phone_number": new_phone(), "channel": "fax"})
    for key in (iid, bad_start):
        [dead] = await client.read("verification.dead-letter", lambda r: len(r) >= 1, key=key)
        assert dead["error"].startswith("channel: Input should be 'sms', 'whatsapp', 'call'")
