"""Resend and channels over HTTP (rules 15-16, the HTTP additions), against a worker process:
202 with the channel, 429 with Retry-After, 409 for a channel that cannot reach the number,
404 unknown, 410 concluded, 400 for a channel that does not exist."""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from test_http import KEY, base, get, post

from support import Deployment, Worker

INTERVAL = 2.0
SEED = "/admin/extensions/DurableTaskExtension/instances"


@pytest.fixture(scope="module")
def worker(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    deployment = Deployment(kafka, tmp_path_factory.mktemp("resend-http"), settings={
        "RESEND_INTERVAL_SECONDS": str(INTERVAL), "RESEND_LIMIT": "1", "CHANNELS": "sms,call"})
    worker = Worker(deployment).start()
    yield worker
    worker.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=KEY) as session:
        yield session


def phone() -> str:
    return f"+1 425 555 {secrets.randbelow(10_000):04d}"


async def start(http: aiohttp.ClientSession, worker: Worker, **body: Any) -> dict[str, Any]:
    status, started, _ = await post(http, f"{base(worker)}/verifications",
                                    {"phone_number": phone(), **body})
    assert status == 202, started
    return started


async def test_resend_after_the_interval_then_none_left(worker: Worker, http):
    started = await start(http, worker)
    assert started["channel"] == "sms"
    url = f"{base(worker)}/verifications/{started['id']}/resend"
    status, body, headers = await post(http, url, raw=b"")
    assert status == 429, body
    assert 1 <= int(headers["Retry-After"]) <= math.ceil(INTERVAL)
    assert "retry in" in body["error"] and "nothing was sent" in body["error"]
    await asyncio.sleep(int(headers["Retry-After"]))  # as the client is told
    status, body, _ = await post(http, url, {"channel": "call"})
    assert (status, body["result"], body["channel"], body["resendsLeft"]) == (
        202, "resent", "call", 0), body
    _, state = await get(http, f"{base(worker)}/verifications/{started['id']}")
    assert (state["channel"], state["resendsLeft"], state["resendAllowedAt"]) == ("call", 0, None)
    status, body, headers = await post(http, url, raw=b"")
    assert status == 429 and "Retry-After" not in headers  # none is left
    assert body["error"].startswith("not resent (no resend is left (at most 1))")


async def test_the_seed_style_event_resends_and_a_channel_not_offered_is_409(worker, http):
    started = await start(http, worker)
    seed = f"{base(worker)}{SEED}/{started['id']}/raiseEvent/ResendCode"
    status, body, _ = await post(http, seed, {"channel": "whatsapp"})
    assert status == 409, body
    assert body["error"] == ("whatsapp cannot reach this number here; channels that would "
                             "work for this number: sms, call; nothing was sent")
    status, body, _ = await post(http, seed, raw=b"")
    assert status == 429 and body["result"] == "rate_limited"


async def test_unknown_concluded_and_bad_channels(worker: Worker, http):
    status, body, _ = await post(http, f"{base(worker)}/verifications/nobody-{secrets.token_hex(4)}"
                                       "/resend", raw=b"")
    assert status == 404, body
    started = await start(http, worker)
    url = f"{base(worker)}/verifications/{started['id']}"
    status, body, _ = await post(http, f"{url}/resend", {"channel": "pigeon"})
    assert (status, body["error"]) == (400, "channel: use one of sms, whatsapp, call, auto")
    status, body, _ = await post(http, f"{base(worker)}/verifications",
                                 {"phone_number": phone(), "channel": "fax"})
    assert status == 400
    status, body, _ = await post(http, f"{base(worker)}/verifications",
                                 {"phone_number": phone(), "channel": "whatsapp"})
    assert status == 409 and "channels that would work for this number: sms, call" in body["error"]
    await post(http, f"{url}/terminate?reason=done", raw=b"")
    status, body, _ = await post(http, f"{url}/resend", raw=b"")
    assert status == 410 and body["result"] == "ended", body
