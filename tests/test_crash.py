"""Delivery guarantees under SIGKILL, and replay: the state is rebuilt from the events alone.

The worker is killed (no shutdown, no flush, no commit) while starts are in flight and again
while answers are in flight. Afterwards every verification has its outcome, duplicates (there
may be, the guarantee is at-least-once) are identical, no verification got two SMS with
different codes, no redelivered wrong answer was counted twice, and replaying
``verification.events`` gives exactly the live table.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

from phoneverify.ops.replay import run as replay

from support import Client, Deployment

N = 600
# A long window (restarts must not expire anything) and a short session timeout (so the group
# drops the killed member quickly instead of waiting Faust's default 60 s).
ENV = {"VERIFICATION_TIMEOUT_SECONDS": "900", "BROKER_SESSION_TIMEOUT": "10",
       "BROKER_HEARTBEAT_INTERVAL": "1"}


def by_instance(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        grouped[record["instance_id"]].append(record)
    return grouped


async def test_sigkill_in_flight_loses_nothing_and_never_sends_two_codes(
        deployment: Deployment, start_worker) -> None:
    worker = start_worker("first", **ENV)
    async with Client(deployment) as client:
        ids = [uuid.uuid4().hex for _ in range(N)]
        for i, iid in enumerate(ids):
            await client.send("verification.start",
                              {"instance_id": iid, "phone_number": f"+1425555{i:04d}"})
        await client.read("verification.sms", lambda r: len(r) >= N // 4)
        worker.kill()
        worker = start_worker("second", **ENV)

        sms = by_instance(await client.read(
            "verification.sms", lambda r: len(by_instance(r)) == N, timeout=120))
        assert all(len({s["body"] for s in copies}) == 1 for copies in sms.values())
        codes = {iid: copies[0]["body"].rsplit(" ", 1)[1] for iid, copies in sms.items()}

        for iid in ids:  # one wrong answer, then the right one: two attempts each
            wrong = str((int(codes[iid]) + 1) % 10_000).zfill(4)
            await client.respond(iid, wrong)
            await client.respond(iid, codes[iid])
        await client.read("verification.outcome", lambda r: len(r) >= N // 4, timeout=120)
        worker.kill()
        start_worker("third", **ENV)

        outcomes = by_instance(await client.read(
            "verification.outcome", lambda r: len(by_instance(r)) == N, timeout=120))
        assert set(outcomes) == set(ids)
        for copies in outcomes.values():
            assert all(copy == copies[0] for copy in copies)  # duplicates are identical
            assert copies[0]["verified"] is True, copies[0]
            assert copies[0]["attempts"] == 2  # a redelivered wrong answer is not counted twice
        duplicates = sum(len(c) - 1 for c in outcomes.values())
        print(f"\n{N} verifications, 2 kills: {duplicates} duplicate outcomes, "
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
        # An event nobody decided: replay must notice that the table disagrees.
        await client.send("verification.events", {
            "seq": 99, "type": "terminated", "instance_id": iid, "reason": "forged",
            "attempts": 0, "at": "2030-01-01T00:00:00Z"})
        report = await replay(deployment.app_settings())
        assert not report.ok
        assert any(iid in problem for problem in report.problems)
