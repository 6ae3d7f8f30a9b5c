"""A newcomer reads ERROR (or WARNING) as an outage: a worker's log through a second worker
joining and leaving, HTTP writes, and a graceful stop has no ERROR or WARNING line (aiokafka's
"Heartbeat failed ... because it is rebalancing" is INFO with a note), and no line ends with a
space."""

from __future__ import annotations

import asyncio
import re

import aiohttp

from support import Client, Deployment

#: mode's warning that a timer's run took longer than its interval: the test ticks every 0.2 s
#: and a shared machine can make a tick's run take longer; at the default 1 s it means expiries
#: run late, which is worth a warning.
OVERLAP = "ticks are late: sending one took"
#: Faust's stall detector (every 2.5 s here) reports a partition as stalled after this long.
STALL_SECONDS = "3"


async def verify(client: Client, phones: range) -> None:
    ids = [await client.start(f"+1 425 555 {n:04d}") for n in phones]
    for iid in ids:
        await client.respond(iid, await client.sms_code(iid, timeout=60))
    for iid in ids:
        [outcome] = await client.outcomes(iid, timeout=60)
        assert outcome["status"] == "verified", outcome


async def test_no_false_alarms_through_a_second_worker_joining_and_leaving(
        deployment: Deployment, start_worker) -> None:
    a = start_worker("a", STREAM_PROCESSING_TIMEOUT=STALL_SECONDS)
    async with aiohttp.ClientSession(headers={"X-API-Key": "test-api-key"}) as http, \
            http.post(f"http://127.0.0.1:{a.web_port}/verifications",
                      json="+1 425 555 0100") as answer:
        assert answer.status == 202  # the HTTP side's own producer is in use now
    async with Client(deployment) as client:
        await verify(client, range(1000, 1004))
        b = start_worker("b", STREAM_PROCESSING_TIMEOUT=STALL_SECONDS)
        await verify(client, range(1010, 1014))
        b.stop()
        await verify(client, range(1020, 1024))  # a holds every partition again
        # Idle partitions (admission, ...) just taken over from b: the detector, which runs
        # every 2.5 s, must not call them stalled. Give it three turns past the limit.
        await asyncio.sleep(float(STALL_SECONDS) + 3 * 2.5)
        await verify(client, range(1030, 1032))
    a.stop()
    for worker in (a, b):
        log = worker.log()
        assert "Stopping..." in log and "Closing event loop" in log  # a graceful stop
        errors = [line for line in log.splitlines()
                  if "[ERROR]" in line or "Unclosed" in line
                  or ("[WARNING]" in line and OVERLAP not in line)]
        assert errors == [], f"worker {worker.name}: {errors[:5]}"
        lines = [line for line in log.splitlines() if line.startswith("[20")]
        assert lines and [line for line in lines if line != line.rstrip()] == []
    sms = [line for line in a.log().splitlines() if "Your verification code is" in line]
    assert sms and all(re.search(r" is \d{4}\b", line) for line in sms)
