"""Foundation smoke test: a worker process folds records into its table, publishes, is stopped,
starts again and still has its table (recovered from the changelog), seen through its output."""

from __future__ import annotations

from support import Client


async def test_table_survives_a_restart(deployment, start_worker):
    worker = start_worker(VERIFICATION_MAX_ATTEMPTS="3")
    async with Client(deployment) as client:
        iid = await client.start()
        code = await client.sms_code(iid)
        wrong = "0000" if code != "0000" else "1111"
        await client.respond(iid, wrong)
        await client.read("verification.events",
                          lambda r: any(e["type"] == "code_rejected" for e in r), key=iid)

        worker.stop()
        start_worker("w1-again", VERIFICATION_MAX_ATTEMPTS="3")

        await client.respond(iid, wrong)
        records = await client.read(
            "verification.events",
            lambda r: len({e["seq"] for e in r if e["type"] == "code_rejected"}) == 2, key=iid)
        # A restart may publish the last batch's events again (identical): dedupe by seq.
        events = list({e["seq"]: e for e in records}.values())
        assert all(e == next(x for x in events if x["seq"] == e["seq"]) for e in records)
        # The second wrong code is the second attempt: the count came back from the changelog.
        assert [e["attempts"] for e in events if e["type"] == "code_rejected"] == [1, 2]
        [outcome] = [e for e in events if e["type"] in ("verified", "failed")] or [None]
        assert outcome is None
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
