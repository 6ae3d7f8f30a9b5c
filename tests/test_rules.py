"""Every rule of the wire contract, end to end through Kafka only, as an outside client sees it.

One worker serves the whole module (short timeout, fast ticks, a short grace for early
commands); each test uses its own instance ids and phone numbers. Rules that need other
settings (guess budget, number policy, retention) have their own deployments further down.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta

import pytest

from phoneverify.topics import partition_for

from support import Client, Deployment, Worker, quiesce

TIMEOUT = 4.0
TICK = 0.2
GRACE = 3.0


@pytest.fixture(scope="module")
def rules_deployment(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(kafka, tmp_path_factory.mktemp("rules"), settings={
        "VERIFICATION_TIMEOUT_SECONDS": str(TIMEOUT),
        "TICK_INTERVAL_SECONDS": str(TICK),
        "EARLY_COMMAND_GRACE_SECONDS": str(GRACE),
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
    code = re.search(r"[0-9]+", sms["body"]).group()  # the first digits (then the window)
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


@pytest.mark.parametrize("number", ["not a phone", "555-0100", "+1 425"])
async def test_invalid_phone_number_gets_an_answer_and_no_dead_letter(
        client: Client, number: str) -> None:
    """A person's typo is answered (reply, outcome), not a record that cannot be read."""
    iid = uuid.uuid4().hex
    reply = await client.ask("verification.start", {"instance_id": iid, "phone_number": number})
    assert (reply["result"], reply["status"], reply["attempts_left"]) == (
        "invalid_phone_number", "failed", None)
    [outcome] = await client.outcomes(iid)
    assert (outcome["verified"], outcome["status"], outcome["reason"], outcome["attempts"]) == (
        False, "failed", "invalid_phone_number", 0)
    assert await client.read_all("verification.sms", key=iid) == []
    await quiesce(client.d)  # the start is committed: whatever it caused is written
    assert await client.read_all("verification.dead-letter", key=iid) == []
    logged = [line for line in (client.d.tmp / "worker-w1.log").read_text().splitlines()
              if iid in line]
    assert [line for line in logged if "[INFO]" in line and "refused" in line], logged
    assert not [line for line in logged if "[WARNING]" in line or "[ERROR]" in line], logged


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
                  "verification.sms-status", "verification.replies", "verification.admission",
                  "verification.admitted"):
        records = await client.read_all(topic, key=iid)
        assert not any(holds_code(r) for r in records), topic
    events = await client.read_all("verification.events", key=iid)
    assert [e["type"] for e in events][:2] == ["started", "sms_requested"]
    assert len(events[0]["code_hash"]) == 64
    changelog = f"{client.d.env()['APP_ID']}-verifications-changelog"
    raw = await client.read_raw(changelog, key=iid)
    assert raw
    assert not any(holds_code(json.loads(value)) for value in raw)


# ---------------------------------------------------------------- rule 10: early commands


async def test_codes_sent_right_after_the_start_are_held_and_applied_in_order(
        client: Client) -> None:
    """The walkthrough's case: four wrong codes sent at once after the start overtake it
    (the start takes more hops); they wait for it and end it, too_many_attempts, no SMS."""
    iid = uuid.uuid4().hex
    await client.start(new_phone(), instance_id=iid)
    replies = [await client.ask("verification.response", {"instance_id": iid, "code": "9999"
                                                          if n % 2 else "8888"})
               for n in range(4)]
    # Ask waits for each reply in turn, so they are in order; the last ends it.
    assert [r["result"] for r in replies] == ["wrong_code"] * 3 + ["too_many_attempts"]
    assert [r["attempts_left"] for r in replies] == [3, 2, 1, 0]
    [outcome] = await client.outcomes(iid)
    assert (outcome["reason"], outcome["attempts"]) == ("too_many_attempts", 4)


async def test_a_terminate_that_overtakes_its_start_ends_it_without_an_sms(
        client: Client) -> None:
    iid = uuid.uuid4().hex
    terminate = {"instance_id": iid, "reason": "too quick", "request_id": "t-1"}
    await client.send("verification.terminate", terminate)
    start = await client.ask("verification.start", {"instance_id": iid,
                                                     "phone_number": new_phone()})
    assert (start["result"], start["status"]) == ("started", "terminated")
    reply = await client.reply(iid, "t-1")
    assert (reply["result"], reply["status"]) == ("terminated", "terminated")
    [outcome] = await client.outcomes(iid)
    assert (outcome["status"], outcome["reason"], outcome["attempts"]) == (
        "terminated", "terminated", 0)
    await quiesce(client.d)
    assert await client.read_all("verification.sms", key=iid) == []


async def test_a_command_whose_start_never_comes_is_dropped_and_the_id_stays_free(
        client: Client, rules_deployment: Deployment) -> None:
    iid = uuid.uuid4().hex
    reply = await client.ask("verification.response", {"instance_id": iid, "code": "1234"},
                             timeout=GRACE + 20)
    assert (reply["result"], reply["status"], reply["attempts_left"], reply["deadline"]) == (
        "unknown", "unknown", None, None)
    terminate = await client.ask("verification.terminate", {"instance_id": iid},
                                 timeout=GRACE + 20)
    assert terminate["result"] == "unknown"
    letters = await client.read("verification.dead-letter", lambda r: len(r) >= 2, key=iid)
    assert all("no verification" in letter["error"] for letter in letters)
    # The code is never in a dead letter (quoted, as the JSON carried it: the hex ids in the
    # value may hold the digits 1234, one run in a thousand).
    assert all('"1234"' not in letter["value"] for letter in letters), letters
    assert await client.read_all("verification.outcome", key=iid) == []
    # A person's wrong id, answered: an INFO line, not a WARNING read as a fault.
    log = [line for line in (rules_deployment.tmp / "worker-w1.log").read_text().splitlines()
           if f"no verification {iid} started" in line]
    assert len(log) == 2 and all("[INFO] dead letter from" in line for line in log), log
    # The id is free: a start now runs normally.
    started = await client.ask("verification.start", {"instance_id": iid,
                                                       "phone_number": new_phone()})
    assert started["result"] == "started"
    code = await client.sms_code(iid)
    verified = await client.ask("verification.response", {"instance_id": iid, "code": code})
    assert (verified["result"], verified["status"], verified["attempts_left"]) == (
        "verified", "verified", 3)


# ---------------------------------------------------------------- replies


async def test_every_command_gets_one_reply_with_what_happened(client: Client) -> None:
    phone, iid = new_phone(), uuid.uuid4().hex
    start = await client.ask("verification.start", {"instance_id": iid, "phone_number": phone})
    assert (start["result"], start["status"], start["attempts_left"]) == ("started", "pending", 4)
    deadline = at(start["deadline"])
    code = await client.sms_code(iid)
    wrong = await client.ask("verification.response", {"instance_id": iid,
                                                       "code": other_code(code)})
    assert (wrong["result"], wrong["status"], wrong["attempts_left"]) == (
        "wrong_code", "pending", 3)
    assert at(wrong["deadline"]) == deadline
    right = await client.ask("verification.response", {"instance_id": iid, "code": code})
    assert (right["result"], right["status"], right["deadline"]) == ("verified", "verified", None)
    again = await client.ask("verification.response", {"instance_id": iid, "code": code})
    assert (again["result"], again["status"]) == ("ended", "verified")
    ended = await client.ask("verification.terminate", {"instance_id": iid})
    assert (ended["result"], ended["status"]) == ("ended", "verified")
    duplicate = await client.ask("verification.start", {"instance_id": iid, "phone_number": phone})
    assert (duplicate["result"], duplicate["status"]) == ("duplicate", "verified")
    for reply in (start, wrong, right, again, ended, duplicate):
        assert reply["instance_id"] == iid
        assert set(reply) >= {"request_id", "instance_id", "command", "result", "status",
                              "attempts_left", "deadline"}
    assert [r["command"] for r in (start, wrong, ended)] == ["start", "response", "terminate"]
    await quiesce(client.d)
    assert len(await client.read_all("verification.sms", key=iid)) == 1


async def test_terminate_and_expired_replies(client: Client) -> None:
    iid = await client.start(new_phone())
    await client.sms_code(iid)
    terminated = await client.ask("verification.terminate", {"instance_id": iid,
                                                             "reason": "user left"})
    assert (terminated["result"], terminated["status"]) == ("terminated", "terminated")
    late = uuid.uuid4().hex
    await client.start(new_phone(), instance_id=late)
    code = await client.sms_code(late)
    await client.outcomes(late, timeout=TIMEOUT + 20)  # expired
    reply = await client.ask("verification.response", {"instance_id": late, "code": code})
    assert (reply["result"], reply["status"]) == ("ended", "failed")


async def test_a_rate_limited_start_is_answered_with_when_to_retry(client: Client) -> None:
    phone = new_phone()
    for _ in range(5):
        await client.ask("verification.start", {"instance_id": uuid.uuid4().hex,
                                                "phone_number": phone})
    reply = await client.ask("verification.start", {"instance_id": uuid.uuid4().hex,
                                                    "phone_number": phone})
    assert (reply["result"], reply["status"]) == ("rate_limited", "failed")
    assert 0 < reply["retry_after"] <= 600


async def test_blocked_numbers_get_an_outcome_and_no_sms(client: Client) -> None:
    for number in ("+1 900 555 0100", "+1 800 555 0100"):  # premium rate, toll free
        iid = uuid.uuid4().hex
        reply = await client.ask("verification.start", {"instance_id": iid,
                                                        "phone_number": number})
        assert (reply["result"], reply["status"]) == ("blocked_number", "failed")
        assert "not served" in reply["detail"]
        [outcome] = await client.outcomes(iid)
        assert (outcome["reason"], outcome["attempts"]) == ("blocked_number", 0)
    await quiesce(client.d)
    assert await client.read_all("verification.sms", key=iid) == []


# ---------------------------------------------------------------- any partitioner


async def test_a_record_on_another_partition_is_moved_to_its_own(client: Client) -> None:
    """A client whose partitioner is not murmur2 writes an answer to the wrong partition: it
    is moved (keeping its time), then applied; the state stays on one partition."""
    iid = await client.start(new_phone())
    code = await client.sms_code(iid)
    partitions = int(client.d.env()["PARTITIONS"])
    own = partition_for(iid.encode(), partitions)
    other = (own + 1) % partitions
    request_id = uuid.uuid4().hex
    await client.producer.send_and_wait(
        client.d.topic("verification.response"),
        json.dumps({"instance_id": iid, "code": code, "request_id": request_id}).encode(),
        key=iid.encode(), partition=other)
    reply = await client.reply(iid, request_id)
    assert reply["result"] == "verified"
    [moved] = await client.read_all("verification.rerouted", key=iid)
    assert "code" not in moved and len(moved["code_hash"]) == 64  # rule 8: no plain code
    changelog = f"{client.d.env()['APP_ID']}-verifications-changelog"
    assert await _partitions_of(client, changelog, iid) == {own}


async def _partitions_of(client: Client, topic: str, key: str) -> set[int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=client.d.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = int(client.d.env()["PARTITIONS"])
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        found: set[int] = set()
        for tp in tps:
            while await consumer.position(tp) < ends[tp]:
                for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    if record.key == key.encode():
                        found.add(tp.partition)
        return found
    finally:
        await consumer.stop()
