"""The async client library against a worker process on the real broker."""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from phoneverify import (
    BlockedNumber,
    InstanceIdInUse,
    InvalidInput,
    InvalidPhoneNumber,
    KafkaUnavailable,
    OutcomeTimeout,
    RateLimited,
    ReplyTimeout,
    UnknownVerification,
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
                    RATE_LIMIT_STARTS="1000", GUESS_LIMIT="1000",
                    EARLY_COMMAND_GRACE_SECONDS="2")
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
    started = await client.start(PHONE)
    iid = started.instance_id
    assert len(iid) == 32 and uuid.UUID(iid).version == 4
    assert (started.result, started.status, started.attempts_left) == ("started", "pending", 2)
    assert started.deadline is not None
    async with Client(shared) as kafka:
        [record] = await kafka.read("verification.start", lambda r: len(r) == 1, key=iid)
        assert record == {"instance_id": iid, "phone_number": "+14255550100",
                          "request_id": started.request_id}
        code = await kafka.sms_code(iid)
    reply = await client.submit_code(iid, code)
    assert (reply.result, reply.status, reply.deadline) == ("verified", "verified", None)
    outcome = await client.wait_for_outcome(iid, timeout=30)
    assert (outcome.instance_id, outcome.verified, outcome.status, outcome.reason,
            outcome.attempts) == (iid, True, "verified", "code_matched", 1)
    assert outcome.completed_at >= outcome.created_at
    # Read again from the beginning of its partition: the same, single outcome.
    assert await client.wait_for_outcome(iid, timeout=30) == outcome


async def test_leading_zeros_count(shared, client):
    iid = next(i for i in (f"zeros-{uuid.uuid4().hex[:8]}" for _ in itertools.count())
               if draw_code(TEST_CODE_KEY.encode(), i, 4).startswith("0"))
    assert (await client.start("4255550100", instance_id=iid)).instance_id == iid
    async with Client(shared) as kafka:
        code = await kafka.sms_code(iid)
    assert code.startswith("0")
    reply = await client.submit_code(iid, code.lstrip("0") or "0")  # "042" is not "0042"
    assert (reply.result, reply.attempts_left) == ("wrong_code", 1)
    assert (await client.submit_code(iid, code)).result == "verified"
    outcome = await client.wait_for_outcome(iid, timeout=30)
    assert (outcome.status, outcome.attempts) == ("verified", 2)


async def test_wrong_codes_fail(shared, client):
    iid = (await client.start(PHONE)).instance_id
    async with Client(shared) as kafka:
        code = await kafka.sms_code(iid)
    results = [(await client.submit_code(iid, wrong(code))).result for _ in range(2)]
    assert results == ["wrong_code", "too_many_attempts"]  # VERIFICATION_MAX_ATTEMPTS=2
    ended = await client.submit_code(iid, code)
    assert (ended.result, ended.status) == ("ended", "failed")
    outcome = await client.wait_for_outcome(iid, timeout=30)
    assert (outcome.verified, outcome.status, outcome.reason, outcome.attempts) == (
        False, "failed", "too_many_attempts", 2)


async def test_terminate(shared, client):
    iid = (await client.start(PHONE, instance_id=f"term-{uuid.uuid4().hex[:8]}")).instance_id
    reply = await client.terminate(iid, "user cancelled")
    assert (reply.result, reply.status) == ("terminated", "terminated")
    assert (await client.terminate(iid)).result == "ended"
    outcome = await client.wait_for_outcome(iid, timeout=30)
    assert (outcome.verified, outcome.status, outcome.reason) == (False, "terminated",
                                                                  "terminated")


async def test_outcomes_iterator_yields_outcomes_as_they_come(shared, client):
    async with client.outcomes() as every, client.outcomes(instance_id="x-none") as none:
        first = (await client.start(PHONE)).instance_id
        second = (await client.start(PHONE)).instance_id
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
    iid = (await client.start(PHONE)).instance_id
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
        with pytest.raises(KafkaUnavailable, match=re.escape(
                "topic no-such-deployment.verification.start does not exist")):
            await client.send_start(PHONE)
    assert issubclass(KafkaUnavailable, VerificationError)


async def test_refusals_raise_typed_errors_that_say_why(shared, client):
    iid = (await client.start(PHONE)).instance_id
    with pytest.raises(InstanceIdInUse, match=f"the id {iid} is already in use") as used:
        await client.start(PHONE, instance_id=iid)
    assert (used.value.reply.result, used.value.reply.status) == ("duplicate", "pending")
    with pytest.raises(InvalidPhoneNumber, match="not a valid phone number"):
        await client.start("555-0100")  # possible (7 digits), not valid
    with pytest.raises(BlockedNumber, match="premium rate numbers are not served"):
        await client.start("+1 900 555 0100")
    with pytest.raises(UnknownVerification, match="no verification nobody-here has started"):
        await client.submit_code("nobody-here", "1234")
    with pytest.raises(UnknownVerification):
        await client.terminate("nobody-here-either")
    for refusal in (InstanceIdInUse, InvalidPhoneNumber, BlockedNumber, UnknownVerification,
                    RateLimited):
        assert issubclass(refusal, VerificationError)


async def test_rate_limited_says_when_to_retry(kafka, tmp_path):
    deployment = Deployment(kafka, tmp_path)
    worker = Worker(deployment, "limited", RATE_LIMIT_STARTS="1").start()
    try:
        async with VerificationClient(kafka, topic_prefix=deployment.prefix) as client:
            await client.start(PHONE)
            with pytest.raises(RateLimited, match="too many verifications") as limited:
                await client.start(PHONE)
            assert 0 < limited.value.retry_after <= 600
    finally:
        worker.stop()


async def test_codes_sent_without_waiting_right_after_the_start_still_count(shared, client):
    iid = f"quick-{uuid.uuid4().hex[:8]}"
    await client.send_start(PHONE, instance_id=iid)
    await client.send_code(iid, "0000" if draw_code(TEST_CODE_KEY.encode(), iid, 4) != "0000"
                           else "1111")
    await client.send_code(iid, draw_code(TEST_CODE_KEY.encode(), iid, 4))
    outcome = await client.wait_for_outcome(iid, timeout=30)
    assert (outcome.status, outcome.attempts) == ("verified", 2)


async def test_no_reply_in_time_says_the_command_may_still_take_effect(shared, client):
    with pytest.raises(ReplyTimeout, match="may still take effect") as late:
        await client.submit_code("nobody-yet", "1234", timeout=0.2)  # unknown after the grace
    assert isinstance(late.value, TimeoutError)
