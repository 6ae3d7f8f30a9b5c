"""Resend through the Python client and the command line (rule 15) against a worker process:
typed errors with when to retry, and the CLI's words and exit codes."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest
from test_cli import run

from phoneverify import (
    ChannelUnavailable,
    InvalidInput,
    RateLimited,
    UnknownVerification,
    VerificationClient,
    VerificationEnded,
)

from support import Deployment, Worker

INTERVAL = 2.0


@pytest.fixture(scope="module")
def deployment(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(kafka, tmp_path_factory.mktemp("resend-client"), settings={
        "RESEND_INTERVAL_SECONDS": str(INTERVAL), "RESEND_LIMIT": "1",
        "CHANNELS": "sms,call", "EARLY_COMMAND_GRACE_SECONDS": "1"})
    worker = Worker(deployment).start()
    yield deployment
    worker.stop()


@pytest.fixture
async def client(deployment: Deployment) -> AsyncIterator[VerificationClient]:
    async with VerificationClient(deployment.bootstrap, topic_prefix=deployment.prefix,
                                  reply_timeout=30) as client:
        yield client


def phone() -> str:
    return f"+1 425 555 {secrets.randbelow(10_000):04d}"


async def test_the_client_resends_and_raises_typed_refusals(client: VerificationClient):
    started = await client.start(phone())
    assert started.channel == "sms" and started.resends_left == 1
    with pytest.raises(RateLimited) as too_soon:
        await client.resend(started.instance_id)
    assert 0 < too_soon.value.retry_after <= INTERVAL
    with pytest.raises(ChannelUnavailable) as unavailable:
        await client.resend(started.instance_id, channel="whatsapp")
    assert unavailable.value.reply.detail.endswith("would work for this number: sms, call")
    await asyncio.sleep(too_soon.value.retry_after)  # as the error says
    again = await client.resend(started.instance_id, channel="call")
    assert (again.result, again.channel, again.resends_left) == ("resent", "call", 0)
    with pytest.raises(RateLimited) as none_left:
        await client.resend(started.instance_id)
    assert none_left.value.retry_after is None
    await client.terminate(started.instance_id)
    with pytest.raises(VerificationEnded):
        await client.resend(started.instance_id)
    with pytest.raises(UnknownVerification):
        await client.resend(f"never-{secrets.token_hex(4)}")
    with pytest.raises(InvalidInput):
        await client.resend(started.instance_id, channel="pigeon")


async def test_the_command_line_resends_with_words_and_exit_codes(deployment: Deployment):
    env = deployment.env()
    result = await run(env, "start", phone(), "--channel", "sms", "--json")
    assert result.code == 0, result
    iid = result.json()["instance_id"]
    result = await run(env, "resend", iid, "--channel", "whatsapp")
    assert result.code == 4, result
    assert result.err == ("phoneverify resend: whatsapp cannot reach this number here; channels "
                          "that would work for this number: sms, call; nothing was sent\n")
    while (result := await run(env, "resend", iid, "--channel", "call")).code == 4:
        assert re.search(r"^phoneverify resend: not resent \(the code was sent less than "
                         r"2 s ago\): retry in \d s; nothing was sent$", result.err), result
        await asyncio.sleep(1)  # this machine may be slower than the interval, or not
    assert result.code == 0, result
    assert result.out.startswith(f"Resent {iid}: a call with the same code is on its way; "
                                 "0 resends left")
    result = await run(env, "resend", iid, "--json")
    assert result.code == 4 and result.json()["result"] == "rate_limited"
    assert result.err.startswith("phoneverify resend: not resent (no resend is left")
    result = await run(env, "resend", iid, "--channel", "fax")
    assert result.code == 2 and "invalid choice: 'fax'" in result.err
