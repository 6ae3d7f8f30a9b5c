"""Delivery guarantees under SIGKILL, and replay: the state is rebuilt from the events alone.

The worker is killed (no shutdown, no flush, no commit) while starts are in flight, with codes
sent before their starts (held, waiting for them), and again while answers are in flight. The
first restart reuses the killed worker's local store (its RocksDB files, as a restart on the
same machine does); the second starts from an empty one (restored from the changelogs).
Afterwards every command has its reply (copies identical), every verification its outcome
(copies identical), no verification got two SMS with different codes, no redelivered wrong
answer was counted twice, and replaying ``verification.events`` gives exactly the live table.
In both modes (``PROCESSING_GUARANTEE``); under ``exactly_once`` a ``read_committed`` reader
(as the test's client is) sees no copy at all.
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from typing import Any

import pytest

from phoneverify.models.codes import draw_code
from phoneverify.ops.replay import run as replay

from support import TEST_CODE_KEY, Client, Deployment

N = 600
# A long window and grace: the restarts must not expire anything or drop a held code. And a
# long wait for answers before the fraud guard judges a delivery unconverted (rule 20): every
# number shares one prefix and no code is answered before all are sent, which is what SMS
# pumping looks like: with the default 60 s, a slow restart gets the prefix blocked, and what
# is not admitted by then (starts, fallback calls) is refused, its delivery never comes. The
# guard still follows every delivery and conclusion through the kills.
ENV = {"VERIFICATION_TIMEOUT_SECONDS": "900", "EARLY_COMMAND_GRACE_SECONDS": "300",
       "FRAUD_ANSWER_SECONDS": "900"}


def by_instance(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        grouped[record["instance_id"]].append(record)
    return grouped


def other(code: str) -> str:
    return str((int(code) + 1) % 10_000).zfill(4)


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
async def test_sigkill_in_flight_loses_nothing_and_never_sends_two_codes(
        deployment: Deployment, start_worker, guarantee: str) -> None:
    env = {**ENV, "PROCESSING_GUARANTEE": guarantee}
    worker = start_worker("first", **env)
    ids = [uuid.uuid4().hex for _ in range(N)]
    codes = {iid: draw_code(TEST_CODE_KEY.encode(), iid, 4) for iid in ids}
    async with Client(deployment) as client:
        for i, iid in enumerate(ids):  # a wrong code overtakes each start: it is held
            await client.send("verification.response", {"instance_id": iid,
                                                        "code": other(codes[iid]),
                                                        "request_id": f"w-{iid}"})
            await client.send("verification.start", {"instance_id": iid,
                                                     "phone_number": f"+1425555{i:04d}",
                                                     "request_id": f"s-{iid}"})
        await client.read("verification.sms", lambda r: len(r) >= N // 4)
        worker.kill()
        worker = start_worker("first", **env)  # the same local store

        sms = by_instance(await client.read(
            "verification.sms", lambda r: len(by_instance(r)) == N, timeout=120))
        assert all(len({s["body"] for s in copies}) == 1 for copies in sms.values())
        assert {iid: re.search(r"[0-9]+", copies[0]["body"]).group()
                for iid, copies in sms.items()} == codes

        for iid in ids:
            await client.send("verification.response", {"instance_id": iid, "code": codes[iid],
                                                        "request_id": f"r-{iid}"})
        await client.read("verification.outcome", lambda r: len(r) >= N // 4, timeout=120)
        worker.kill()
        start_worker("second", **env)  # an empty local store

        outcomes = by_instance(await client.read(
            "verification.outcome", lambda r: len(by_instance(r)) == N, timeout=120))
        assert set(outcomes) == set(ids)
        for copies in outcomes.values():
            assert all(copy == copies[0] for copy in copies)  # duplicates are identical
            assert copies[0]["verified"] is True, copies[0]
            assert copies[0]["attempts"] == 2  # the held wrong code counted once, then right

        replies = defaultdict(list)
        for reply in await client.read(
                "verification.replies", lambda r: len({x["request_id"] for x in r}) == 3 * N,
                timeout=120):
            replies[reply["request_id"]].append(reply)
        for iid in ids:
            for request, result, left in ((f"s-{iid}", "started", 4),
                                          (f"w-{iid}", "wrong_code", 3),
                                          (f"r-{iid}", "verified", 2)):
                copies = replies[request]
                assert all(copy == copies[0] for copy in copies), copies
                assert (copies[0]["result"], copies[0]["attempts_left"]) == (result, left)
        if guarantee == "exactly_once":  # read_committed, as the client reads: each once
            assert all(len(copies) == 1 for copies in outcomes.values())
            assert all(len(copies) == 1 for copies in replies.values())
            assert all(len(copies) == 1 for copies in sms.values())
        print(f"\n{guarantee}, {N} verifications, 2 kills: "
              f"{sum(len(c) - 1 for c in outcomes.values())} duplicate outcomes, "
              f"{sum(len(c) - 1 for c in replies.values())} duplicate replies, "
              f"{sum(len(c) - 1 for c in sms.values())} duplicate SMS commands (same code)")

    report = await replay(deployment.app_settings())
    assert report.problems == []
    assert report.rebuilt == report.live == report.matching == N


async def test_replay_reports_a_difference(deployment: Deployment, start_worker) -> None:
    start_worker()
    async with Client(deployment) as client:
        iid = await client.start()
        await client.respond(iid, await client.sms_code(iid))
        await client.outcomes(iid)
        report = await replay(deployment.app_settings())
        assert report.ok
        assert report.matching == 1
        first = (await client.read_all("verification.events", key=iid))[0]
        # An event nobody decided: replay must notice that the table disagrees.
        await client.send("verification.events", {
            "seq": 99, "life": first["life"], "type": "terminated", "instance_id": iid,
            "reason": "forged", "attempts": 0, "at": "2030-01-01T00:00:00Z"})
        report = await replay(deployment.app_settings())
        assert not report.ok
        assert any(iid in problem for problem in report.problems)


def digits(body: str) -> str:
    """The code in a delivery's body: its first run of digits, or a call's digits said one by
    one (``1, 7, 0, 8``)."""
    return re.search(r"\d(?:, \d)+|\d+", body).group().replace(", ", "")


async def test_sigkill_with_resends_and_fallbacks_keeps_one_code_and_each_command_once(
        deployment: Deployment, start_worker) -> None:
    n = 200
    env = {**ENV, "RESEND_INTERVAL_SECONDS": "0", "RESEND_LIMIT": "2",
           "FALLBACK_CHANNELS": "call", "RATE_LIMIT_STARTS": "10"}
    worker = start_worker("first", **env)
    ids = [uuid.uuid4().hex for _ in range(n)]
    codes = {iid: draw_code(TEST_CODE_KEY.encode(), iid, 4) for iid in ids}
    failing = set(ids[::2])  # their resend fails for good: a call follows

    def commands(records: list[dict[str, Any]]) -> dict[str, set[str]]:
        return {iid: {r["command_id"] for r in copies}
                for iid, copies in by_instance(records).items()}

    async with Client(deployment) as client:
        for i, iid in enumerate(ids):
            await client.send("verification.start", {"instance_id": iid,
                                                     "phone_number": f"+1425556{i:04d}",
                                                     "request_id": f"s-{iid}"})
            await client.send("verification.resend", {"instance_id": iid,
                                                      "request_id": f"r-{iid}"})
        await client.read("verification.sms", lambda r: len(r) >= n // 2)
        worker.kill()
        worker = start_worker("first", **env)  # the same local store
        await client.read("verification.sms", lambda r: sum(
            len(c) == 2 for c in commands(r).values()) == n, timeout=180)
        for iid in failing:
            await client.send("verification.sms-status", {
                "type": "sms_failed", "command_id": f"{iid}/sms/2", "instance_id": iid,
                "error": "twilio receipt: undelivered (error 30003)"})
        await client.read("verification.sms", lambda r: sum(
            r_["channel"] == "call" for r_ in r) >= len(failing) // 4, timeout=120)
        worker.kill()
        start_worker("second", **env)  # an empty local store

        sms = await client.read("verification.sms", lambda r: sum(
            len(c) == 3 for c in commands(r).values()) == len(failing), timeout=180)
        for iid, copies in by_instance(sms).items():
            expected = {f"{iid}/sms/1", f"{iid}/sms/2"} | (
                {f"{iid}/call/3"} if iid in failing else set())
            assert {c["command_id"] for c in copies} == expected
            assert {digits(c["body"]) for c in copies} == {codes[iid]}  # one code
            by_command = defaultdict(list)
            for copy in copies:
                by_command[copy["command_id"]].append(copy)
            assert all(all(c == cs[0] for c in cs) for cs in by_command.values())

        for iid in ids:
            await client.send("verification.response", {"instance_id": iid, "code": codes[iid],
                                                        "request_id": f"v-{iid}"})
        outcomes = by_instance(await client.read(
            "verification.outcome", lambda r: len(by_instance(r)) == n, timeout=120))
        assert all(c[0]["verified"] and all(x == c[0] for x in c) for c in outcomes.values())
        replies = defaultdict(list)
        for reply in await client.read(
                "verification.replies", lambda r: len({x["request_id"] for x in r}) == 3 * n,
                timeout=120):
            replies[reply["request_id"]].append(reply)
        for iid in ids:
            for request, result in ((f"s-{iid}", "started"), (f"r-{iid}", "resent"),
                                    (f"v-{iid}", "verified")):
                copies = replies[request]
                assert all(copy == copies[0] for copy in copies), copies
                assert copies[0]["result"] == result, copies[0]
        printed = sum(len(re.findall(r"\[(?:sms|call) to \S+ for [0-9a-f]{32}\]", (
            deployment.tmp / f"worker-{name}.log").read_text())) for name in ("first", "second"))
        print(f"\n{n} verifications with a resend each and {len(failing)} fallbacks, 2 kills: "
              f"{len(sms) - (2 * n + len(failing))} duplicate delivery commands (identical), "
              f"{printed - (2 * n + len(failing))} deliveries printed again by the console "
              f"(a sender killed between sending and recording), "
              f"{sum(len(c) - 1 for c in replies.values())} duplicate replies")

    report = await replay(deployment.app_settings())
    assert report.problems == []
    assert report.rebuilt == report.live == report.matching == n
