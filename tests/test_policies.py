"""Contract rules 11 to 14, end to end: the guess budget, the number policy, short-lived codes in
Kafka, and retention. Each needs settings of its own, so each has its own deployment."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from phoneverify.ops.replay import run as replay

from support import Client, Deployment, quiesce

PHONE = "+1 425 555 0177"
KEY = {"X-API-Key": "test-api-key"}


@pytest.fixture
async def client(deployment: Deployment) -> AsyncIterator[Client]:
    async with Client(deployment) as c:
        yield c


def start(phone: str = PHONE, iid: str | None = None) -> dict[str, str]:
    return {"instance_id": iid or uuid.uuid4().hex, "phone_number": phone}


# ---------------------------------------------------------------- rule 11: the guess budget


async def test_the_guess_budget_holds_exactly_under_concurrent_starts(
        deployment: Deployment, start_worker, client: Client) -> None:
    start_worker(GUESS_LIMIT="6", VERIFICATION_MAX_ATTEMPTS="4", RATE_LIMIT_STARTS="100")
    # Five starts for one number at once: the budget of 6 is reserved, never more.
    replies = await asyncio.gather(*(client.ask("verification.start", start())
                                     for _ in range(5)))
    started = [r for r in replies if r["result"] == "started"]
    assert sorted(r["attempts_left"] for r in started) == [2, 4]
    limited = [r for r in replies if r["result"] == "rate_limited"]
    assert len(limited) == 3 and all(r["retry_after"] > 0 for r in limited)

    # The one with 4 attempts: one wrong code, then the right one. 3 attempts come back.
    four = next(r for r in started if r["attempts_left"] == 4)["instance_id"]
    two = next(r for r in started if r["attempts_left"] == 2)["instance_id"]
    code = await client.sms_code(four)
    wrong = "0000" if code != "0000" else "1111"
    assert (await client.ask("verification.response", {"instance_id": four, "code": wrong})
            )["result"] == "wrong_code"
    assert (await client.ask("verification.response", {"instance_id": four, "code": code})
            )["result"] == "verified"
    # 6 - 1 wrong code - 2 reserved by the open one = 3 left.
    third = await wait_for_start(client, expected_attempts=3)
    # Terminating the open one gives its 2 back: 6 - 1 - 3 (third) = 2.
    await client.ask("verification.terminate", {"instance_id": two})
    assert (await wait_for_start(client, expected_attempts=2))["result"] == "started"
    assert third["result"] == "started"
    # No budget left now (1 spent + 3 + 2 reserved): refused, and no SMS.
    refused = await client.ask("verification.start", start())
    assert refused["result"] == "rate_limited"
    await quiesce(deployment)
    assert await client.read_all("verification.sms", key=refused["instance_id"]) == []


async def wait_for_start(client: Client, expected_attempts: int) -> dict[str, object]:
    """Settlements travel to the number's stage asynchronously: start until they are in."""
    for _ in range(50):
        reply = await client.ask("verification.start", start())
        if reply["result"] == "started" and reply["attempts_left"] == expected_attempts:
            return reply
        if reply["result"] == "started":  # not yet settled: give this one back
            await client.ask("verification.terminate", {"instance_id": reply["instance_id"]})
        await asyncio.sleep(0.1)
    raise AssertionError(f"no start got {expected_attempts} attempts")


# ---------------------------------------------------------------- rule 12: regions


async def test_numbers_outside_the_allowed_regions_are_blocked(
        deployment: Deployment, start_worker, client: Client) -> None:
    start_worker(PHONE_ALLOWED_REGIONS="de, fr")
    us = await client.ask("verification.start", start("+1 425 555 0178"))
    assert (us["result"], us["status"]) == ("blocked_number", "failed")
    assert "region US" in us["detail"]
    germany = await client.ask("verification.start", start("+49 151 23456789"))
    assert germany["result"] == "started"
    assert await client.sms_code(germany["instance_id"])


# ---------------------------------------------------------------- rule 13: codes in Kafka


async def test_the_sms_topic_keeps_codes_an_hour_and_an_existing_topic_is_altered(
        deployment: Deployment, start_worker) -> None:
    sms_topic = deployment.topic("verification.sms")
    admin = AIOKafkaAdminClient(bootstrap_servers=deployment.bootstrap)
    await admin.start()
    try:  # as an older version left it: the broker's default of a week
        await admin.create_topics([NewTopic(sms_topic, 4, 1, topic_configs={
            "retention.ms": str(7 * 24 * 3600 * 1000)})])
        start_worker()
        [response] = await admin.describe_configs([ConfigResource(
            ConfigResourceType.TOPIC, sms_topic, configs={"retention.ms": None})])
        [(_code, _message, _type, _name, entries)] = response.resources
        assert {entry[0]: entry[1] for entry in entries}["retention.ms"] == "3600000"
    finally:
        await admin.close()


# ---------------------------------------------------------------- rule 14: retention


async def test_a_concluded_verification_is_forgotten_after_its_retention(
        deployment: Deployment, start_worker, client: Client) -> None:
    env = {"VERIFICATION_RETENTION_SECONDS": "3", "RATE_LIMIT_WINDOW_SECONDS": "1",
           "GUESS_LIMIT_WINDOW_SECONDS": "2", "EARLY_COMMAND_GRACE_SECONDS": "1"}
    worker = start_worker(**env)
    iid = uuid.uuid4().hex
    assert (await client.ask("verification.start", start(iid=iid)))["result"] == "started"
    code = await client.sms_code(iid)
    assert (await client.ask("verification.response", {"instance_id": iid, "code": "0000"
                             if code != "0000" else "1111"}))["result"] == "wrong_code"
    assert (await client.ask("verification.response", {"instance_id": iid, "code": code})
            )["result"] == "verified"
    # Kept: its status answers, and the id cannot be started again.
    assert (await status(worker, iid))[0] == 200
    assert (await client.ask("verification.start", start(iid=iid)))["result"] == "duplicate"
    # Past its retention: 404, and its changelog ends with a tombstone (a delete).
    await wait_until_async(lambda: status_code(worker, iid, 404), 20, "the status to be 404")
    changelog = f"{deployment.env()['APP_ID']}-verifications-changelog"
    assert (await client.read_raw(changelog, key=iid))[-1] is None
    # The number's state is deleted too once nothing of it is inside a window.
    numbers = f"{deployment.env()['APP_ID']}-numbers-changelog"
    await wait_until_async(lambda: last_is_tombstone(client, numbers, "+14255550177"), 20,
                           "the number's state to be deleted")
    # A restart (its own store, or a new one) does not bring it back.
    worker.stop()
    again = start_worker("again", **env)
    assert (await status(again, iid))[0] == 404
    # The id is free: a new start is a new life, and replay agrees with the table.
    assert (await client.ask("verification.start", start(iid=iid)))["result"] == "started"
    await quiesce(deployment)
    report = await replay(deployment.app_settings())
    assert report.problems == []
    assert report.live == 1 and report.no_longer_kept == 1


async def status(worker, iid: str) -> tuple[int, dict[str, object]]:
    url = f"http://127.0.0.1:{worker.web_port}/verifications/{iid}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=KEY) as response:
        return response.status, await response.json()


async def status_code(worker, iid: str, code: int) -> bool:
    return (await status(worker, iid))[0] == code


async def last_is_tombstone(client: Client, topic: str, key: str) -> bool:
    values = await client.read_raw(topic, key=key)
    return bool(values) and values[-1] is None


async def wait_until_async(condition, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.2)



