"""The async client library against a worker process on the real broker."""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from phoneverify.interfaces.client import (
    InvalidInput,
    KafkaUnavailable,
    OutcomeTimeout,
    VerificationClient,
    VerificationError,
)
from phoneverify.models.codes import draw_code

from support import TEST_CODE_KEY, Client, Deployment, Worker

PHONE = "+1 425-555-0100"


@pytest.fixture(scope="module")
def shared(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One deployment and worker for this module's tests (each uses its own instance ids)."""
    deployment = Deployment(kafka, Path(tmp_path_factory.mktemp("client")))
    worker = Worker(deployment, "client-w1", VERIFICATION_MAX_ATTEMPTS="2",
                    RATE_LIMIT_STARTS="1000")
    try:
        worker.start()
        yield deployment
    finally:
        worker.stop()


@pytest.fixture
async def client(shared: Deployment) -> AsyncIterator[VerificationClient]:
    async with VerificationClient(shared.bootstrap, topic_prefix=shared.prefix) as client:
        yield client


def wrong(code: str) -> str:
    return "0000" if code != "0000" else "1111"


async def test_start_then_the_right_code_verifies(shared, client):
    iid = await client.start(PHONE)
    assert len(iid) == 32 and uuid.UUID(iid).version == 4
    async with Client(shared) as kafka:
        [record] = await kafka.read("verification.start", lambda r: len(r) == 1, key=iid)
        assert record == {"instance_id": iid, "phone_number": "+14255550100"}
        code = await kafka.sms_code(iid)
    await client.submit_code(iid, code)
    outcome = await client.wait_for_outcome(iid, timeout=30)
    assert (outcome.instance_id, outcome.verified, outcome.status, outcome.reason,
            outcome.attempts) == (iid, True, "verified", "code_matched", 1)
    assert outcome.completed_at >= outcome.created_at
    # Read again from the beginning of its partition: the same, single outcome.
    assert await client.wait_for_outcome(iid, timeout=30) == outcome


async def test_leading_zeros_count(shared, client):
    iid = next(i for i in (f"zeros-{uuid.uuid4().hex[:8]}" for _ in itertools.count())
               if draw_code(TEST_CODE_KEY.encode(), i, 4).startswith("0"))
    assert await client.start("4255550100", instance_id=iid) == iid
    async with Client(shared) as kafka:
        code = await kafka.sms_code(iid)
        assert code.startswith("0")
        await client.submit_code(iid, code.lstrip("0") or "0")  # "042" is not "0042"
        await kafka.read("verification.events",
                         lambda r: any(e["type"] == "code_rejected" for e in r), key=iid)
    await client.submit_code(iid, code)
    outcome = await client.wait_for_outcome(iid, timeout=30)
    assert (outcome.status, outcome.attempts) == ("verified", 2)


async def test_wrong_codes_fail(shared, client):
    iid = await client.start(PHONE)
    async with Client(shared) as kafka:
        code = await kafka.sms_code(iid)
    for _ in range(2):  # VERIFICATION_MAX_ATTEMPTS=2
        await client.submit_code(iid, wrong(code))
    outcome = await client.wait_for_outcome(iid, timeout=30)
    assert (outcome.verified, outcome.status, outcome.reason, outcome.attempts) == (
        False, "failed", "too_many_attempts", 2)


async def test_terminate(shared, client):
    iid = await client.start(PHONE, instance_id=f"term-{uuid.uuid4().hex[:8]}")
    async with Client(shared) as kafka:
        await kafka.sms_code(iid)  # started
    await client.terminate(iid, "user cancelled")
    outcome = await client.wait_for_outcome(iid, timeout=30)
    assert (outcome.verified, outcome.status, outcome.reason) == (False, "terminated",
                                                                  "terminated")


async def test_outcomes_iterator_yields_outcomes_as_they_come(shared, client):
    async with client.outcomes() as every, client.outcomes(instance_id="x-none") as none:
        first = await client.start(PHONE)
        second = await client.start(PHONE)
        async with Client(shared) as kafka:
            await kafka.sms_code(first)
            await kafka.sms_code(second)
        await client.terminate(second, "second first")
        await client.terminate(first, "then the first")
        seen = [await asyncio.wait_for(anext(every), 30) for _ in range(2)]
        assert sorted(o.instance_id for o in seen) == sorted([first, second])
        assert {o.status for o in seen} == {"terminated"}
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(none), 1)
    # One instance's stream from the beginning finds an outcome published before.
    async with client.outcomes(instance_id=first, from_beginning=True) as mine:
        outcome = await asyncio.wait_for(anext(mine), 30)
        assert outcome.instance_id == first
    # A plain async for over a stream, closed with the client at the latest.
    async for outcome in client.outcomes(instance_id=second, from_beginning=True):
        assert outcome.instance_id == second
        break


async def test_wait_for_outcome_times_out_clearly(client):
    iid = await client.start(PHONE)
    with pytest.raises(OutcomeTimeout, match=f"no outcome for {iid} within 0.5s"):
        await client.wait_for_outcome(iid, timeout=0.5)
    with pytest.raises(TimeoutError):  # a TimeoutError, for callers that catch only that
        await client.wait_for_outcome(iid, timeout=0.2, from_beginning=False)
    await client.terminate(iid)


@pytest.mark.parametrize(("call", "message"), [
    (lambda c: c.start("call me maybe"), "phone_number: not a phone number"),
    (lambda c: c.start("+1 425"), "phone_number: not a possible phone number"),
    (lambda c: c.start(PHONE, instance_id="has space"), "instance id 'has space' is not valid"),
    (lambda c: c.start(PHONE, instance_id="x" * 65), "is not valid"),
    (lambda c: c.submit_code("abc", 42), "code must be a string of digits (leading zeros"),
    (lambda c: c.submit_code("abc", "12a4"), "code must be a string of digits 0-9"),
    (lambda c: c.submit_code("abc", "\uff11\uff12\uff13\uff14"),  # full-width digits
     "code must be a string of digits 0-9"),
    (lambda c: c.terminate("abc", "x" * 501), "reason: String should have at most 500"),
    (lambda c: c.wait_for_outcome("a/b", 1), "instance id 'a/b' is not valid"),
])
async def test_invalid_input_is_refused_before_anything_is_sent(call, message):
    client = VerificationClient("127.0.0.1:1", topic_prefix="never.")  # no Kafka needed
    with pytest.raises(InvalidInput, match=re.escape(message)):
        await call(client)
    await client.close()


async def test_unreachable_kafka_and_missing_topics(kafka):
    with pytest.raises(KafkaUnavailable, match=re.escape("cannot reach Kafka at 127.0.0.1:1")):
        async with VerificationClient("127.0.0.1:1"):
            pass
    async with VerificationClient(kafka, topic_prefix="no-such-deployment.") as client:
        with pytest.raises(KafkaUnavailable, match=re.escape(
                "topic no-such-deployment.verification.start does not exist")):
            await client.start(PHONE)
    assert issubclass(KafkaUnavailable, VerificationError)
