"""The fraud guard's blocks over HTTP, for operators (rule 20).

    GET    /fraud/blocks        the blocks in force                          -> 200
    POST   /fraud/blocks        {"key": "+44740012" or "GB", "seconds": N}   -> 201 | 400
    DELETE /fraud/blocks/{key}  lift a block                                 -> 204 | 400 | 404

With the API key, as every API route. A block or unblock is a ``FraudBlock`` record on
``verification.fraud``: every worker reads it, the guard's stage too. A request that fails
validation changes nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import phonenumbers
from aiohttp import web as aioweb
from faust import web
from pydantic import BaseModel, Field

from phoneverify.agents.app import app, names, settings
from phoneverify.agents.fraud import blocks
from phoneverify.interfaces import openapi
from phoneverify.interfaces.bodies import ApiError
from phoneverify.interfaces.http import ApiView, HttpError, _json_body
from phoneverify.models import fraud
from phoneverify.models.fraud import FraudBlock
from phoneverify.topics import partition_for

#: A key as the API takes it: an E.164 prefix, or a region libphonenumber knows.
KEY_PATTERN = (r"^(\+[0-9]{1,14}|"
               + "|".join(sorted(phonenumbers.SUPPORTED_REGIONS)) + ")$")


class BlockRequest(BaseModel):
    """An operator's block."""

    key: str = Field(pattern=KEY_PATTERN, description="an E.164 prefix (+44740012: the "
                     "numbers starting so) or an ISO region code (GB)", examples=["+44740012"])
    seconds: float = Field(gt=0, le=fraud.MAX_BLOCK_SECONDS, description="how long, at most a "
                           "year", examples=[3600])


class BlockDocument(BaseModel):
    """A block in force."""

    level: str = Field(description="prefix or country")
    key: str
    blocked_until: str = Field(description="ISO-8601 UTC")
    by: str = Field(description="guard or operator")
    judged: int = Field(description="judged deliveries in the window when it was made")
    converted: int = Field(description="of which converted")
    at: str = Field(description="when it was made, ISO-8601 UTC")


KEY_PATH = {"key": {"type": "string", "pattern": KEY_PATTERN, "examples": ["GB"],
                    "description": "an E.164 prefix (+ as %2B) or an ISO region code"}}


def _document(block: FraudBlock) -> dict[str, Any]:
    return block.model_dump(mode="json", include={"level", "key", "blocked_until", "by",
                                                  "judged", "converted", "at"})


async def _publish(record: FraudBlock) -> None:
    key = record.key.encode()
    sent = await app.producer.send(names.fraud, key, record.to_bytes(),
                                   partition_for(key, settings.partitions), None, None)
    await sent
    blocks.records[record.key] = record  # this worker answers with it at once


class Blocks(ApiView):
    """``GET``: the blocks in force; ``POST {"key", "seconds"}``: block for that long."""

    @openapi.operation("The fraud guard's blocks in force (SMS pumping)", tags=("fraud",),
                       responses={200: list[BlockDocument]})
    async def get(self, request: web.Request) -> web.Response:
        return self.json([_document(block) for block in blocks.in_force()])

    @openapi.operation("Block a prefix or a country: starts and resends to it are refused",
                       tags=("fraud",), body=BlockRequest,
                       responses={201: BlockDocument, 400: ApiError})
    async def post(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body, dict) or "key" not in body or "seconds" not in body:
            raise HttpError(400, 'the body must be {"key": "+44740012" (an E.164 prefix) or '
                                 '"GB" (an ISO region), "seconds": 3600}')
        try:
            record = fraud.operator_block(body["key"], body["seconds"], datetime.now(UTC),
                                          settings.fraud_policy)
        except ValueError as error:
            raise HttpError(400, str(error)) from None
        await _publish(record)
        return self.json(_document(record), status=201)


class Block(ApiView):
    """``DELETE``: lift the block of ``key`` (404 when none is in force)."""

    @openapi.operation("Lift a block", tags=("fraud",), path=KEY_PATH,
                       responses={204: None, 400: ApiError, 404: ApiError})
    async def delete(self, request: web.Request, key: str) -> web.Response:
        try:
            record = fraud.operator_unblock(key, datetime.now(UTC))
        except ValueError as error:
            raise HttpError(400, str(error)) from None
        if record.key not in {block.key for block in blocks.in_force()}:
            raise HttpError(404, f"no fraud block is in force for {record.key}; nothing "
                                 "changed")
        await _publish(record)
        return aioweb.Response(status=204)


app.page("/fraud/blocks", name="FraudBlocks")(Blocks)
app.page("/fraud/blocks/{key}", name="FraudBlock")(Block)
