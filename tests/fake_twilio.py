"""A local fake of Twilio's Messages and Calls endpoints, for tests that must never reach the
internet (a call records its TwiML as its body).

``POST /2010-04-01/Accounts/{sid}/Messages.json`` answers as Twilio does: 201 with a message
resource, 400 (code 21211) for a number in ``invalid_numbers``, 401 (20003) for wrong
credentials, scripted failures (429 with 20429, 500...) through :meth:`FakeTwilio.fail` and
requests left unanswered until it stops through :meth:`FakeTwilio.stall`.
Every request is recorded, accepted or not. Run it in the test's loop (``async with``) or in
a thread of its own (``with fake.in_thread():``) for tests that block their loop.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

ACCOUNT_SID = "AC" + "0" * 31 + "1"
AUTH_TOKEN = "fake-auth-token"
FROM_NUMBER = "+15005550006"
INVALID_NUMBER = "+14255550111"  # a valid number the fake refuses (Twilio 21211)
_STALL = 0

_ERRORS = {
    400: (21211, "The 'To' number {to} is not a valid phone number."),
    401: (20003, "Authenticate"),
    404: (20404, "The requested resource was not found"),
    429: (20429, "Too Many Requests"),
    500: (20500, "An internal server error has occurred"),
    503: (20503, "Service unavailable"),
}


@dataclass(frozen=True)
class Received:
    """One request as the fake saw it, and the status it answered."""

    account_sid: str
    to: str
    from_: str
    body: str
    auth: tuple[str, str] | None
    #: The HTTP status answered; 0 for a stalled request.
    status: int
    #: The message SID, for a created message.
    sid: str | None = None
    #: Where the sender asked Twilio to post delivery receipts (``StatusCallback``).
    status_callback: str | None = None
    #: ``message`` (Messages.json) or ``call`` (Calls.json, its TwiML in ``body``).
    kind: str = "message"


class FakeTwilio:
    """The fake server; ``base_url`` is valid once started."""

    def __init__(self, account_sid: str = ACCOUNT_SID, auth_token: str = AUTH_TOKEN,
                 invalid_numbers: set[str] | frozenset[str] = frozenset({INVALID_NUMBER})) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.invalid_numbers = set(invalid_numbers)
        self._lock = threading.Lock()
        self._requests: list[Received] = []
        self._failures: deque[int] = deque()
        self._always: int | None = None
        self._sids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        assert self.port, "FakeTwilio is not running"
        return f"http://127.0.0.1:{self.port}"

    # Scripting and inspection (safe from any thread).

    def fail(self, status: int, times: int | None = 1) -> None:
        """Answer the next ``times`` requests with ``status``; ``None``: every one from now."""
        with self._lock:
            if times is None:
                self._always = status
            else:
                self._failures.extend([status] * times)

    def stall(self, times: int = 1) -> None:
        """Leave the next ``times`` requests unanswered until the fake stops."""
        self.fail(_STALL, times)

    @property
    def requests(self) -> list[Received]:
        """Every request so far, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def messages(self) -> list[Received]:
        """The requests that created a message (201): what phones would have received."""
        return [r for r in self.requests if r.status == 201 and r.kind == "message"]

    @property
    def calls(self) -> list[Received]:
        """The requests that created a call (201), each with its TwiML as ``body``."""
        return [r for r in self.requests if r.status == 201 and r.kind == "call"]

    def wait_for_messages(self, count: int, timeout: float) -> list[Received]:
        """Block until ``count`` messages were accepted (fake in its own thread only)."""
        deadline = time.monotonic() + timeout
        while len(messages := self.messages) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(messages)} of {count} messages in {timeout}s")
            time.sleep(0.02)
        return messages

    # The endpoint.

    async def _create_call(self, request: web.Request) -> web.Response:
        return await self._create_message(request, kind="call")

    async def _create_message(self, request: web.Request, kind: str = "message") -> web.Response:
        form = await request.post()
        to, from_, body = (str(form.get(key, "")) for key in (
            "To", "From", "Twiml" if kind == "call" else "Body"))
        auth = _basic_auth(request.headers.get("Authorization", ""))
        sid = request.match_info["sid"]
        with self._lock:
            if auth != (self.account_sid, self.auth_token) or sid != self.account_sid:
                status = 401
            elif self._failures:
                status = self._failures.popleft()
            elif self._always is not None:
                status = self._always
            elif to.removeprefix("whatsapp:") in self.invalid_numbers or not (
                    to.removeprefix("whatsapp:").startswith("+")):
                status = 400
            else:
                status = 201
            prefix = "CA" if kind == "call" else "SM"
            message_sid = f"{prefix}{next(self._sids):032x}" if status == 201 else None
            callback = str(form["StatusCallback"]) if "StatusCallback" in form else None
            self._requests.append(Received(sid, to, from_, body, auth, status, message_sid,
                                           callback, kind))
        if status == _STALL:
            assert self._stopping is not None
            await self._stopping.wait()
            status = 503
        if message_sid is not None:
            resource = _message(sid, message_sid, to, from_, body)
            if kind == "call":
                resource["uri"] = resource["uri"].replace("/Messages/", "/Calls/")
            return web.json_response(resource, status=201)
        code, text = _ERRORS.get(status, (status, "Error"))
        return web.json_response({"code": code, "message": text.format(to=to),
                                  "more_info": f"https://www.twilio.com/docs/errors/{code}",
                                  "status": status}, status=status)

    # Running it.

    async def start(self) -> FakeTwilio:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._create_message)
        app.router.add_post("/2010-04-01/Accounts/{sid}/Calls.json", self._create_call)
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            assert self._stopping is not None
            self._stopping.set()
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTwilio:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextmanager
    def in_thread(self, timeout: float = 10.0) -> Iterator[FakeTwilio]:
        """Serve from a thread with its own loop, for tests that block (worker processes)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fake-twilio", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout)
            try:
                yield self
            finally:
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            loop.close()


def _basic_auth(header: str) -> tuple[str, str] | None:
    if not header.startswith("Basic "):
        return None
    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    return user, password


def _message(account_sid: str, sid: str, to: str, from_: str, body: str) -> dict[str, Any]:
    """The message resource as Twilio returns it on create (the fields the client reads)."""
    now = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    return {
        "account_sid": account_sid, "api_version": "2010-04-01", "body": body,
        "date_created": now, "date_sent": None, "date_updated": now, "direction": "outbound-api",
        "error_code": None, "error_message": None, "from": from_, "messaging_service_sid": None,
        "num_media": "0", "num_segments": "1", "price": None, "price_unit": "USD", "sid": sid,
        "status": "queued", "subresource_uris": {}, "to": to,
        "uri": f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json",
    }
