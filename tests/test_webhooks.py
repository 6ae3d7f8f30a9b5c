"""Outcome webhooks (rule 21): signed POSTs to a real HTTP receiver on loopback, retries with
growing gaps for 5xx and refused connections, a dead endpoint beside live ones, the metrics, a
dead letter when tries run out, and retries that survive a SIGKILLed worker. Plus the pure
schedule and the client library's verify_webhook."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from phoneverify import Outcome, WebhookSignatureError, verify_webhook
from phoneverify.models import webhooks
from phoneverify.models.webhooks import MAX_GAP

from support import ROOT, Client, free_port

SECRET = "whsec-test-not-secret"


# ---------------------------------------------------------------- pure: signature and schedule

BODY = (b'{"instance_id":"a1","verified":true,"status":"verified","reason":"code_matched",'
        b'"attempts":1,"created_at":"2026-01-01T00:00:00.000Z",'
        b'"completed_at":"2026-01-01T00:00:05.000Z"}')


def test_a_signature_is_the_hmac_of_t_dot_body_and_verify_webhook_checks_it():
    now = int(time.time())
    header = webhooks.signature(SECRET.encode(), now, BODY)
    mac = hmac.new(SECRET.encode(), f"{now}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert header == f"t={now},v1={mac}"
    outcome = verify_webhook(BODY, header, SECRET)
    assert isinstance(outcome, Outcome) and outcome.instance_id == "a1" and outcome.verified
    for body, signature, secret, why in [
        (BODY.replace(b"true", b"false"), header, SECRET, "does not match"),
        (BODY, header, "another-secret", "does not match"),
        (BODY, header.replace("v1=", "v1=0"), SECRET, "does not match"),
        (BODY, "v1=abc", SECRET, "no t="),
        (BODY, "", SECRET, "no t="),
        (BODY, webhooks.signature(SECRET.encode(), now - 301, BODY), SECRET, "old"),
    ]:
        with pytest.raises(WebhookSignatureError, match=why):
            verify_webhook(body, signature, secret)
    old = webhooks.signature(SECRET.encode(), now - 3600, BODY)
    assert verify_webhook(BODY, old, SECRET, tolerance_seconds=4000).instance_id == "a1"


def test_failed_tries_wait_twice_as_long_each_time_up_to_ten_minutes_then_give_up():
    state = webhooks.pending("a1", "{}", 1000.0, ("verification.outcome", 0, 7),
                             ("http://a", "http://b"))
    assert webhooks.due(state, 1000.0) == [("http://a", 1), ("http://b", 1)]
    gaps, now = [], 1000.0
    for attempt in range(1, 14):
        state, result = webhooks.tried(state, "http://a", attempt, False, "HTTP 500", now,
                                       base=1.0, max_age=86400)
        assert result == "retry"
        gaps.append(state.targets["http://a"].due - now)
        now = state.targets["http://a"].due
    assert gaps[:6] == [1, 2, 4, 8, 16, 32] and gaps[-1] == MAX_GAP == max(gaps)
    # A copy of an earlier try's result changes nothing; a delivery ends that URL only.
    assert webhooks.tried(state, "http://a", 3, False, "x", now, 1.0, 86400) == (state, "stale")
    done, result = webhooks.tried(state, "http://b", 1, True, "", now, 1.0, 86400)
    assert result == "delivered" and list(done.targets) == ["http://a"]
    # Past the age, the URL is given up.
    late, result = webhooks.tried(done, "http://a", 14, False, "HTTP 500", 1000 + 86400,
                                  1.0, 86400)
    assert result == "given_up" and not late.targets


def test_a_webhook_url_that_is_not_http_stops_the_worker_at_start():
    for urls, words in [("ftp://example.com/x", "'ftp://example.com/x' is not an http(s) URL"),
                        ("http://ok.example, example.com/hook", "'example.com/hook' is not"),
                        ]:
        run = subprocess.run([sys.executable, "-m", "phoneverify.agents.worker"], cwd=ROOT,
                             env={"PATH": "", "WEBHOOK_URLS": urls, "WEBHOOK_SECRET": "s"},
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and f"WEBHOOK_URLS: {words}" in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "phoneverify.agents.worker"], cwd=ROOT,
                         env={"PATH": "", "WEBHOOK_URLS": "http://ok.example"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "WEBHOOK_URLS needs WEBHOOK_SECRET" in run.stderr


# ---------------------------------------------------------------- with a worker and a receiver


@dataclass
class Receiver:
    """An HTTP receiver on loopback: each path answers per ``answers`` (a status, or "hang";
    the last one repeats) and records every request it got."""

    answers: dict[str, list[int | str]]
    port: int = 0
    got: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.path
        seen = sum(1 for g in self.got if g["path"] == path)
        self.got.append({"path": path, "at": time.monotonic(), "body": body,
                         "headers": dict(request.headers)})
        plan = self.answers[path]
        answer = plan[min(seen, len(plan) - 1)]
        if answer == "hang":
            await asyncio.sleep(3600)
        return web.Response(status=int(answer), text="garbage <html>")

    def to(self, path: str) -> list[dict[str, Any]]:
        return [g for g in self.got if g["path"] == path]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def receiver() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def serve(**answers: list[int | str]) -> Receiver:
        got = Receiver({f"/{name}": plan for name, plan in answers.items()})
        application = web.Application()
        application.router.add_post("/{name}", got.handle)
        runner = web.AppRunner(application, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        got.port = runner.addresses[0][1]
        runners.append(runner)
        return got

    yield serve
    for runner in runners:
        await runner.cleanup()


async def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` (the receiver runs on this loop, so wait asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        await asyncio.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


async def concluded(kafka: Client) -> tuple[str, bytes]:
    """A verification that ends at once (terminated), and its outcome's raw bytes."""
    iid = await kafka.start()
    await kafka.sms_code(iid)
    await kafka.send("verification.terminate", {"instance_id": iid, "reason": "test"})
    await kafka.outcomes(iid)
    [raw] = await kafka.read_raw(kafka.d.topic("verification.outcome"), iid)
    assert raw is not None
    return iid, raw


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/metrics") as answer:
        text = await answer.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def assert_signed(request: dict[str, Any], iid: str, outcome: bytes) -> None:
    headers = request["headers"]
    assert request["body"] == outcome
    assert headers["Phoneverify-Event-Id"] == iid
    assert headers["Content-Type"] == "application/json"
    t, v1 = (part.split("=", 1)[1] for part in headers["Phoneverify-Signature"].split(","))
    assert abs(int(t) - time.time()) < 60
    recomputed = hmac.new(SECRET.encode(), f"{t}.".encode() + outcome,
                          hashlib.sha256).hexdigest()
    assert hmac.compare_digest(v1, recomputed)
    assert verify_webhook(request["body"], headers["Phoneverify-Signature"],
                          SECRET).instance_id == iid


async def test_live_endpoints_get_signed_outcomes_while_a_dead_one_is_retried_then_given_up(
        deployment, start_worker, receiver):
    hook = await receiver(ok=[200], flaky=[503, 500, 204], garbage=["hang", 200])
    dead = f"http://127.0.0.1:{free_port()}/nobody"  # refused connections
    urls = [hook.url("/ok"), hook.url("/flaky"), hook.url("/garbage"), dead]
    worker = start_worker(WEBHOOK_URLS=",".join(urls), WEBHOOK_SECRET=SECRET,
                          WEBHOOK_TIMEOUT_SECONDS="1", WEBHOOK_MAX_AGE_SECONDS="12")
    async with Client(deployment) as kafka:
        iid, outcome = await concluded(kafka)
        first = await until(lambda: hook.to("/ok"), 30, "the live endpoint's POST")
        assert_signed(first[0], iid, outcome)
        # The flaky one: 503, 500, then 204 (delivered), after gaps of 1 s then 2 s.
        flaky = await until(lambda: len(hook.to("/flaky")) >= 3 and hook.to("/flaky"), 30,
                            "three tries of the flaky endpoint")
        gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(flaky)]
        assert 0.8 < gaps[0] < 2.0 and 1.5 < gaps[1] / gaps[0] < 3.0, gaps
        for request in flaky:
            assert_signed(request, iid, outcome)
        # The hanging one timed out once, then got it; the live one was not held up by it
        # nor by the dead one: it was served before the dead one's second try.
        await until(lambda: len(hook.to("/garbage")) >= 2, 30, "the hanging endpoint again")
        # The dead one is given up after WEBHOOK_MAX_AGE_SECONDS: a dead letter says why.
        letters = await kafka.read(
            "verification.dead-letter",
            lambda r: any("nobody" in x.get("error", "") for x in r), 60, key=iid)
        [letter] = [x for x in letters if "nobody" in x["error"]]
        assert letter["topic"] == deployment.topic("verification.outcome")
        assert letter["value"].encode() == outcome and "cannot connect" in letter["error"]
        assert "not delivered within 12 s" in letter["error"]
    # The dead letter goes out just before the table drops the URL: wait for the gauge.
    metrics = {}
    for _ in range(100):
        metrics = await scrape(worker.web_port)
        if metrics[("phoneverify_webhook_pending", ())] == 0:
            break
        await asyncio.sleep(0.1)

    def count(result: str) -> float:
        return metrics.get(("phoneverify_webhooks_total", (("result", result),)), 0)

    assert count("delivered") == 3
    assert count("given_up") == 1
    assert count("failed") >= 2 + 1 + 4  # flaky twice, the hang once, the dead one 4+ times
    assert metrics[("phoneverify_webhook_pending", ())] == 0
    assert len(hook.to("/ok")) == 1  # delivered once


async def test_retries_pending_when_a_worker_is_sigkilled_are_delivered_after_restart(
        deployment, start_worker, receiver):
    hook = await receiver(down=[503])
    settings = {"WEBHOOK_URLS": hook.url("/down"), "WEBHOOK_SECRET": SECRET}
    worker = start_worker("w1", **settings)
    async with Client(deployment) as kafka:
        iid, outcome = await concluded(kafka)
        await until(lambda: len(hook.to("/down")) >= 2, 30, "two failed tries")
        metrics = await scrape(worker.web_port)
        assert metrics[("phoneverify_webhook_pending", ())] == 1
        worker.kill()
        await asyncio.sleep(1)  # a request w1 sent before it died is answered (503) first
        hook.answers["/down"] = [200]  # the endpoint recovers meanwhile
        tries_before = len(hook.to("/down"))
        # Started in a thread: the receiver runs on this loop and must answer meanwhile.
        await asyncio.to_thread(start_worker, "w2", **settings)
        delivered = await until(lambda: hook.to("/down")[tries_before:], 60,
                                "the try after the restart")
        for request in delivered:
            assert_signed(request, iid, outcome)
        # Delivered: the tries stop. (At least once: a worker restarted mid-delivery may
        # deliver again; receivers dedupe by Phoneverify-Event-Id.)
        await asyncio.sleep(3)
        settled = len(hook.to("/down"))
        await asyncio.sleep(3)
        assert len(hook.to("/down")) == settled
