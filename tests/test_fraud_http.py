"""The fraud guard's operator commands (HTTP and CLI) and the limit per client address, against
a real broker and workers (rule 20)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from typing import Any

import aiohttp

from support import ROOT, Client, Worker

KEY = {"X-API-Key": "test-api-key"}


def base(worker: Worker) -> str:
    return f"http://127.0.0.1:{worker.web_port}"


async def call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
               local: str | None = None) -> tuple[int, Any, Any]:
    connector = aiohttp.TCPConnector(local_addr=(local, 0) if local else None)
    async with aiohttp.ClientSession(headers=KEY, connector=connector) as session, \
            session.request(method, url, data=None if body is None else json.dumps(body),
                            headers=headers) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None, response.headers


def cli(worker: Worker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phoneverify.interfaces.cli", "fraud", *args],
                          cwd=ROOT, env=worker.env, capture_output=True, text=True, timeout=60)


async def test_operators_block_list_and_unblock_over_http_and_the_cli(deployment, start_worker):
    worker = start_worker()
    url = f"{base(worker)}/fraud/blocks"
    assert (await call("GET", url))[:2] == (200, [])
    async with aiohttp.ClientSession() as anonymous, anonymous.get(url) as response:
        assert response.status == 401
    for bad in ({"key": "44740012", "seconds": 60}, {"key": "XX", "seconds": 60},
                {"key": "+44740012", "seconds": 0}, {"key": "+44740012", "seconds": "1h"},
                {"key": "+44740012"}, "+44740012"):
        status, answer, _ = await call("POST", url, bad)
        assert status == 400 and answer["error"], (bad, answer)
    assert (await call("DELETE", f"{url}/not-a-key"))[0] == 400
    assert (await call("DELETE", f"{url}/%2B44740012"))[0] == 404  # none in force
    async with Client(deployment) as client:
        assert await client.read_all("verification.fraud") == []  # nothing blocked by those

        status, block, _ = await call("POST", url, {"key": "+44740012", "seconds": 600})
        assert status == 201
        assert (block["level"], block["key"], block["by"]) == ("prefix", "+44740012", "operator")
        assert (await call("GET", url))[1] == [block]
        status, refused, _ = await call("POST", f"{base(worker)}/verifications",
                                        "+447400120001")
        assert status == 400 and refused["result"] == "blocked_number"
        assert "suspected SMS pumping to +44740012…, blocked by an operator until" in \
            refused["error"]
        status, _, _ = await call("DELETE", f"{url}/%2B44740012")
        assert status == 204
        assert (await call("GET", url))[1] == []
        assert (await call("DELETE", f"{url}/%2B44740012"))[0] == 404
        status, _, _ = await call("POST", f"{base(worker)}/verifications", "+447400120002")
        assert status == 202

        # The same from the command line, over Kafka.
        done = cli(worker, "block", "gb", "--for", "2h")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("Blocked country GB until ")
        listed = cli(worker, "list", "--json")
        assert [(b["level"], b["key"], b["by"]) for b in json.loads(listed.stdout)] == [
            ("country", "GB", "operator")]
        for _ in range(100):  # the worker reads the block from Kafka
            if await _refused(worker, "+447400990001"):
                break
            await asyncio.sleep(0.1)
        assert await _refused(worker, "+447400990001")
        bad = cli(worker, "block", "+4474", "--for", "forever")
        assert bad.returncode == 2 and "not a duration" in bad.stderr
        done = cli(worker, "unblock", "GB")
        assert done.returncode == 0 and done.stdout.strip() == "Unblocked country GB."
        again = cli(worker, "unblock", "GB")
        assert again.returncode == 4 and "no fraud block is in force for GB" in again.stderr
        assert cli(worker, "list").stdout.strip() == "No blocks in force."
        records = await client.read("verification.fraud", lambda r: len(r) >= 4)
        assert [(r["key"], r["blocked"], r["by"]) for r in records] == [
            ("+44740012", True, "operator"), ("+44740012", False, "operator"),
            ("GB", True, "operator"), ("GB", False, "operator")]


async def _refused(worker: Worker, phone: str) -> bool:
    status, answer, _ = await call("POST", f"{base(worker)}/verifications", phone)
    return status == 400 and answer["result"] == "blocked_number"


def start_body(n: int) -> str:
    return f"+4474003{n:05d}"  # a new number each time: the per-number limit stays away


async def test_the_limit_per_client_address_holds_across_workers_and_trusts_only_proxies(
        deployment, start_worker):
    deployment.settings.update(HTTP_STARTS_PER_IP="3", TRUSTED_PROXIES="127.0.0.1")
    workers = [start_worker("w1"), start_worker("w2")]
    numbers = iter(range(10_000))

    async def start(worker: Worker, forwarded: str | None = None,
                    local: str | None = None) -> tuple[int, Any, Any]:
        headers = {"X-Forwarded-For": forwarded} if forwarded else None
        return await call("POST", f"{base(worker)}/verifications", start_body(next(numbers)),
                          headers, local)

    # Behind the trusted proxy (127.0.0.1): the address is the last X-Forwarded-For entry.
    for n in range(3):
        status, _, _ = await start(workers[n % 2], "10.1.1.1, 198.51.100.7")
        assert status == 202
    status, answer, headers = await start(workers[1], "198.51.100.7")
    assert status == 429 and answer["result"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 3600
    assert "too many verifications started from 198.51.100.7" in answer["error"]
    assert (await start(workers[0], "198.51.100.8"))[0] == 202  # another client
    # From an address that is not a trusted proxy, X-Forwarded-For is ignored.
    for n in range(3):
        status, _, _ = await start(workers[n % 2], f"203.0.113.{n}", local="127.0.0.2")
        assert status == 202
    status, answer, _ = await start(workers[0], "203.0.113.99", local="127.0.0.2")
    assert status == 429 and "from 127.0.0.2" in answer["error"]

    # A Kafka start may name its client's address: the same limit; a malformed one is a
    # dead letter.
    async with Client(deployment) as client:
        replies = []
        for _ in range(4):
            replies.append(await client.ask("verification.start", {
                "instance_id": uuid.uuid4().hex, "phone_number": start_body(next(numbers)),
                "client_ip": "192.0.2.1"}))
        assert [r["result"] for r in replies] == ["started"] * 3 + ["rate_limited"]
        assert replies[3]["retry_after"] > 0
        iid = uuid.uuid4().hex
        await client.send("verification.start", {"instance_id": iid, "phone_number":
                                                 start_body(next(numbers)),
                                                 "client_ip": "192.0.2.300"})
        letters = await client.read("verification.dead-letter",
                                    lambda r: any(x.get("key") == iid for x in r))
        [dead] = [x for x in letters if x.get("key") == iid]
        assert "client_ip" in dead["error"], dead


async def test_a_block_refuses_resends_too(deployment, start_worker):
    """A verification started before its prefix was blocked gets no resend while the block
    holds: ``blocked_number`` with the block in words, and nothing more is sent."""
    worker = start_worker(RESEND_INTERVAL_SECONDS="0")
    status, started, _ = await call("POST", f"{base(worker)}/verifications",
                                    {"phone_number": "+447400120003"})
    assert status == 202, started
    iid = started["id"]
    status, _, _ = await call("POST", f"{base(worker)}/fraud/blocks",
                              {"key": "+44740012", "seconds": 600})
    assert status == 201
    for _ in range(100):  # the worker reads the block from Kafka
        if await _refused(worker, "+447400120004"):
            break
        await asyncio.sleep(0.1)
    status, answer, _ = await call("POST", f"{base(worker)}/verifications/{iid}/resend")
    assert status == 400 and answer["result"] == "blocked_number", answer
    assert "suspected SMS pumping to +44740012…" in answer["error"]
    async with Client(deployment) as client:
        sent = [r for r in await client.read_all("verification.sms") if r["instance_id"] == iid]
        assert len(sent) == 1  # the start's SMS only


async def test_resends_count_against_the_client_address_across_workers_and_restarts(
        deployment, start_worker):
    """Rule 20: starts and resends share the limit per client address, whichever worker
    takes them (a resend is forwarded to its verification's owner, the address with it), over
    both resend routes and Kafka, and the count outlives the workers."""
    deployment.settings.update(HTTP_STARTS_PER_IP="3", TRUSTED_PROXIES="127.0.0.1",
                               RESEND_INTERVAL_SECONDS="0")
    workers = [start_worker("w1"), start_worker("w2")]
    client_a, client_b = {"X-Forwarded-For": "198.51.100.7"}, {"X-Forwarded-For": "198.51.100.8"}

    def resend_url(worker: Worker, iid: str, seed: bool = False) -> str:
        if seed:
            return (f"{base(worker)}/admin/extensions/DurableTaskExtension/instances/{iid}"
                    "/raiseEvent/ResendCode")
        return f"{base(worker)}/verifications/{iid}/resend"

    status, started, _ = await call("POST", f"{base(workers[0])}/verifications",
                                    start_body(1), client_a)
    assert status == 202, started
    iid = started["id"]
    # The start and two resends, one on each route, one on each worker (one forwards).
    assert (await call("POST", resend_url(workers[1], iid), None, client_a))[0] == 202
    assert (await call("POST", resend_url(workers[0], iid, seed=True), None, client_a))[0] == 202
    for worker, seed in ((workers[1], False), (workers[0], True)):
        status, answer, headers = await call("POST", resend_url(worker, iid, seed), None,
                                             client_a)
        assert status == 429 and answer["result"] == "rate_limited", answer
        assert 3000 <= int(headers["Retry-After"]) <= 3600
        assert "too many codes requested from 198.51.100.7: at most 3 starts and resends" \
            in answer["error"]
    assert (await call("POST", resend_url(workers[1], iid), None, client_b))[0] == 202

    for worker in workers:  # the count is in Kafka: a new worker keeps it
        worker.stop()
    worker = start_worker("w3")
    forged = {**client_a, "X-Phoneverify-Client": "203.0.113.9 " + "0" * 64}  # unsigned
    status, answer, headers = await call("POST", resend_url(worker, iid), None, forged)
    assert status == 429 and "from 198.51.100.7" in answer["error"], answer
    assert int(headers["Retry-After"]) >= 3000
    status, answer, _ = await call("POST", f"{base(worker)}/verifications", start_body(2),
                                   client_a)
    assert status == 429 and "too many verifications started from 198.51.100.7" in \
        answer["error"]

    async with Client(deployment) as client:
        # A Kafka resend may name its client's address too; a malformed one is a dead letter.
        reply = await client.ask("verification.resend", {"instance_id": iid,
                                                         "client_ip": "198.51.100.7"})
        assert reply["result"] == "rate_limited" and reply["retry_after"] > 3000, reply
        await client.send("verification.resend", {"instance_id": iid,
                                                  "client_ip": "198.51.100.300"})
        letters = await client.read("verification.dead-letter",
                                    lambda r: any("client_ip" in x["error"] for x in r))
        assert any(x.get("key") == iid for x in letters)
        sent = {r["command_id"] for r in await client.read_all("verification.sms")
                if r["instance_id"] == iid}  # a command published again after a stop is one
        assert sent == {f"{iid}/sms/{n}" for n in (1, 2, 3, 4)}  # start, 2 resends A, 1 B
