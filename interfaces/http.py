"""The seed's HTTP API on the worker's web server (``WEB_PORT``), Durable-Functions style.

    POST /verifications                                       start          -> 202 + URIs
    GET  /verifications/{id}                                  status         -> 200 | 404
    POST /verifications/{id}/raiseEvent/SmsChallengeResponse  send the code  -> 202
    POST /verifications/{id}/terminate?reason=...             terminate      -> 202

Writes are records on the input topics, never table writes: the answer 202 means "accepted
by Kafka". So a status request right after a start may get 404 until the owning worker has
processed the start (usually milliseconds); poll. Status is read from the ``verifications``
table on the worker that owns the instance's partition: ``@app.table_route`` forwards a request
that reaches another worker to the owner. Every request needs ``X-API-Key`` (unless API_KEY is
empty); errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import hmac
import json
import uuid
from typing import Any

import aiohttp
from aiokafka.errors import KafkaError
from faust import web
from faust.types import TP, TopicT
from faust.web import exceptions
from pydantic import ValidationError

from phoneverify.agents.actor import Stored, verifications
from phoneverify.agents.app import app, response_topic, settings, start_topic, terminate_topic
from phoneverify.agents.records import describe, log
from phoneverify.models.messages import (
    INSTANCE_ID,
    Message,
    StartVerification,
    SubmitCode,
    Terminate,
    iso,
)
from phoneverify.models.phone import InvalidPhoneNumber, mask, normalise
from phoneverify.models.verification import Verification

EVENT = "SmsChallengeResponse"


class BadRequest(exceptions.WebError):
    code = 400
    detail = "bad request"


class Unavailable(exceptions.WebError):
    code = 503
    detail = "service unavailable; retry"


class ApiView(web.View):
    """Checks the API key, and the instance id in the path, before any handler (or routing)."""

    async def dispatch(self, request: Any) -> Any:
        if not _authorised(request.headers.get("X-API-Key", "")):
            return self.error(401, "missing or wrong X-API-Key header")
        iid = request.match_info.get("instance_id")
        if iid is not None and not INSTANCE_ID.fullmatch(iid):
            return self.error(400, "instance id in the path: use 1 to 64 characters of "
                                   "A-Z a-z 0-9 . _ -")
        return await super().dispatch(request)


def _authorised(given: str) -> bool:
    expected = settings.api_key_value
    return not expected or hmac.compare_digest(given.encode(errors="replace"),
                                            expected.encode())


@app.page("/verifications", name="verifications")
class Verifications(ApiView):
    async def post(self, request: web.Request) -> web.Response:
        """Start: body a JSON string (the phone number) or {"phone_number", "instance_id"?}."""
        body = await _json_body(request)
        if isinstance(body, str):
            body = {"phone_number": body}
        if not isinstance(body, dict):
            raise BadRequest('body must be a JSON string (the phone number) or an object '
                             '{"phone_number": ..., "instance_id": ...}')
        fields = {name: body[name] for name in ("phone_number", "instance_id") if name in body}
        if fields.get("instance_id") is None:
            fields["instance_id"] = uuid.uuid4().hex
        if not isinstance(fields["instance_id"], str) or not INSTANCE_ID.fullmatch(
                fields["instance_id"]):
            raise BadRequest("instance_id: use 1 to 64 characters of A-Z a-z 0-9 . _ -")
        start = _message(StartVerification, **fields)
        iid = start.instance_id
        try:
            phone = normalise(start.phone_number, settings.phone_default_region)
        except InvalidPhoneNumber as error:
            raise BadRequest(f"phone_number: {error}") from None
        await _send(start_topic, StartVerification(instance_id=iid, phone_number=phone))
        uris = _uris(request, iid)
        return self.json(uris, status=202, headers={"Location": uris["statusQueryGetUri"]})


@app.page("/verifications/{instance_id}", name="verification")
class Status(ApiView):
    async def get(self, request: web.Request, instance_id: str) -> web.Response:
        """Status, answered by the owner of the instance's partition (routed there if need be)."""
        try:
            return await self.owned(request, instance_id)
        except aiohttp.ClientError as error:
            log.warning("HTTP API: routing the status of %s failed: %r", instance_id, error)
            raise Unavailable("the worker that owns this verification did not answer; "
                              "retry") from None

    @app.table_route(table=verifications, match_info="instance_id")
    async def owned(self, request: web.Request, instance_id: str) -> web.Response:
        raw = verifications.get(instance_id.encode())
        if raw is None:
            raise exceptions.NotFound(f"no verification {instance_id} (a start that was just "
                                      "accepted shows here once it has been processed)")
        stored = Stored.model_validate_json(raw)
        if not app.assignor.is_active(TP(verifications.changelog_topic.get_topic_name(),
                                         stored.partition)):
            raise Unavailable("this worker does not own the verification now (rebalancing); "
                              "retry")
        return self.json(status_of(stored.state))


@app.page(f"/verifications/{{instance_id}}/raiseEvent/{EVENT}", name="raise-event")
class RaiseEvent(ApiView):
    async def post(self, request: web.Request, instance_id: str) -> web.Response:
        """The code: a JSON string of digits, or a JSON number (left-padded to the code length)."""
        body = await _json_body(request)
        if isinstance(body, int) and not isinstance(body, bool) and body >= 0:
            body = str(body).zfill(settings.verification_code_length)
        if not isinstance(body, str) or not (body.isascii() and body.isdigit()):
            raise BadRequest("code: the body must be the code, a JSON string of digits "
                             "(\"0042\") or a non-negative JSON integer")
        await _send(response_topic, _message(SubmitCode, instance_id=instance_id, code=body))
        return self.json({"id": instance_id}, status=202)


@app.page("/verifications/{instance_id}/terminate", name="terminate")
class TerminateView(ApiView):
    async def post(self, request: web.Request, instance_id: str) -> web.Response:
        """Terminate, with ``?reason=`` (optional, up to 500 characters)."""
        reason = request.query.get("reason", "")
        await _send(terminate_topic, _message(Terminate, instance_id=instance_id, reason=reason))
        return self.json({"id": instance_id}, status=202)


# ---------------------------------------------------------------- helpers


def status_of(state: Verification) -> dict[str, Any]:
    """The status document: never the code nor its hash."""
    runtime = {"pending": "Running" if state.sms == "delivered" else "Pending",
               "verified": "Completed", "failed": "Completed",
               "terminated": "Terminated"}.get(state.status, "Pending")
    return {
        "instanceId": state.instance_id,
        "runtimeStatus": runtime,
        "input": mask(state.phone_number),
        "output": None if not state.is_final else state.status == "verified",
        "createdTime": _iso(state.created_at),
        "lastUpdatedTime": _iso(state.updated_at),
        "attempts": state.attempts,
        "attemptsLeft": max(state.max_attempts - state.attempts, 0),
        "deadline": _iso(state.deadline),
        "reason": state.reason,
        **({"terminateReason": state.detail} if state.status == "terminated" else {}),
    }


def _iso(value: Any) -> str | None:
    return None if value is None else iso(value)


def _uris(request: web.Request, iid: str) -> dict[str, str]:
    base = f"{request.url.origin()}/verifications/{iid}"
    return {"id": iid, "statusQueryGetUri": base,
            "sendEventPostUri": f"{base}/raiseEvent/{EVENT}",
            "terminatePostUri": f"{base}/terminate?reason={{text}}"}


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except ValueError:
        raise BadRequest("body is not valid JSON") from None


def _message(model: type[Message], **fields: Any) -> Any:
    try:
        return model(**fields)
    except ValidationError as error:
        raise BadRequest(describe(error)) from None


async def _send(topic: TopicT, message: Any) -> None:
    """Write one command, keyed by its instance id; returns once Kafka has acknowledged it."""
    try:
        sent = await topic.send(key=message.instance_id.encode(), value=message.to_bytes())
        await sent
    except KafkaError as error:
        log.warning("HTTP API: could not write to %s: %r", topic.get_topic_name(), error)
        raise Unavailable("could not write to Kafka; retry") from None
