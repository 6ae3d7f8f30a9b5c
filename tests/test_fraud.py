"""The fraud guard (rule 20) against a real broker and workers: a pumping run is blocked while
answered traffic goes on; blocks refuse, are published, counted, and end by themselves;
operators list, block and unblock; safe prefixes; FRAUD_GUARD=off.

Small settings keep it short: a prefix is judged after 10 deliveries, a delivery unanswered
for 2 s is unconverted.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import aiohttp

from support import Client, Worker, quiesce

KEY = {"X-API-Key": "test-api-key"}
MIN_SENDS, ANSWER, RATE = 10, 2.0, 5.0
GUARD = {"FRAUD_PREFIX_MIN_SENDS": str(MIN_SENDS), "FRAUD_ANSWER_SECONDS": str(ANSWER),
         "FRAUD_COUNTRY_MIN_SENDS": "1000", "FRAUD_WINDOW_SECONDS": "600",
         "RATE_LIMIT_STARTS": "1000"}
PUMPED = "+44740012"  # a block of 10,000 UK mobile numbers


def number(prefix: str, n: int) -> str:
    return f"{prefix}{n:04d}"


async def start(client: Client, phone: str) -> dict[str, Any]:
    return await client.ask("verification.start",
                            {"instance_id": uuid.uuid4().hex, "phone_number": phone})


async def pump(client: Client, prefix: str, limit: int, stop_at_refusal: bool = True
               ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Start verifications for sequential numbers of ``prefix`` at RATE a second, never
    answered, until one is refused; returns the started replies and the refusal."""
    started: list[dict[str, Any]] = []
    for n in range(limit):
        began = time.monotonic()
        reply = await start(client, number(prefix, n))
        if reply["result"] != "started":
            return started, reply
        started.append(reply)
        await asyncio.sleep(max(0.0, 1 / RATE - (time.monotonic() - began)))
    return started, None


async def answered(client: Client, prefixes: list[str], rounds: int) -> list[dict[str, Any]]:
    """Legitimate traffic: verifications in many prefixes, each answered with its code."""
    outcomes = []
    for n in range(rounds):
        phone = number(prefixes[n % len(prefixes)], n)
        reply = await start(client, phone)
        assert reply["result"] == "started", reply  # never refused
        code = await client.sms_code(reply["instance_id"])
        answer = await client.ask("verification.response",
                                  {"instance_id": reply["instance_id"], "code": code})
        outcomes.append(answer)
    return outcomes


def sample(metrics: str, name: str, **labels: str) -> float:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(f"^{re.escape(name)}{{{re.escape(inner)}}} (\\S+)$", metrics, re.M)
    return float(match.group(1)) if match else 0.0


async def metrics(worker: Worker) -> str:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{worker.web_port}/metrics") as response:
        return await response.text()


async def test_a_pumping_run_is_blocked_while_answered_traffic_goes_on(deployment,
                                                                      start_worker):
    worker = start_worker(FRAUD_BLOCK_SECONDS="8", **GUARD)
    legit = [f"+4474001{d}" for d in range(3, 9)]  # other prefixes of the same country
    async with Client(deployment) as client:
        (started, refusal), outcomes = await asyncio.gather(
            pump(client, PUMPED, 200), answered(client, legit, 12))
        assert [o["result"] for o in outcomes] == ["verified"] * 12
        assert refusal is not None
        # Blocked once MIN_SENDS deliveries were judged: those, the ones still within their
        # answer window, and those on their way while the block reached every worker.
        assert MIN_SENDS <= len(started) <= MIN_SENDS + RATE * ANSWER + RATE, len(started)
        assert refusal["result"] == "blocked_number"
        assert re.fullmatch(r"suspected SMS pumping to \+44740012…, blocked until "
                            r"\d\d:\d\d UTC", refusal["detail"]), refusal
        [outcome] = await client.outcomes(refusal["instance_id"])
        assert outcome["reason"] == "blocked_number"
        sms = await client.read_all("verification.sms")
        assert sum(s["to"].startswith(PUMPED) for s in sms) == len(started)  # nothing sent
        block = (await client.read("verification.fraud", lambda r: len(r) >= 1))[0]
        assert block["level"] == "prefix" and block["key"] == PUMPED and block["blocked"]
        assert block["by"] == "guard" and block["judged"] >= MIN_SENDS
        assert block["converted"] == 0
        scraped = await metrics(worker)
        assert sample(scraped, "phoneverify_fraud_blocks_total", level="prefix") == 1
        assert sample(scraped, "phoneverify_fraud_blocked", level="prefix") == 1
        # The block ends by itself (FRAUD_BLOCK_SECONDS=6): an unblock record, starts again.
        records = await client.read("verification.fraud", lambda r: len(r) >= 2, timeout=20)
        assert records[1]["blocked"] is False and records[1]["by"] == "guard"
        for _ in range(50):
            reply = await start(client, number(PUMPED, 9999))
            if reply["result"] == "started":
                break
            await asyncio.sleep(0.1)
        assert reply["result"] == "started", reply
        assert sample(await metrics(worker), "phoneverify_fraud_blocked", level="prefix") == 0


async def test_a_run_spread_over_a_countrys_prefixes_blocks_the_country(deployment,
                                                                       start_worker):
    start_worker(**{**GUARD, "FRAUD_PREFIX_MIN_SENDS": "1000",
                    "FRAUD_COUNTRY_MIN_SENDS": str(MIN_SENDS)})
    async with Client(deployment) as client:
        started, refusal = [], None
        for n in range(200):  # one number in each of many prefixes
            began = time.monotonic()
            reply = await start(client, f"+447400{n % 100:02d}{n // 100:04d}")
            if reply["result"] != "started":
                refusal = reply
                break
            started.append(reply)
            await asyncio.sleep(max(0.0, 1 / RATE - (time.monotonic() - began)))
        assert refusal is not None
        assert MIN_SENDS <= len(started) <= MIN_SENDS + RATE * ANSWER + 2 * RATE, len(started)
        assert refusal["detail"].startswith("suspected SMS pumping to numbers in GB, blocked "
                                            "until"), refusal
        # Another country is served.
        assert (await start(client, "+33612345678"))["result"] == "started"
        [block] = await client.read("verification.fraud", lambda r: len(r) >= 1)
        assert (block["level"], block["key"]) == ("country", "GB")


async def test_safe_prefixes_are_never_blocked_and_the_guard_can_be_off(deployment,
                                                                      start_worker):
    worker = start_worker(FRAUD_SAFE_PREFIXES="+4474001", **GUARD)
    async with Client(deployment) as client:
        started, refusal = await pump(client, PUMPED, MIN_SENDS + 12)
        assert refusal is None and len(started) == MIN_SENDS + 12
        await asyncio.sleep(ANSWER + 1)  # every delivery judged by now, were it watched
        assert (await start(client, number(PUMPED, 9000)))["result"] == "started"
        assert await client.read_all("verification.fraud") == []
    worker.stop()
    deployment.prefix = f"t{uuid.uuid4().hex[:10]}."  # a fresh deployment for the second part
    start_worker("off", FRAUD_GUARD="off", **GUARD)
    async with Client(deployment) as client:
        started, refusal = await pump(client, PUMPED, MIN_SENDS + 12)
        assert refusal is None
        await asyncio.sleep(ANSWER + 1)
        assert (await start(client, number(PUMPED, 9000)))["result"] == "started"
        await quiesce(deployment)
        assert await client.read_all("verification.fraud") == []
        followed = [r for r in await client.read_all("verification.guard") if "type" in r]
        assert followed == []  # no delivery followed (only ticks there)
