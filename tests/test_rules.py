"""Every rule of the wire contract, end to end through Kafka only, as an outside client sees it.

One worker serves the whole module (short timeout, fast ticks); each test uses its own
instance ids and phone numbers.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta

import pytest

from support import Client, Deployment, Worker, quiesce

TIMEOUT = 4.0
TICK = 0.2


@pytest.fixture(scope="module")
def rules_deployment(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(kafka, tmp_path_factory.mktemp("rules"), settings={
        "VERIFICATION_TIMEOUT_SECONDS": str(TIMEOUT),
        "TICK_INTERVAL_SECONDS": str(TICK),
    })
    worker = Worker(deployment).start()
    yield deployment
    worker.stop()


@pytest.fixture
async def client(rules_deployment: Deployment) -> AsyncIterator[Client]:
    async with Client(rules_deployment) as c:
        yield c


def new_phone() -> str:
    return f"+1 425 555 {secrets.randbelow(10_000):04d}"


def other_code(code: str) -> str:
    return str((int(code) + 1) % 10 ** len(code)).zfill(len(code))


def at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_start_sends_one_sms_with_a_fresh_code(client: Client) -> None:
    iid = await client.start(new_phone())
    [sms] = await client.read("verification.sms", lambda r: len(r) >= 1, key=iid)
    assert sms["to"].startswith("+1425555")
    assert sms["body"].startswith("Your verification code is ")
    code = sms["body"].rsplit(" ", 1)[1]
    assert len(code) == 4
    assert code.isdigit()
    assert sms["command_id"]
    assert sms["instance_id"] == iid


async def test_correct_code_verifies(client: Client) -> None:
    iid = await client.start(new_phone())
    await client.respond(iid, await client.sms_code(iid))
    [outcome] = await client.outcomes(iid)
    assert outcome["verified"] is True
    assert outcome["status"] == "verified"
    assert outcome["reason"] == "code_matched"
    assert outcome["attempts"] == 1
    assert at(outcome["created_at"]) <= at(outcome["completed_at"])


async def test_three_wrong_codes_then_the_right_one_verifies(client: Client) -> None:
    iid = await client.start(new_phone())
    code = await client.sms_code(iid)
    for _ in range(3):
        await client.respond(iid, other_code(code))
    await client.respond(iid, code)
    [outcome] = await client.outcomes(iid)
    assert (outcome["verified"], outcome["attempts"]) == (True, 4)


async def test_fourth_wrong_code_fails_at_once(client: Client) -> None:
    iid = await client.start(new_phone())
    code = await client.sms_code(iid)
    for _ in range(4):
        await client.respond(iid, other_code(code))
    [outcome] = await client.outcomes(iid)
    assert outcome["verified"] is False
    assert (outcome["status"], outcome["reason"], outcome["attempts"]) == (
        "failed", "too_many_attempts", 4)
    # Well before the deadline: the last wrong code ended it.
    assert at(outcome["completed_at"]) - at(outcome["created_at"]) < timedelta(seconds=TIMEOUT)


async def test_leading_zeros_count(client: Client) -> None:
    iid = await client.start(new_phone())
    code = await client.sms_code(iid)
    await client.respond(iid, code.lstrip("0") + "0" if code.startswith("0") else "0" + code)
    await client.respond(iid, code)
    [outcome] = await client.outcomes(iid)
    assert (outcome["verified"], outcome["attempts"]) == (True, 2)


async def test_no_answer_expires_within_one_tick_of_the_deadline(client: Client) -> None:
    iid = await client.start(new_phone())
    await client.sms_code(iid)
    [outcome] = await client.outcomes(iid, timeout=TIMEOUT + 20)
    assert (outcome["verified"], outcome["reason"]) == (False, "expired")
    waited = at(outcome["completed_at"]) - at(outcome["created_at"])
    assert timedelta(seconds=TIMEOUT) <= waited <= timedelta(seconds=TIMEOUT + TICK + 0.5)


async def test_right_code_after_the_deadline_does_not_verify(client: Client) -> None:
    iid = await client.start(new_phone())
    code = await client.sms_code(iid)
    [outcome] = await client.outcomes(iid, timeout=TIMEOUT + 20)
    await client.respond(iid, code)
    await quiesce(client.d)
    assert await client.outcomes(iid) == [outcome]
    assert outcome["reason"] == "expired"


async def test_terminate_ends_it(client: Client) -> None:
    iid = await client.start(new_phone())
    await client.sms_code(iid)
    await client.send("verification.terminate", {"instance_id": iid, "reason": "user left"})
    [outcome] = await client.outcomes(iid)
    assert (outcome["verified"], outcome["status"], outcome["reason"]) == (
        False, "terminated", "terminated")


async def test_exactly_one_outcome_and_one_sms_ever(client: Client) -> None:
    phone = new_phone()
    iid = await client.start(phone)
    code = await client.sms_code(iid)
    await client.respond(iid, code)
    [outcome] = await client.outcomes(iid)
    # Everything after the conclusion changes nothing and publishes nothing.
    await client.start(phone, instance_id=iid)
    await client.respond(iid, other_code(code))
    await client.respond(iid, code)
    await client.send("verification.terminate", {"instance_id": iid, "reason": "late"})
    await quiesce(client.d)
    assert await client.outcomes(iid) == [outcome]
    smses = await client.read_all("verification.sms", key=iid)
    assert len(smses) == 1


async def test_unparsable_input_goes_to_dead_letters_and_the_worker_goes_on(
        client: Client) -> None:
    bad_key = uuid.uuid4().hex
    await client.send("verification.start", b"{not json", key=bad_key)
    await client.send("verification.start",
                      {"instance_id": "no spaces allowed", "phone_number": "1"}, key=bad_key)
    letters = await client.read(
        "verification.dead-letter", lambda r: len(r) >= 2, key=bad_key)
    assert letters[0]["topic"].endswith("verification.start")
    assert letters[0]["value"] == "{not json"
    assert "json" in letters[0]["error"].lower()
    assert "instance_id" in letters[1]["error"]
    assert {"partition", "offset", "key"} <= letters[0].keys()
    # The worker went on.
    iid = await client.start(new_phone())
    await client.respond(iid, await client.sms_code(iid))
    [outcome] = await client.outcomes(iid)
    assert outcome["verified"] is True


async def test_invalid_phone_number_gets_an_outcome_and_a_dead_letter(client: Client) -> None:
    iid = await client.start("not a phone")
    [outcome] = await client.outcomes(iid)
    assert (outcome["verified"], outcome["status"], outcome["reason"], outcome["attempts"]) == (
        False, "failed", "invalid_phone_number", 0)
    [letter] = await client.read("verification.dead-letter", lambda r: len(r) >= 1, key=iid)
    assert "phone_number" in letter["error"]


async def test_a_bad_response_never_puts_the_code_in_a_dead_letter(client: Client) -> None:
    iid = await client.start(new_phone())
    code = await client.sms_code(iid)
    await client.send("verification.response", {"instance_id": iid, "code": int(code) + 10000})
    await client.send("verification.response", f'{{"instance_id": "{iid}", "code": "{code}"',
                      key=iid)
    letters = await client.read("verification.dead-letter", lambda r: len(r) >= 2, key=iid)
    for letter in letters:
        assert code not in letter["value"]
        assert code not in letter["error"]
    assert "code" in letters[0]["error"]


async def test_wrong_record_key_is_refused(client: Client) -> None:
    iid = await client.start(new_phone())
    code = await client.sms_code(iid)
    await client.send("verification.response", {"instance_id": iid, "code": code}, key="other")
    [letter] = await client.read("verification.dead-letter", lambda r: len(r) >= 1, key="other")
    assert "key" in letter["error"]


async def test_rate_limit_per_phone_number(client: Client) -> None:
    phone = new_phone()
    ids = [await client.start(phone) for _ in range(6)]
    # The six starts travel on different partitions until the limiter re-keys them by number,
    # so which one comes sixth there is not the order they were sent in.
    outcomes = await client.read(
        "verification.outcome",
        lambda r: any(o["instance_id"] in ids and o["reason"] == "rate_limited" for o in r))
    [limited] = [o for o in outcomes if o["instance_id"] in ids and o["reason"] == "rate_limited"]
    assert limited["verified"] is False
    await quiesce(client.d)
    sms = await client.read_all("verification.sms")
    assert {s["instance_id"] for s in sms} & set(ids) == set(ids) - {limited["instance_id"]}
    # Another number is not affected.
    other = await client.start(new_phone())
    assert await client.sms_code(other)


async def test_the_code_is_never_written_outside_the_sms_topic(client: Client) -> None:
    iid = await client.start(new_phone())
    code = await client.sms_code(iid)
    await client.respond(iid, other_code(code))
    await client.respond(iid, code)
    await client.outcomes(iid)
    await quiesce(client.d)

    def holds_code(value: object) -> bool:
        if isinstance(value, dict):
            return any(holds_code(v) for v in value.values())
        if isinstance(value, list):
            return any(holds_code(v) for v in value)
        return isinstance(value, str) and (value == code or f"is {code}" in value)

    for topic in ("verification.events", "verification.outcome", "verification.dead-letter",
                  "verification.sms-status"):
        records = await client.read_all(topic, key=iid)
        assert not any(holds_code(r) for r in records), topic
    events = await client.read_all("verification.events", key=iid)
    assert [e["type"] for e in events][:2] == ["started", "sms_requested"]
    assert len(events[0]["code_hash"]) == 64
    changelog = f"{client.d.env()['APP_ID']}-verifications-changelog"
    raw = await client.read_raw(changelog, key=iid)
    assert raw
    assert not any(holds_code(json.loads(value)) for value in raw)


async def test_terminate_before_the_start_arrives_means_it_never_runs(client: Client) -> None:
    # A start takes two more hops than a terminate, so a quick terminate may overtake it.
    iid = uuid.uuid4().hex
    await client.send("verification.terminate", {"instance_id": iid, "reason": "too quick"})
    [outcome] = await client.outcomes(iid)
    assert (outcome["status"], outcome["reason"], outcome["attempts"]) == (
        "terminated", "terminated", 0)
    await client.start(new_phone(), instance_id=iid)
    await quiesce(client.d)
    assert await client.read_all("verification.sms", key=iid) == []
    assert await client.outcomes(iid) == [outcome]


async def test_an_answer_for_an_unknown_verification_is_a_dead_letter(client: Client) -> None:
    iid = uuid.uuid4().hex
    await client.respond(iid, "1234")
    [letter] = await client.read("verification.dead-letter", lambda r: len(r) >= 1, key=iid)
    assert "no verification" in letter["error"]
    assert "1234" not in letter["value"]
