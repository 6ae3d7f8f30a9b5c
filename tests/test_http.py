"""The HTTP API against worker processes on the real broker: auth, bad input, the seed's flow
(start, status, raiseEvent, terminate), and a status request routed to the owning worker."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from phoneverify.models.codes import draw_code, hash_code
from phoneverify.models.phone import mask

from support import TEST_CODE_KEY, Client, Deployment, Worker

KEY = {"X-API-Key": "test-api-key"}
PHONE = "+1 425-555-0100"
MASKED = mask("+14255550100")  # "+142******00"


@pytest.fixture(scope="module")
def served(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One deployment and worker with the default settings, for the tests that need nothing
    else (each uses its own instance ids; the start limit per number is out of their way)."""
    worker = Worker(Deployment(kafka, Path(tmp_path_factory.mktemp("http"))), "served",
                    RATE_LIMIT_STARTS="1000")
    try:
        yield worker.start()
    finally:
        worker.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=KEY) as session:
        yield session


def base(worker: Worker) -> str:
    return f"http://127.0.0.1:{worker.web_port}"


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json(content_type=None)


async def post(session: aiohttp.ClientSession, url: str, body: Any = None,
               raw: bytes | None = None, **kwargs: Any) -> tuple[int, Any, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    async with session.post(url, data=data, **kwargs) as response:
        return response.status, await response.json(content_type=None), response.headers


async def poll(session: aiohttp.ClientSession, url: str, until: Callable[[int, Any], bool],
               timeout: float = 30.0) -> Any:
    """GET ``url`` until ``until(status, body)`` holds; returns the body."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen: tuple[int, Any] = (0, None)
    while loop.time() < deadline:
        seen = await get(session, url)
        if until(*seen):
            return seen[1]
        await asyncio.sleep(0.05)
    raise TimeoutError(f"GET {url}: condition not met in {timeout}s; last answer {seen}")


def running(status: int, body: Any) -> bool:
    return status == 202 and body["runtimeStatus"] == "Running"


def assert_no_secrets(body: Any, instance_id: str, code: str) -> None:
    text = json.dumps(body)
    assert "code_hash" not in text and '"code"' not in text
    assert hash_code(TEST_CODE_KEY.encode(), instance_id, code) not in text
    assert "4255550100" not in text  # only the masked number


async def test_every_request_needs_the_api_key(served):
    worker = served
    url = f"{base(worker)}/verifications"
    async with aiohttp.ClientSession() as anonymous:
        for headers in ({}, {"X-API-Key": "wrong"}):
            status, body, _ = await post(anonymous, url, PHONE, headers=headers)
            assert (status, body) == (401, {"error": "missing or wrong API key (send it in "
                                                     "the X-API-Key header)"})
            async with anonymous.get(f"{url}/abc", headers=headers) as response:
                assert response.status == 401
            status, _, _ = await post(anonymous, f"{url}/abc/terminate", raw=b"", headers=headers)
            assert status == 401


async def test_several_keys_for_rotation_and_a_body_limit(start_worker):
    worker = start_worker(API_KEYS="next-key, other-key", HTTP_MAX_BODY_BYTES="200")
    url = f"{base(worker)}/verifications/nobody"
    async with aiohttp.ClientSession() as session:
        for key in ("test-api-key", "next-key", "other-key"):
            async with session.get(url, headers={"X-API-Key": key}) as response:
                assert response.status == 404
        async with session.get(url, headers={"X-API-Key": "next"}) as response:
            assert response.status == 401
        status, body, _ = await post(session, f"{base(worker)}/verifications",
                                     raw=b'"' + b"1" * 300 + b'"', headers=KEY)
        assert (status, body) == (413, {"error": "request body over 200 bytes"})


async def test_bad_input_is_400_saying_what_is_wrong(served, http):
    worker = served
    url = f"{base(worker)}/verifications"
    async with Client(worker.deployment) as kafka:  # a verification to send bad codes to
        iid = await kafka.start()
        await kafka.sms_code(iid)
    cases = [
        (url, None, b"{not json", "not valid JSON"),
        (url, None, b"\xff\xfe", "not valid JSON"),
        (url, 4255550100, None, "JSON string"),
        (url, {"instance_id": "x"}, None, 'an object {"phone_number"'),
        (url, {"phone": PHONE}, None, 'an object {"phone_number"'),  # not "Field required"
        (url, "call me maybe", None, "phone_number: not a phone number"),
        (url, "+1 425", None, "phone_number: not a possible phone number"),
        (url, "555-0100", None, "not a valid phone number"),
        (url, "+1 900 555 0100", None, "premium rate numbers are not served"),
        (url, {"phone_number": PHONE, "instance_id": "no spaces"}, None, "instance_id"),
        (url, {"phone_number": PHONE, "instance_id": 7}, None, "instance_id"),
        (f"{url}/{iid}/raiseEvent/SmsChallengeResponse", "12a4", None, "code"),
        (f"{url}/{iid}/raiseEvent/SmsChallengeResponse", 12.5, None, "code"),
        (f"{url}/{iid}/raiseEvent/SmsChallengeResponse", -1, None, "code"),
        (f"{url}/{iid}/raiseEvent/SmsChallengeResponse", {"code": "1234"}, None, "code"),
        (f"{url}/{iid}/raiseEvent/Approval", "1234", None, "unknown event 'Approval'"),
        (f"{url}/{iid}/terminate?reason={'x' * 501}", None, b"", "reason"),
        (f"{url}/{'a' * 65}/terminate", None, b"", "instance id"),
    ]
    for target, body, raw, words in cases:
        status, answer, _ = await post(http, target, body, raw=raw)
        assert status == 400, (target, body, answer)
        assert words in answer["error"], (target, body, answer)
    status, answer = await get(http, f"{url}/bad%20id")
    assert status == 400 and "instance id" in answer["error"]


async def test_start_to_verified_with_a_numeric_code(served, http):
    worker, deployment = served, served.deployment
    # An instance whose code begins with 0: sent as a JSON number, it must be left-padded.
    iid = next(i for i in (uuid.uuid4().hex for _ in itertools.count())
               if draw_code(TEST_CODE_KEY.encode(), i, 4).startswith("0"))
    status_url = f"{base(worker)}/verifications/{iid}"
    assert await get(http, status_url) == (404, {"error": f"no verification {iid} (never "
                                                 "started, or concluded more than 3600 s ago)"})

    status, body, headers = await post(http, f"{base(worker)}/verifications",
                                       {"phone_number": PHONE, "instance_id": iid})
    assert status == 202
    assert body == {"id": iid, "statusQueryGetUri": status_url,
                    "sendEventPostUri": f"{status_url}/raiseEvent/SmsChallengeResponse",
                    "terminatePostUri": f"{status_url}/terminate?reason={{text}}",
                    "locale": "en",  # rule 18: the locale used (a US number: English)
                    "channel": "sms"}  # the channel used (rule 16)
    assert headers["Location"] == status_url
    # 202 means started: the status answers at once (as in the seed), no 404 first; and as
    # Durable Functions answers, 202 with a Location while it runs.
    async with http.get(status_url) as response:
        status, pending = response.status, await response.json()
        assert response.headers["Location"] == status_url
    assert status == 202 and pending["runtimeStatus"] in ("Pending", "Running")
    assert pending["name"] == "E4_SmsPhoneVerification" and pending["instanceId"] == iid
    assert pending["customStatus"] is None
    assert pending["input"] == MASKED and pending["output"] is None
    assert pending["attemptsLeft"] == 4 and pending["reason"] is None
    assert pending["createdTime"].endswith("Z") and pending["deadline"] > pending["createdTime"]
    await poll(http, status_url, running)  # the SMS was sent

    async with Client(deployment) as kafka:
        code = await kafka.sms_code(iid)
    assert code.startswith("0")
    status, answer, _ = await post(http, body["sendEventPostUri"], int(code))
    assert (status, answer) == (202, {"id": iid, "result": "verified", "attemptsLeft": 3,
                                      "runtimeStatus": "Completed", "output": True})
    status, done = await get(http, status_url)
    assert status == 200
    assert done["runtimeStatus"] == "Completed" and done["output"] is True
    assert done["reason"] == "code_matched" and done["attempts"] == 1
    assert done["lastUpdatedTime"] >= done["createdTime"]
    assert_no_secrets(done, iid, code)
    assert_no_secrets(pending, iid, code)
    # Concluded: 410 for anything more; a used id is 409.
    status, answer, _ = await post(http, body["sendEventPostUri"], code)
    assert status == 410 and answer["result"] == "ended" and "already concluded" in answer["error"]
    status, answer, _ = await post(http, f"{base(worker)}/verifications",
                                   {"phone_number": PHONE, "instance_id": iid})
    assert status == 409 and f"the id {iid} is already in use" in answer["error"]


async def test_start_with_a_json_string_then_wrong_codes_fail(deployment, start_worker, http):
    worker = start_worker(VERIFICATION_MAX_ATTEMPTS="2")
    status, body, _ = await post(http, f"{base(worker)}/verifications", PHONE)  # as the seed
    assert status == 202
    iid = body["id"]
    assert len(iid) == 32 and uuid.UUID(iid).version == 4
    async with Client(deployment) as kafka:
        code = await kafka.sms_code(iid)
    wrong = "0000" if code != "0000" else "1111"
    answers = [await post(http, body["sendEventPostUri"], wrong) for _ in range(2)]
    assert [(s, a["result"], a["attemptsLeft"], a["output"]) for s, a, _ in answers] == [
        (202, "wrong_code", 1, None), (202, "too_many_attempts", 0, False)]
    status, done = await get(http, body["statusQueryGetUri"])
    assert status == 200  # completed (it returned false), as the seed's orchestrator does
    assert done["runtimeStatus"] == "Completed" and done["output"] is False
    assert done["reason"] == "too_many_attempts" and done["attemptsLeft"] == 0
    assert_no_secrets(done, iid, code)


async def test_terminate(served, http):
    worker = served
    status, body, _ = await post(http, f"{base(worker)}/verifications", PHONE)
    terminate = body["terminatePostUri"].replace("{text}", "changed my mind")
    status, answer, _ = await post(http, terminate, raw=b"")
    assert (status, answer["result"], answer["runtimeStatus"]) == (202, "terminated",
                                                                   "Terminated")
    status, done = await get(http, body["statusQueryGetUri"])
    assert status == 400  # Durable Functions: "the specified instance failed or was terminated"
    assert done["error"] == f"verification {body['id']} was terminated"
    assert done["runtimeStatus"] == "Terminated" and done["output"] is False
    assert done["reason"] == "terminated" and done["terminateReason"] == "changed my mind"
    assert done["input"] == MASKED
    status, answer, _ = await post(http, terminate, raw=b"")
    assert status == 410
    status, answer, _ = await post(http, f"{base(worker)}/verifications/nobody/terminate",
                                   raw=b"")
    assert status == 404 and "no verification nobody" in answer["error"]


async def test_rate_limited_is_429_with_retry_after(start_worker, http):
    worker = start_worker(RATE_LIMIT_STARTS="1")
    url = f"{base(worker)}/verifications"
    assert (await post(http, url, "+1 425-555-0161"))[0] == 202
    status, answer, headers = await post(http, url, "+1 425-555-0161")
    assert status == 429 and "too many verifications" in answer["error"]
    assert 1 <= int(headers["Retry-After"]) <= 600


async def test_no_reply_in_time_is_504(start_worker, http):
    worker = start_worker(HTTP_REPLY_TIMEOUT_SECONDS="0.001")
    status, answer, _ = await post(http, f"{base(worker)}/verifications", PHONE)
    assert status == 504 and "may still take effect" in answer["error"]


async def test_the_seeds_own_requests_work_unchanged(served, http):
    worker, deployment = served, served.deployment
    status, body, headers = await post(
        http, f"{base(worker)}/orchestrators/E4_SmsPhoneVerification", "+1 425-555-0162")
    assert status == 202
    iid = body["id"]
    seed = f"{base(worker)}/admin/extensions/DurableTaskExtension/instances/{iid}"
    assert body["statusQueryGetUri"].startswith(f"{seed}?taskHub=")
    assert body["sendEventPostUri"].startswith(f"{seed}/raiseEvent/{{eventName}}?")
    assert body["terminatePostUri"].startswith(f"{seed}/terminate?reason={{text}}&")
    assert headers["Location"] == body["statusQueryGetUri"]
    # The seed's status request, with its query parameters (accepted and ignored).
    status, state = await get(http, f"{seed}?taskHub=DurableFunctionsHub&connection=Storage"
                                    "&code=XYZ")
    assert status == 202 and state["instanceId"] == iid
    async with Client(deployment) as kafka:
        code = await kafka.sms_code(iid)
    raise_event = body["sendEventPostUri"].replace("{eventName}", "SmsChallengeResponse")
    status, answer, _ = await post(http, raise_event, int(code))
    assert (status, answer["result"]) == (202, "verified")
    status, answer, _ = await post(http, body["terminatePostUri"].replace("{text}", "x"), raw=b"")
    assert status == 410


async def test_commands_reach_the_owning_worker_from_either(start_worker, http):
    a = start_worker("a")
    b = start_worker("b")
    urls = {base(a): "a", base(b): "b"}

    async def owner(worker: Worker, iid: str) -> str | None:
        """Who owns ``iid``, according to ``worker``'s Faust router (None while rebalancing)."""
        status, url = await get(http, f"{base(worker)}/router/verifications/{iid}/")
        if status != 200:
            return None
        return urls.get(str(URL(url).origin()))

    async def owned_by(name: str) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while loop.time() < deadline:
            iid = uuid.uuid4().hex
            if await owner(a, iid) == name and await owner(b, iid) == name:
                return iid
            await asyncio.sleep(0.02)
        raise TimeoutError(f"no instance owned by {name}: the workers never split the partitions")

    iid_b, iid_a = await owned_by("b"), await owned_by("a")
    for iid in (iid_b, iid_a):
        status, _, _ = await post(http, f"{base(a)}/verifications",
                                  {"phone_number": PHONE, "instance_id": iid})
        assert status == 202
    # Asked of a, b's instance is served by b (a would not answer for a partition it does not
    # own: it answers 503 then), and the other way round: status, a code (its body travels
    # along), a terminate.
    for iid, asked in ((iid_b, a), (iid_a, b), (iid_b, b), (iid_a, a)):
        url = f"{base(asked)}/verifications/{iid}"
        async with http.get(url) as response:
            answer = await response.json()
            assert response.status == 202 and response.headers["Location"] == url
        assert answer["instanceId"] == iid and answer["input"] == MASKED
    for iid, asked in ((iid_b, a), (iid_a, b)):
        status, answer, _ = await post(
            http, f"{base(asked)}/verifications/{iid}/raiseEvent/SmsChallengeResponse",
            "0000" if draw_code(TEST_CODE_KEY.encode(), iid, 4) != "0000" else "1111")
        assert (status, answer["result"], answer["attemptsLeft"]) == (202, "wrong_code", 3)
        status, answer, _ = await post(
            http, f"{base(asked)}/verifications/{iid}/terminate?reason=routed", raw=b"")
        assert (status, answer["result"]) == (202, "terminated")
    assert await owner(a, iid_b) == "b" and await owner(b, iid_a) == "a"


async def test_azure_functions_forms_the_api_prefix_and_the_key(served):
    """As a seed client on Azure Functions calls it: under /api, the key as ``?code=`` or in
    ``x-functions-key``; the key is never echoed in a URI nor logged."""
    worker, deployment = served, served.deployment
    secret = "test-api-key"
    async with aiohttp.ClientSession() as anonymous:
        status, body, headers = await post(
            anonymous, f"{base(worker)}/api/orchestrators/E4_SmsPhoneVerification?code={secret}",
            "+1 425-555-0163")
        assert status == 202, body
        iid = body["id"]
        assert secret not in json.dumps(body) and secret not in headers["Location"]
        # The key in Azure's header, the seed's URI as given, under /api too.
        functions_key = {"x-functions-key": secret}
        for url in (body["statusQueryGetUri"],
                    f"{base(worker)}/api/verifications/{iid}",
                    f"{base(worker)}/api/runtime/webhooks/durabletask/instances/{iid}"):
            async with anonymous.get(url, headers=functions_key) as response:
                assert response.status == 202 and (await response.json())["instanceId"] == iid
        # ?code= on a status request: Location is the same URI without the key.
        url = f"{base(worker)}/verifications/{iid}"
        async with anonymous.get(f"{url}?code={secret}") as response:
            assert response.status == 202 and response.headers["Location"] == url
        async with anonymous.get(f"{url}?code=wrong") as response:
            assert response.status == 401
        async with anonymous.get(url, headers={"x-functions-key": "wrong"}) as response:
            assert response.status == 401
        async with Client(deployment) as kafka:
            code = await kafka.sms_code(iid)
        status, answer, _ = await post(
            anonymous, f"{base(worker)}/api/verifications/{iid}/raiseEvent/SmsChallengeResponse"
            f"?code={secret}", code)
        assert (status, answer["result"]) == (202, "verified")
    assert secret not in worker.log()


async def test_unknown_routes_and_methods_answer_json(served, http):
    worker = served
    for method, path, status, words in (
            ("GET", "/nothing/here", 404, "no such route: /nothing/here"),
            ("GET", "/api", 404, "no such route"),
            ("POST", "/verifications/abc/raiseEvent/x/y", 404, "no such route"),
            ("DELETE", "/verifications", 405, "DELETE is not served at /verifications"),
            ("GET", "/api/orchestrators/E4_SmsPhoneVerification", 405, "GET is not served at")):
        async with http.request(method, base(worker) + path) as response:
            assert response.status == status, (method, path)
            assert response.content_type == "application/json"
            assert words in (await response.json())["error"], (method, path)
