"""The seed's HTTP API on the worker's web server (``WEB_PORT``), Durable-Functions style.

    POST /verifications                                       start     -> 202 | 400 | 409 | 429
    GET  /verifications/{id}                                  status    -> 202 | 200 | 400 | 404
    POST /verifications/{id}/raiseEvent/SmsChallengeResponse  the code  -> 202 | 404 | 410
    POST /verifications/{id}/terminate?reason=...             terminate -> 202 | 404 | 410
    POST /verifications/{id}/resend  {"channel"?}             resend    -> 202 | 404 | 409
                                                                           | 410 | 429
    (and .../raiseEvent/ResendCode, the seed-style resend)

and the same under the seed's own paths (``POST /orchestrators/E4_SmsPhoneVerification``,
``/admin/extensions/DurableTaskExtension/instances/{id}``...), so its requests paste unchanged,
and every one of them again under ``/api`` (where Azure Functions serves HTTP triggers).
The status answers as Durable Functions' does: ``202`` (with ``Location``) while the
verification is Pending or Running, ``200`` once Completed, ``400`` once Terminated.

Writes are commands on the Kafka topics with a ``request_id``; each answers once the actor's
``Reply`` has come back (``504`` if none came within ``HTTP_REPLY_TIMEOUT_SECONDS``: the
command may still take effect). So a started verification's status answers at once. Requests
about one verification are served by the worker that owns its partition: another worker
forwards them there (body and headers included). Every request needs the key (unless the
check is off): in ``X-API-Key``, or as Azure Functions takes it, in ``x-functions-key`` or
``?code=``; it is never logged nor written into a URI the API generates. Errors, including
unknown routes, are ``{"error": "..."}`` in words.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.metadata
import ipaddress
import json
import logging
import math
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import swagger_ui_bundle
from aiohttp import web as aioweb
from faust import web
from pydantic import ValidationError
from twilio.request_validator import RequestValidator
from yarl import URL

from phoneverify.agents.actor import Stored, current, verifications
from phoneverify.agents.app import app, names, settings
from phoneverify.agents.fraud import blocks as fraud_blocks
from phoneverify.delivery.twilio_sender import RECEIPTS
from phoneverify.interfaces import openapi
from phoneverify.interfaces.bodies import (
    CODE_BODY,
    START_BODY,
    ApiError,
    Body,
    Concluded,
    Decided,
    Liveness,
    Readiness,
    ResendRequest,
    Resent,
    SeedQuery,
    SeedTerminateQuery,
    Started,
    StartRequest,
    TerminatedStatus,
    TerminateQuery,
    TwilioCallback,
    VerificationStatus,
)
from phoneverify.interfaces.client import (
    InvalidInput,
    KafkaUnavailable,
    Refused,
    ReplyTimeout,
    VerificationClient,
    explain_refusal,
)
from phoneverify.models import fraud
from phoneverify.models.messages import INSTANCE_ID, Reply, SmsFailed, SmsSent, explain, iso
from phoneverify.models.phone import mask
from phoneverify.models.verification import Verification
from phoneverify.ops import metrics
from phoneverify.topics import partition_for

log = logging.getLogger("phoneverify.http")

EVENT = "SmsChallengeResponse"
#: The seed-style event that asks for the code again (rule 15).
RESEND = "ResendCode"
CHANNEL_CHOICES = ("sms", "whatsapp", "call", "auto")
SEED = "/admin/extensions/DurableTaskExtension/instances"
#: The same instance routes under the path today's Durable Functions documents.
WEBHOOKS = "/runtime/webhooks/durabletask/instances"
ROUTED = "X-Phoneverify-Routed"  # set on a request one worker forwards to the owner
#: On a forwarded request: the client address the first worker saw, and its keyed signature
#: (under CODE_HASH_KEY, which every worker shares), so the owner counts the right address.
CLIENT = "X-Phoneverify-Client"
#: The seed's orchestrator, named in the status document as Durable Functions names it.
ORCHESTRATOR = "E4_SmsPhoneVerification"
#: Where Azure Functions serves HTTP triggers: every API route answers under it too.
API_PREFIX = "/api"
#: Request headers that carry the API key (besides ``?code=``), forwarded to the owner.
KEY_HEADERS = ("X-API-Key", "x-functions-key")


class HttpError(Exception):
    """An answer other than success, with a message for a person (and headers)."""

    def __init__(self, code: int, detail: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.code, self.detail, self.headers, self.extra = code, detail, headers or {}, extra


class ApiView(web.View):
    """Checks the API key, the body size and the instance id before any handler or routing."""

    async def dispatch(self, request: Any) -> Any:
        if not _authorised(_offered_keys(request)):
            return self.error(401, "missing or wrong API key (send it in the X-API-Key "
                                   "header)")
        if (request.content_length or 0) > settings.http_max_body_bytes:
            return self.error(413, f"request body over {settings.http_max_body_bytes} bytes")
        iid = request.match_info.get("instance_id")
        if iid is not None and not INSTANCE_ID.fullmatch(iid):
            return self.error(400, "instance id in the path: use 1 to 64 characters of "
                                   "A-Z a-z 0-9 . _ -")
        try:
            return await super().dispatch(request)
        except HttpError as error:
            return self.json({"error": error.detail, **error.extra}, status=error.code,
                             headers=error.headers)


def _offered_keys(request: web.Request) -> list[str]:
    """The keys a request offers: ``X-API-Key``, ``x-functions-key``, ``?code=``."""
    offered = [request.headers.get(name) for name in KEY_HEADERS]
    return [key for key in (*offered, request.query.get("code")) if key]


def _authorised(given: list[str]) -> bool:
    keys = settings.accepted_api_keys
    if not keys:
        return True
    # Compare each offered key with every key (constant time each), so timing tells nothing
    # about which matched.
    return sum(hmac.compare_digest(offered.encode(errors="replace"), key.encode())
               for offered in given for key in keys) > 0


# ---------------------------------------------------------------- start


#: Answers every write may give besides its own: Kafka unreachable, no reply in time.
WRITE_ERRORS = {503: ApiError, 504: ApiError}
#: Answers of every request about one verification: a bad id in the path, its partition
#: moving (or its owner not answering a forward).
OWNED_ERRORS = {400: ApiError, 503: ApiError}


class Start(ApiView):
    """``POST`` a phone number (a JSON string, as in the seed, or ``{"phone_number",
    "instance_id"?, "locale"?}``): ``202`` once the verification is started, with the
    ``locale`` chosen (the body's, else ``Accept-Language``, else the number's country)."""

    seed = False

    @openapi.operation(
        "Start a verification: send the code by SMS", body=START_BODY, query=SeedQuery,
        description="Answers once the verification is started (its status answers at once).",
        responses={202: Started, 400: ApiError, 409: ApiError, 429: ApiError, **WRITE_ERRORS},
        headers={202: {"Location": "the status URI"},
                 429: {"Retry-After": "seconds until a start may be admitted"}})
    async def post(self, request: web.Request) -> web.Response:
        start = _start_request(await _json_body(request))
        address = client_ip(request)
        reply = await _ask(lambda c: c.start(
            start.phone_number, start.instance_id or uuid.uuid4().hex, locale=start.locale,
            accept_language=request.headers.get("Accept-Language"), client_ip=address,
            channel=start.channel))
        uris = _uris(request, reply.instance_id, seed=self.seed)
        # The locale (rule 18) and the channel (rule 16) used.
        answer = Started(**uris.dump(), locale=reply.locale, channel=reply.channel)
        return self.json(answer.dump(), status=202, headers={"Location": uris.statusQueryGetUri})


class SeedStart(Start):
    seed = True


def _start_request(body: Any) -> StartRequest:
    """The start's body as its model, or 400 saying what is wrong."""
    if isinstance(body, str):
        body = {"phone_number": body}
    if not isinstance(body, dict) or "phone_number" not in body:  # not "Field required"
        raise HttpError(400, 'body must be the phone number as a JSON string, or an object '
                             '{"phone_number": "...", "instance_id": "..."}')
    return _parse(StartRequest, body)


#: Words for what pydantic says in its own terms, by field.
HINTS = {"instance_id": "use 1 to 64 characters of A-Z a-z 0-9 . _ -",
         "channel": f"use one of {', '.join(CHANNEL_CHOICES)}",
         "reason": "at most 500 characters"}


def _parse(model: type[Body], body: Any) -> Any:
    """``body`` as ``model`` (strict: no type is coerced), or 400 saying which field is wrong
    and why (never echoing the input)."""
    try:
        return model.model_validate(body, strict=True)
    except ValidationError as error:
        fields = {str(item["loc"][0]) for item in error.errors() if item["loc"]}
        hints = [f"{name}: {HINTS[name]}" for name in sorted(fields & HINTS.keys())]
        raise HttpError(400, "; ".join(hints) or explain(error)) from None


def client_ip(request: web.Request) -> str | None:
    """The address a start or resend counts against: the peer's, or, when the peer is one of
    ``TRUSTED_PROXIES``, the last ``X-Forwarded-For`` entry (the one that proxy added); on a
    request another worker forwarded, the address that worker saw (signed by it)."""
    address, _, signature = request.headers.get(CLIENT, "").partition(" ")
    if signature and hmac.compare_digest(signature, _vouch(request.path, address)):
        return address
    try:
        peer = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return None  # not an IP connection (a Unix socket): nothing to count by
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    if any(peer in network for network in settings.trusted_networks):
        forwarded = ",".join(request.headers.getall("X-Forwarded-For", []))
        try:
            return fraud.client_address(forwarded.rsplit(",", 1)[-1].strip())
        except ValueError:
            pass  # the proxy sent none (or nonsense): count it against the proxy itself
    return str(peer)


def _vouch(path: str, address: str) -> str:
    """The signature of ``address`` on a request for ``path`` forwarded between workers."""
    key = hmac.new(settings.code_key, b"phoneverify/forwarded-client", hashlib.sha256).digest()
    return hmac.new(key, f"{path}\x00{address}".encode(), hashlib.sha256).hexdigest()


def _origin(request: web.Request) -> URL:
    origin = request.url.origin()
    forwarded = request.headers.get("X-Forwarded-Proto")
    if forwarded in ("http", "https"):  # behind a TLS-terminating proxy
        origin = origin.with_scheme(forwarded)
    return origin


def _uris(request: web.Request, iid: str, seed: bool) -> Started:
    """The follow-up URIs: never with the key (``code``), which a URI would leak to logs."""
    origin = _origin(request)
    if not seed:
        base = f"{origin}/verifications/{iid}"
        return Started(id=iid, statusQueryGetUri=base,
                       sendEventPostUri=f"{base}/raiseEvent/{EVENT}",
                       terminatePostUri=f"{base}/terminate?reason={{text}}")
    base = f"{origin}{SEED}/{iid}"
    query = "taskHub=phoneverify&connection=Kafka"
    return Started(id=iid, statusQueryGetUri=f"{base}?{query}",
                   sendEventPostUri=f"{base}/raiseEvent/{{eventName}}?{query}",
                   terminatePostUri=f"{base}/terminate?reason={{text}}&{query}")


# ---------------------------------------------------------------- one verification


class Status(ApiView):
    """``GET``: the verification's state, from the worker that owns it, with Durable Functions'
    codes: ``202`` and ``Location`` while Pending or Running, ``200`` once Completed (verified
    or not: ``output`` says), ``400`` once Terminated."""

    @openapi.operation(
        "A verification's status", query=SeedQuery,
        responses={200: VerificationStatus, 202: VerificationStatus,
                   400: TerminatedStatus | ApiError, 404: ApiError, 503: ApiError},
        description="202 (with Location) while Pending or Running, 200 once Completed "
                    "(verified or not: output says), 400 once Terminated (or for a bad id).",
        headers={202: {"Location": "this URI: poll it"}})
    async def get(self, request: web.Request, instance_id: str) -> web.Response:
        return await _owned(request, instance_id, lambda: self._status(request, instance_id))

    async def _status(self, request: web.Request, instance_id: str) -> web.Response:
        body = status_of(_started(instance_id).state).dump()
        match body["runtimeStatus"]:
            case "Completed":
                return self.json(body)
            case "Terminated":
                return self.json({"error": f"verification {instance_id} was terminated", **body},
                                 status=400)
        return self.json(body, status=202, headers={"Location": _self_uri(request)})


def _self_uri(request: web.Request) -> str:
    """The URI asked for, as the client reached it, without the key (``code``)."""
    url = _origin(request).join(request.rel_url)
    return str(url.with_query({k: v for k, v in url.query.items() if k != "code"}))


class RaiseEvent(ApiView):
    """``POST`` the code: a JSON string of digits, or a JSON number as in the seed (the event
    ``ResendCode`` has its own route: :class:`ResendView`)."""

    @openapi.operation(
        "Submit the code (event SmsChallengeResponse)", body=CODE_BODY, query=SeedQuery,
        path={"event_name": {"type": "string", "enum": [EVENT], "description": "the event"}},
        description=f"The event name must be {EVENT}; the body the code, as a JSON string of "
                    "digits (leading zeros count) or a JSON number (left-padded with zeros).",
        responses={202: Decided, 404: ApiError, 410: Concluded, **OWNED_ERRORS,
                   **WRITE_ERRORS})
    async def post(self, request: web.Request, instance_id: str,
                   event_name: str) -> web.Response:
        if event_name != EVENT:
            raise HttpError(400, f"unknown event {event_name!r}: a verification waits for "
                                 f"{EVENT} (or {RESEND})")
        return await _owned(request, instance_id, lambda: self._code(request, instance_id))

    async def _code(self, request: web.Request, instance_id: str) -> web.Response:
        body = await _json_body(request)
        if isinstance(body, float) and body.is_integer():  # 42.0 is the JSON integer 42
            body = int(body)
        try:
            code = CODE_BODY.validate_python(body)
        except ValidationError:
            raise HttpError(400, 'the body must be the code: a JSON string of digits ("0042")'
                                 " or a non-negative JSON integer") from None
        if isinstance(code, int):
            code = str(code).zfill(settings.verification_code_length)
        _started(instance_id)
        reply = await _ask(lambda c: c.submit_code(instance_id, code))
        return _answer(self, reply)


class TerminateView(ApiView):
    """``POST ?reason=...``: end the verification now."""

    @openapi.operation("Terminate a verification", query=SeedTerminateQuery,
                       responses={202: Decided, 404: ApiError, 410: Concluded, **OWNED_ERRORS,
                                  **WRITE_ERRORS})
    async def post(self, request: web.Request, instance_id: str) -> web.Response:
        return await _owned(request, instance_id, lambda: self._terminate(request, instance_id))

    async def _terminate(self, request: web.Request, instance_id: str) -> web.Response:
        query: TerminateQuery = _parse(TerminateQuery, dict(request.query))
        _started(instance_id)
        reply = await _ask(lambda c: c.terminate(instance_id, query.reason))
        return _answer(self, reply)


class ResendView(ApiView):
    """``POST`` (body empty or ``{"channel": ...}``): the same code again (rule 15)."""

    @openapi.operation(
        "Send the same code again, over the same channel or another", body=ResendRequest,
        body_required=False,
        description="The deadline and attempts do not change. Refused with 429 (Retry-After: "
                    "seconds until allowed; none when no resend is left) when too soon, none "
                    "is left, the number's limit is reached or the client address asked for "
                    "too many (HTTP_STARTS_PER_IP), 409 for a channel that cannot "
                    "reach the number (the error names those that would).",
        responses={202: Resent, 404: ApiError, 409: ApiError, 410: ApiError, 429: ApiError,
                   **OWNED_ERRORS, **WRITE_ERRORS},
        headers={429: {"Retry-After": "seconds until a resend is allowed"}})
    async def post(self, request: web.Request, instance_id: str) -> web.Response:
        return await _owned(request, instance_id, lambda: _resend(self, request, instance_id))


async def _resend(view: web.View, request: web.Request, instance_id: str) -> web.Response:
    """202 with the channel and the resends left; 429 (Retry-After) too soon or none left;
    409 a channel that cannot reach the number; 404 unknown; 410 concluded."""
    body = await _json_body(request) if await _body(request) else {}
    if not isinstance(body, dict):
        raise HttpError(400, 'the body must be empty or an object {"channel": "call"}')
    asked: ResendRequest = _parse(ResendRequest, body)
    _started(instance_id)
    reply = await _ask(lambda c: c.resend(instance_id, asked.channel,
                                          client_ip=client_ip(request)))
    return view.json(Resent(id=reply.instance_id, result="resent", channel=reply.channel,
                            resendsLeft=reply.resends_left, attemptsLeft=reply.attempts_left,
                            runtimeStatus=RUNTIME[reply.status],
                            output=OUTPUT[reply.status]).dump(), status=202)


def _started(instance_id: str) -> Stored:
    """The verification, or 404 if it never started (or is no longer kept)."""
    stored = current(instance_id.encode())
    if stored is None or stored.state.status == "new":
        raise HttpError(404, f"no verification {instance_id} (never started, or concluded "
                             f"more than {settings.verification_retention_seconds:g} s ago)")
    return stored


def _answer(view: web.View, reply: Reply) -> web.Response:
    """A response or terminate decided: 202 with the result, or 410 if it had concluded."""
    body = Decided(id=reply.instance_id, result=reply.result, attemptsLeft=reply.attempts_left,
                   runtimeStatus=RUNTIME[reply.status], output=OUTPUT[reply.status])
    if reply.result == "ended":
        error = (f"verification {reply.instance_id} had already concluded ({reply.status}); "
                 "nothing changed")
        return view.json({"error": error, **body.dump()}, status=410)
    return view.json(body.dump(), status=202)


RUNTIME = {"pending": "Running", "verified": "Completed", "failed": "Completed",
           "terminated": "Terminated", "unknown": "Pending"}
OUTPUT = {"pending": None, "verified": True, "failed": False, "terminated": False,
          "unknown": None}


SMS_STATES = {"none": None, "requested": "requested", "accepted": "sent",
              "delivered": "delivered", "failed": "failed"}


def status_of(state: Verification) -> VerificationStatus:
    """The status document: never the code nor its hash."""
    runtime = {"pending": "Running" if state.sms in ("accepted", "delivered") else "Pending",
               "verified": "Completed", "failed": "Completed",
               "terminated": "Terminated"}.get(state.status, "Pending")
    return VerificationStatus(
        name=ORCHESTRATOR,
        instanceId=state.instance_id,
        runtimeStatus=runtime,
        input=mask(state.phone_number),  # masked: the number is personal data
        customStatus=None,
        output=None if not state.is_final else state.status == "verified",
        createdTime=_iso(state.created_at),
        lastUpdatedTime=_iso(state.updated_at),
        attempts=state.attempts,
        attemptsLeft=state.attempts_left,
        deadline=_iso(state.deadline),
        reason=state.reason,
        sms=SMS_STATES[state.sms],
        # Rules 15-16: the last delivery's channel, the resends left and when one is allowed.
        channel=state.channel,
        resendsLeft=state.resends_left if state.status == "pending" else 0,
        resendAllowedAt=_iso(state.resend_at),
        **({"terminateReason": state.detail} if state.status == "terminated" else {}),
    )


# ---------------------------------------------------------------- helpers


_client: VerificationClient | None = None


async def _ask(call: Any) -> Reply:
    """Send a command through the client library and map its answer to HTTP."""
    global _client
    if _client is None:
        _client = VerificationClient(settings.kafka_bootstrap_servers,
                                     topic_prefix=settings.topic_prefix, settings=settings,
                                     reply_timeout=settings.http_reply_timeout_seconds)
    try:
        return await call(_client)
    except InvalidInput as error:
        raise HttpError(400, str(error)) from None
    except Refused as refused:
        raise _refusal(refused.reply) from None
    except ReplyTimeout as error:
        raise HttpError(504, str(error)) from None
    except KafkaUnavailable as error:
        log.warning("HTTP API: %s", error)
        raise HttpError(503, "Kafka is not reachable from this worker; retry") from None


@app.on_before_shutdown.connect
async def _close_client(sender: Any, **kwargs: Any) -> None:
    """Stop the HTTP side's client (its producer and reply reader) with the worker: left open,
    aiokafka reports an unclosed producer at every stop."""
    global _client
    if _client is not None:
        client, _client = _client, None
        await client.close()


def _refusal(reply: Reply) -> HttpError:
    why, result = explain_refusal(reply), reply.result
    match result:
        case "duplicate":
            return HttpError(409, why, result=result, id=reply.instance_id)
        case "rate_limited" if reply.command == "resend" and reply.retry_after is None:
            return HttpError(429, why, result=result, retryAfter=None)  # none is left
        case "rate_limited":
            retry = max(1, math.ceil(reply.retry_after or 1))
            return HttpError(429, why, headers={"Retry-After": str(retry)}, result=result,
                             retryAfter=retry)
        case "unknown":
            return HttpError(404, why, result=result)
        case "channel_unavailable":
            return HttpError(409, why, result=result)
        case "ended":
            return HttpError(410, why, result=result, runtimeStatus=RUNTIME[reply.status])
    return HttpError(400, why, result=result)  # an invalid or blocked number


async def _body(request: web.Request) -> bytes:
    try:
        raw = await request.read()  # cached: a forward and the handler may both read it
    except aiohttp.web.HTTPRequestEntityTooLarge:
        raw = b"x" * (settings.http_max_body_bytes + 1)
    if len(raw) > settings.http_max_body_bytes:
        raise HttpError(413, f"request body over {settings.http_max_body_bytes} bytes")
    return raw


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await _body(request))
    except ValueError:
        raise HttpError(400, "body is not valid JSON (UTF-8)") from None
    except RecursionError:  # say "[[[[...": deeper than json parses, within the size limit
        raise HttpError(400, "body is JSON nested too deeply") from None


def _iso(value: Any) -> str | None:
    return None if value is None else iso(value)


async def _owned(request: web.Request, instance_id: str, serve: Any) -> web.Response:
    """Serve here if this worker owns the verification's partition, else forward it there."""
    try:
        owner = app.router.key_store(verifications.name, instance_id.encode())
    except KeyError:
        raise HttpError(503, "partitions are being assigned; retry") from None
    here = URL(str(app.conf.canonical_url))
    if (owner.host, owner.port) == (here.host, here.port):
        if restoring():  # its store may lack the verification yet: "never started" would lie
            raise HttpError(503, "this worker is restoring its tables from their changelogs; "
                                 "retry")
        return await serve()
    if request.headers.get(ROUTED):
        raise HttpError(503, "this verification's partition is moving between workers; retry")
    body = await _body(request)
    forwarded = {name.lower() for name in (*KEY_HEADERS, "Content-Type")}
    headers = {name: value for name, value in request.headers.items()
               if name.lower() in forwarded}
    address = client_ip(request)  # as this worker sees it: the owner counts the resend by it
    if address is not None:
        headers[CLIENT] = f"{address} {_vouch(request.path, address)}"
    target = request.url.with_host(owner.host or "").with_port(owner.port)
    try:
        async with app.http_client.request(request.method, target, data=body,
                                           headers={**headers, ROUTED: "1"}) as answer:
            kept = {name: answer.headers[name] for name in ("Location", "Retry-After")
                    if name in answer.headers}
            if "Location" in kept:  # the owner's own address: give the one the client used
                kept["Location"] = _self_uri(request)
            return aioweb.Response(body=await answer.read(), status=answer.status,
                                   content_type=answer.content_type, headers=kept)
    except aiohttp.ClientError as error:
        log.warning("HTTP API: forwarding %s to %s failed: %r", request.url.path, owner, error)
        raise HttpError(503, "the worker that owns this verification did not answer; "
                             "retry") from None


# ---------------------------------------------------------------- for operators and people

STATIC = Path(__file__).resolve().parent / "static"


class Health(web.View):
    """``GET /healthz``: 200 while the worker runs (no key needed)."""

    @openapi.operation("Liveness: 200 while the worker runs", key=False,
                       responses={200: Liveness})
    async def get(self, request: web.Request) -> web.Response:
        return self.json(Liveness(status="ok").dump())


class Ready(web.View):
    """``GET /readyz``: 200 once partitions are assigned and tables recovered, else 503."""

    @openapi.operation("Readiness: partitions assigned and tables recovered", key=False,
                       responses={200: Readiness, 503: Readiness})
    async def get(self, request: web.Request) -> web.Response:
        why = not_ready()
        if why:
            return self.json(Readiness(status="not ready", reason=why).dump(), status=503)
        return self.json(Readiness(status="ready").dump())


def restoring() -> bool:
    """Whether the tables are being recovered from their changelogs (not all there yet)."""
    return bool(getattr(app, "in_recovery", False)) or not app.tables.recovery.completed.is_set()


def not_ready() -> str:
    """Why the worker cannot serve its partitions yet, or ``""``."""
    if not app.consumer_generation_id:
        return "waiting to join the consumer group"
    if app.rebalancing:
        return "partitions are being assigned"
    if restoring():
        return "tables are being recovered from their changelogs"
    if settings.fraud_guard and not fraud_blocks.loaded.is_set():
        return "the fraud guard's blocks are being read (verification.fraud)"
    return ""


class Metrics(web.View):
    """``GET /metrics``: Prometheus text format (no key needed)."""

    @openapi.operation("Prometheus metrics", key=False, responses={200: str},
                       media={200: "text/plain"})
    async def get(self, request: web.Request) -> web.Response:
        body, content_type = metrics.exposition()
        return aioweb.Response(body=body, headers={"Content-Type": content_type})


class Page(web.View):
    """``GET /``: the page for a person (it asks for the API key and keeps it in the browser's
    session storage; the API calls it makes carry it)."""

    @openapi.operation("The page for a person: start, enter the code, see the outcome",
                       key=False, responses={200: str}, media={200: "text/html"})
    async def get(self, request: web.Request) -> web.Response:
        return aioweb.Response(body=(STATIC / "index.html").read_bytes(),
                               content_type="text/html", charset="utf-8",
                               headers={"Cache-Control": "no-store"})


class TwilioReceipt(web.View):
    """``POST /twilio/status``: Twilio's delivery receipts (status callbacks), signed with the
    account's auth token in ``X-Twilio-Signature`` (403 when it does not match).

    ``delivered`` (a call: ``completed``) records the delivery as delivered; ``undelivered``
    or ``failed`` (a call: ``no-answer``, ``busy``, ``failed``) fails it for good: the next
    fallback channel goes out, or the verification fails (``sms_undeliverable``) when none is
    left; other statuses change nothing (204).
    """

    @openapi.operation(
        "Twilio's delivery receipts (status callbacks)", key=False, body=TwilioCallback,
        body_media="application/x-www-form-urlencoded",
        description="Signed by Twilio in X-Twilio-Signature; the callback URL names "
                    "instance_id and command_id. Needs SMS_BACKEND=twilio and PUBLIC_BASE_URL.",
        responses={204: None, 400: ApiError, 403: ApiError, 404: ApiError, 413: ApiError})
    async def post(self, request: web.Request) -> web.Response:
        if settings.sms_backend != "twilio" or not settings.public_base_url:
            return self.error(404, "delivery receipts need SMS_BACKEND=twilio and "
                                   "PUBLIC_BASE_URL")
        try:
            params = dict(parse_qsl((await _body(request)).decode(), keep_blank_values=True))
        except (HttpError, UnicodeDecodeError):
            return self.error(400, "a status callback is a form of at most "
                                   f"{settings.http_max_body_bytes} bytes (UTF-8)")
        url = f"{settings.public_base_url.rstrip('/')}{RECEIPTS}"
        if request.rel_url.raw_query_string:  # as Twilio called it (and signed it), encoded
            url += f"?{request.rel_url.raw_query_string}"
        validator = RequestValidator(settings.twilio_auth_token.get_secret_value())
        if not validator.validate(url, params, request.headers.get("X-Twilio-Signature", "")):
            return self.error(403, "X-Twilio-Signature does not match this request")
        iid, command_id = request.query.get("instance_id", ""), request.query.get("command_id")
        if not INSTANCE_ID.fullmatch(iid) or not command_id:
            return self.error(400, "the callback URL must name instance_id and command_id")
        record, status = receipt(TwilioCallback.model_validate(params), iid, command_id)
        if record is None:
            return aioweb.Response(status=204)  # queued, sent, ringing...: nothing to record
        key = iid.encode()
        sent = await app.producer.send(names.sms_status, key, record.to_bytes(),
                                       partition_for(key, settings.partitions), None, None)
        await sent
        metrics.sms.labels(status).inc()
        return aioweb.Response(status=204)


class OpenApi(web.View):
    """``GET /openapi.json``: this API as an OpenAPI 3.1 document (no key needed)."""

    @openapi.operation("This API as an OpenAPI 3.1 document", key=False,
                       responses={200: dict[str, Any]})
    async def get(self, request: web.Request) -> web.Response:
        return self.json(api_document())


#: Swagger UI's files, from the swagger-ui-bundle-v2 package (never a CDN).
SWAGGER = Path(swagger_ui_bundle.swagger_ui_path)
SWAGGER_FILES = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript"}
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>phoneverify API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div><script src="/docs/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""


class Docs(web.View):
    """``GET /docs``: the OpenAPI document in Swagger UI (no key needed to read it; "Try it
    out" asks for the key)."""

    @openapi.operation("This API in Swagger UI", key=False, responses={200: str},
                       media={200: "text/html"})
    async def get(self, request: web.Request) -> web.Response:
        return aioweb.Response(text=DOCS_PAGE, content_type="text/html")


class DocsAsset(web.View):
    """``GET /docs/{name}``: Swagger UI's script and style sheet."""

    @openapi.operation("Swagger UI's files", key=False, responses={200: str, 404: ApiError},
                       path={"name": {"type": "string", "enum": sorted(SWAGGER_FILES)}},
                       media={200: tuple(SWAGGER_FILES.values())})
    async def get(self, request: web.Request, name: str) -> web.Response:
        if name not in SWAGGER_FILES:
            return self.error(404, f"no such file: {name}")
        return aioweb.Response(body=(SWAGGER / name).read_bytes(),
                               content_type=SWAGGER_FILES[name],
                               headers={"Cache-Control": "max-age=86400"})


def api_document() -> dict[str, Any]:
    """The OpenAPI document of every route this worker serves."""
    # Routes registered with route() (Faust replaces "/" in its own map once the worker
    # starts, not in its router), then any registered with app.page elsewhere.
    routes = {**{path: type(view) for path, view in app.web.views.items()}, **ROUTES}
    return openapi.document(routes.items(), title="phoneverify", version=_version(),
                            description=__doc__.split("\n\n")[0])


def _version() -> str:
    try:
        return importlib.metadata.version("phoneverify")
    except importlib.metadata.PackageNotFoundError:
        return "0"


#: A call's final statuses that mean nobody heard the code.
CALL_FAILED = ("no-answer", "busy", "failed", "canceled")


def receipt(callback: TwilioCallback, iid: str,
            command_id: str) -> tuple[SmsSent | SmsFailed | None, str]:
    """The status record a callback stands for, and its metric label: a message's receipt
    (``MessageStatus``) or a call's final status (``CallStatus``: ``completed`` is delivered,
    ``no-answer``, ``busy``, ``failed`` take the same fallback path as an undelivered SMS)."""
    if callback.CallStatus:
        status, sid = callback.CallStatus, callback.CallSid
        if status == "completed":
            return SmsSent(command_id=command_id, instance_id=iid, provider_id=sid,
                           receipt="delivered"), "delivered"
        if status in CALL_FAILED:
            return SmsFailed(command_id=command_id, instance_id=iid, permanent=True,
                             error=f"call status: {status}"), "undelivered"
        return None, ""
    status, sid = callback.MessageStatus, callback.MessageSid
    if status == "delivered":
        return SmsSent(command_id=command_id, instance_id=iid, provider_id=sid,
                       receipt="delivered"), "delivered"
    if status in ("undelivered", "failed"):
        error = callback.ErrorCode or "no error code"
        return SmsFailed(command_id=command_id, instance_id=iid, permanent=True,
                         error=f"twilio receipt: {status} (error {error})"), "undelivered"
    return None, ""


metrics.watch_lag(lambda: app.monitor)


# ---------------------------------------------------------------- routes


@aioweb.middleware
async def json_errors(request: aioweb.Request, handler: Any) -> aioweb.StreamResponse:
    """Every error is ``{"error": ...}``: aiohttp's own (an unknown route, a method the route
    lacks) and an unexpected exception (logged, answered 500) as much as the views'."""
    try:
        return await handler(request)
    except aioweb.HTTPException as error:
        if error.status < 400:
            raise
        allowed = [m for m in error.headers.get("Allow", "").split(",") if m and m != "HEAD"]
        words = {404: f"no such route: {request.path} (see the README for the API's routes)",
                 405: f"{request.method} is not served at {request.path}; allowed: "
                      f"{', '.join(allowed)}"}
        headers = {k: v for k, v in error.headers.items() if k in ("Allow", "Retry-After")}
        return aioweb.json_response({"error": words.get(error.status, error.reason)},
                                    status=error.status, headers=headers, dumps=_compact)
    except Exception:
        log.exception("HTTP API: %s %s failed", request.method, request.path)
        return aioweb.json_response({"error": "internal error (it is in the worker's log)"},
                                    status=500, dumps=_compact)


def _compact(value: Any) -> str:
    """JSON as the views write it (no spaces)."""
    return json.dumps(value, separators=(",", ":"))


app.web.web_app.middlewares.append(json_errors)

API = (
    ("/verifications", Start),
    (f"/orchestrators/{ORCHESTRATOR}", SeedStart),
    ("/verifications/{instance_id}", Status),
    (f"{SEED}/{{instance_id}}", type("SeedStatus", (Status,), {})),
    # The seed-style resend, before the route of any other event (matched in this order).
    (f"/verifications/{{instance_id}}/raiseEvent/{RESEND}",
     type("ResendEvent", (ResendView,), {})),
    (f"{SEED}/{{instance_id}}/raiseEvent/{RESEND}", type("SeedResendEvent", (ResendView,), {})),
    (f"{WEBHOOKS}/{{instance_id}}/raiseEvent/{RESEND}",
     type("WebhookResendEvent", (ResendView,), {})),
    ("/verifications/{instance_id}/raiseEvent/{event_name}", RaiseEvent),
    (f"{SEED}/{{instance_id}}/raiseEvent/{{event_name}}",
     type("SeedRaiseEvent", (RaiseEvent,), {})),
    ("/verifications/{instance_id}/terminate", TerminateView),
    ("/verifications/{instance_id}/resend", ResendView),
    (f"{SEED}/{{instance_id}}/terminate", type("SeedTerminate", (TerminateView,), {})),
    (f"{WEBHOOKS}/{{instance_id}}", type("WebhookStatus", (Status,), {})),
    (f"{WEBHOOKS}/{{instance_id}}/raiseEvent/{{event_name}}",
     type("WebhookRaiseEvent", (RaiseEvent,), {})),
    (f"{WEBHOOKS}/{{instance_id}}/terminate", type("WebhookTerminate", (TerminateView,), {})),
)

#: Every route served here: path -> view (``route`` adds one).
ROUTES: dict[str, type[web.View]] = {}


def route(path: str, view: type[web.View]) -> None:
    """Serve ``view`` at ``path`` (and list it in the OpenAPI document)."""
    ROUTES[path] = view
    app.page(path, name=view.__name__)(view)


for path, view in (
    ("/", Page),
    ("/healthz", Health),
    ("/readyz", Ready),
    ("/metrics", Metrics),
    ("/openapi.json", OpenApi),
    ("/docs", Docs),
    ("/docs/{name}", DocsAsset),
    (RECEIPTS, TwilioReceipt),
    *API,
    # The same API under /api, where Azure Functions serves HTTP triggers by default.
    *((API_PREFIX + path, type(f"Api{view.__name__}", (view,), {})) for path, view in API),
):
    route(path, view)

# The fraud guard's routes for operators (they use the views above).
import phoneverify.interfaces.fraud  # noqa: E402,F401
