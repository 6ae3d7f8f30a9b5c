"""The HTTP API against worker processes on the real broker: auth, bad input, the seed's flow
(start, status, raiseEvent, terminate), and a status request routed to the owning worker."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from yarl import URL

from phoneverify.models.codes import draw_code, hash_code
from phoneverify.models.phone import mask

from support import TEST_CODE_KEY, Client, Worker

KEY = {"X-API-Key": "test-api-key"}
PHONE = "+1 425-555-0100"
MASKED = mask("+14255550100")  # "+142******00"


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


def started(status: int, body: Any) -> bool:
    return status == 200 and body["runtimeStatus"] == "Running"


def finished(status: int, body: Any) -> bool:
    return status == 200 and body["runtimeStatus"] in ("Completed", "Terminated")


def assert_no_secrets(body: Any, instance_id: str, code: str) -> None:
    text = json.dumps(body)
    assert "code_hash" not in text and '"code"' not in text
    assert hash_code(TEST_CODE_KEY.encode(), instance_id, code) not in text
    assert "4255550100" not in text  # only the masked number


async def test_every_request_needs_the_api_key(start_worker):
    worker = start_worker()
    url = f"{base(worker)}/verifications"
    async with aiohttp.ClientSession() as anonymous:
        for headers in ({}, {"X-API-Key": "wrong"}):
            status, body, _ = await post(anonymous, url, PHONE, headers=headers)
            assert (status, body) == (401, {"error": "missing or wrong X-API-Key header"})
            async with anonymous.get(f"{url}/abc", headers=headers) as response:
                assert response.status == 401
            status, _, _ = await post(anonymous, f"{url}/abc/terminate", raw=b"", headers=headers)
            assert status == 401


async def test_bad_input_is_400_saying_what_is_wrong(start_worker, http):
    worker = start_worker()
    url = f"{base(worker)}/verifications"
    cases = [
        (url, None, b"{not json", "not valid JSON"),
        (url, 4255550100, None, "JSON string"),
        (url, {"instance_id": "x"}, None, "phone_number: Field required"),
        (url, "call me maybe", None, "phone_number: not a phone number"),
        (url, "+1 425", None, "phone_number: not a possible phone number"),
        (url, {"phone_number": PHONE, "instance_id": "no spaces"}, None, "instance_id"),
        (url, {"phone_number": PHONE, "instance_id": 7}, None, "instance_id"),
        (f"{url}/abc/raiseEvent/SmsChallengeResponse", "12a4", None, "code"),
        (f"{url}/abc/raiseEvent/SmsChallengeResponse", 12.5, None, "code"),
        (f"{url}/abc/raiseEvent/SmsChallengeResponse", -1, None, "code"),
        (f"{url}/abc/raiseEvent/SmsChallengeResponse", {"code": "1234"}, None, "code"),
        (f"{url}/abc/terminate?reason={'x' * 501}", None, b"", "reason"),
        (f"{url}/{'a' * 65}/terminate", None, b"", "instance id"),
    ]
    for target, body, raw, words in cases:
        status, answer, _ = await post(http, target, body, raw=raw)
        assert status == 400, (target, body, answer)
        assert words in answer["error"], (target, body, answer)
    status, answer = await get(http, f"{url}/bad%20id")
    assert status == 400 and "instance id" in answer["error"]


async def test_start_to_verified_with_a_numeric_code(deployment, start_worker, http):
    worker = start_worker()
    # An instance whose code begins with 0: sent as a JSON number, it must be left-padded.
    iid = next(i for i in (uuid.uuid4().hex for _ in itertools.count())
               if draw_code(TEST_CODE_KEY.encode(), i, 4).startswith("0"))
    status_url = f"{base(worker)}/verifications/{iid}"
    assert await get(http, status_url) == (404, {"error": f"no verification {iid} (a start that "
                                                 "was just accepted shows here once it has "
                                                 "been processed)"})

    status, body, headers = await post(http, f"{base(worker)}/verifications",
                                       {"phone_number": PHONE, "instance_id": iid})
    assert status == 202
    assert body == {"id": iid, "statusQueryGetUri": status_url,
                    "sendEventPostUri": f"{status_url}/raiseEvent/SmsChallengeResponse",
                    "terminatePostUri": f"{status_url}/terminate?reason={{text}}"}
    assert headers["Location"] == status_url

    running = await poll(http, status_url, started)
    assert running["input"] == MASKED and running["output"] is None
    assert running["attemptsLeft"] == 4 and running["reason"] is None
    assert running["createdTime"].endswith("Z") and running["deadline"] > running["createdTime"]

    async with Client(deployment) as kafka:
        code = await kafka.sms_code(iid)
    assert code.startswith("0")
    status, body, _ = await post(http, body["sendEventPostUri"], int(code))
    assert (status, body) == (202, {"id": iid})

    done = await poll(http, status_url, finished)
    assert done["runtimeStatus"] == "Completed" and done["output"] is True
    assert done["reason"] == "code_matched" and done["attempts"] == 1
    assert done["lastUpdatedTime"] >= done["createdTime"]
    assert_no_secrets(done, iid, code)
    assert_no_secrets(running, iid, code)


async def test_start_with_a_json_string_then_wrong_codes_fail(deployment, start_worker, http):
    worker = start_worker(VERIFICATION_MAX_ATTEMPTS="2")
    status, body, _ = await post(http, f"{base(worker)}/verifications", PHONE)  # as the seed
    assert status == 202
    iid = body["id"]
    assert len(iid) == 32 and uuid.UUID(iid).version == 4
    await poll(http, body["statusQueryGetUri"], started)
    async with Client(deployment) as kafka:
        code = await kafka.sms_code(iid)
    wrong = "0000" if code != "0000" else "1111"
    for _ in range(2):
        status, _, _ = await post(http, body["sendEventPostUri"], wrong)
        assert status == 202
    done = await poll(http, body["statusQueryGetUri"], finished)
    assert done["runtimeStatus"] == "Completed" and done["output"] is False
    assert done["reason"] == "too_many_attempts" and done["attemptsLeft"] == 0
    assert_no_secrets(done, iid, code)


async def test_terminate(start_worker, http):
    worker = start_worker()
    status, body, _ = await post(http, f"{base(worker)}/verifications", PHONE)
    await poll(http, body["statusQueryGetUri"], started)
    terminate = body["terminatePostUri"].replace("{text}", "changed my mind")
    status, answer, _ = await post(http, terminate, raw=b"")
    assert (status, answer) == (202, {"id": body["id"]})
    done = await poll(http, body["statusQueryGetUri"], finished)
    assert done["runtimeStatus"] == "Terminated" and done["output"] is False
    assert done["reason"] == "terminated" and done["terminateReason"] == "changed my mind"
    assert done["input"] == MASKED


async def test_status_is_routed_to_the_owning_worker(start_worker, http):
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
    # Asked of a, the status of b's instance comes from b (a would not answer for a partition
    # it does not own: it answers 503 then), and the other way round.
    for iid, asked in ((iid_b, a), (iid_a, b), (iid_b, b), (iid_a, a)):
        answer = await poll(http, f"{base(asked)}/verifications/{iid}", started)
        assert answer["instanceId"] == iid and answer["input"] == MASKED
    assert await owner(a, iid_b) == "b" and await owner(b, iid_a) == "a"
