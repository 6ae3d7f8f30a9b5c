"""What an operator sees: health, readiness, Prometheus metrics that move with real
verifications, and JSON log lines (never a code)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from phoneverify.models.verification import initial_state
from phoneverify.topics import ensure_topics

from support import Client, Deployment, Worker

KEY = {"X-API-Key": "test-api-key"}


async def fetch(worker: Worker, path: str,
                headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{worker.web_port}{path}", headers=headers) as response:
        return response.status, await response.text()


def sample(metrics: str, name: str, **labels: str) -> float:
    """One sample's value from the Prometheus text (0 when it is not there yet)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(f"^{pattern}$", metrics, re.M)
    return float(match.group(1)) if match else 0.0


async def test_health_and_readiness_before_and_after_recovery(
        deployment: Deployment, start_worker) -> None:
    # A changelog to recover: the worker is not ready until it has read it. Each value is one
    # the actor can read (a state without a status stopped the worker once it was ready).
    await ensure_topics(deployment.app_settings())
    changelog = f"{deployment.env()['APP_ID']}-verifications-changelog"
    producer = AIOKafkaProducer(bootstrap_servers=deployment.bootstrap, linger_ms=20)
    await producer.start()
    try:
        state = json.loads(initial_state("x").model_dump_json())
        value = json.dumps({"life": "x", "state": state}).encode()
        sends = [await producer.send(changelog, value, key=f"k{i}".encode())
                 for i in range(60_000)]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()
    worker = Worker(deployment, "ready").launch()
    try:
        seen: list[int] = []
        asked: list[tuple[int, str]] = []  # a kept verification's status meanwhile
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while loop.time() < deadline and 200 not in seen:
            try:
                asked.append(await fetch(worker, "/verifications/k1", KEY))
                status, body = await fetch(worker, "/readyz")
                seen.append(status)
                if status == 503:
                    assert json.loads(body)["status"] == "not ready"
                    assert (await fetch(worker, "/healthz"))[0] == 200  # alive meanwhile
            except aiohttp.ClientError:
                pass  # not listening yet
            await asyncio.sleep(0.05)
        assert 503 in seen and seen[-1] == 200, seen[-10:]
        assert seen.index(200) > seen.index(503)
        # While its store lacks part of the changelog the worker says so (503), never "no such
        # verification" (404) for one it has not restored yet.
        restoring = [n for n, (code, text) in enumerate(asked)
                     if code == 503 and "restoring its tables" in text]
        assert restoring, asked[-5:]
        assert all(code != 404 for code, _ in asked[:restoring[-1]]), asked
        assert json.loads((await fetch(worker, "/readyz"))[1]) == {"status": "ready"}
    finally:
        worker.stop()


async def test_metrics_move_with_real_verifications(
        deployment: Deployment, start_worker) -> None:
    worker = start_worker()
    status, before = await fetch(worker, "/metrics")  # no key needed
    assert status == 200
    async with Client(deployment) as client:
        iid = uuid.uuid4().hex
        reply = await client.ask("verification.start", {"instance_id": iid,
                                                        "phone_number": "+1 425 555 0171"})
        assert reply["result"] == "started"
        code = await client.sms_code(iid)
        _, pending = await fetch(worker, "/metrics")
        assert sample(pending, "phoneverify_pending_verifications") == 1
        await client.ask("verification.response", {"instance_id": iid, "code": "0000"
                         if code != "0000" else "1111"})
        await client.ask("verification.response", {"instance_id": iid, "code": code})
        await client.outcomes(iid)
    _, after = await fetch(worker, "/metrics")
    assert sample(after, "phoneverify_outcomes_total", reason="code_matched") == 1
    assert sample(after, "phoneverify_replies_total", result="started") == 1
    assert sample(after, "phoneverify_replies_total", result="wrong_code") == 1
    assert sample(after, "phoneverify_replies_total", result="verified") == 1
    assert sample(after, "phoneverify_sms_total", result="sent") == 1
    assert sample(after, "phoneverify_pending_verifications") == 0
    assert sample(after, "phoneverify_response_to_outcome_seconds_count") == 1
    assert sample(after, "phoneverify_reply_seconds_count", command="response") == 2
    assert sample(after, "phoneverify_sms_send_seconds_count") == 1
    assert re.search(r'^phoneverify_consumer_lag\{partition="\d+",topic="[^"]+'
                     r'verification.response"\} 0.0$', after, re.M)
    assert sample(after, "phoneverify_rocksdb_memory_bytes", kind="memtables") > 0
    assert sample(after, "phoneverify_rocksdb_memory_bytes", kind="block_cache") >= 0
    assert sample(before, "phoneverify_outcomes_total", reason="code_matched") == 0
    assert code not in after.replace(iid, "")


async def test_json_logs_one_object_per_line_and_never_a_code(
        deployment: Deployment, start_worker) -> None:
    worker = start_worker(LOG_FORMAT="json")
    async with Client(deployment) as client:
        iid = uuid.uuid4().hex
        await client.start("+1 425 555 0172", instance_id=iid)
        code = await client.sms_code(iid)
        await client.respond(iid, code)
        await client.outcomes(iid)
    worker.stop()
    lines = [json.loads(line) for line in worker.log().splitlines() if line.strip()]
    [outcome] = [line for line in lines if line.get("instance_id") == iid]
    assert {k: outcome[k] for k in ("status", "reason", "attempts")} == {
        "status": "verified", "reason": "code_matched", "attempts": 1}
    assert outcome["duration_s"] >= 0 and outcome["level"] == "info"
    # The console backend stands in for the phone: only its line shows the code.
    holding = [line for line in lines if code in line["message"].replace(iid, "")]
    assert all("[sms to " in line["message"] for line in holding)


async def test_a_worker_with_another_code_key_refuses_to_start(
        deployment: Deployment, start_worker) -> None:
    """Two keys would draw two codes for one verification: the second worker says so, and
    does not start."""
    start_worker()
    with pytest.raises(RuntimeError, match="CODE_HASH_KEY differs from the one this "
                                           "deployment's workers use"):
        start_worker("other", CODE_HASH_KEY="not-the-deployment-key")
