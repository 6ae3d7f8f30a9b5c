"""Helpers shared by the agents: record time, validation errors, dead letters."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

from faust.types import EventT
from pydantic import ValidationError

from phoneverify.agents.app import dead_letter_topic, names
from phoneverify.models.messages import DeadLetter, explain

log = logging.getLogger("phoneverify")

_DIGITS = re.compile(r"[0-9]")


def record_time(event: EventT) -> datetime:
    """The record's timestamp (the broker's clock on input topics) as UTC."""
    return datetime.fromtimestamp(event.message.timestamp, UTC)


def describe(error: Exception) -> str:
    """A validation error as ``field: why`` pairs, never echoing the input (it may be a code)."""
    if isinstance(error, ValidationError):
        return explain(error)
    return str(error)  # our own messages; the input is never in them


def redact(topic: str, value: bytes | None) -> bytes | None:
    """The record value with any code removed (responses carry codes; nothing else does)."""
    if value is None or topic != names.response:
        return value
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "code" in parsed:
        parsed["code"] = "<redacted>"
        return json.dumps(parsed).encode()
    return _DIGITS.sub("#", value.decode("utf-8", "replace")).encode()  # not the expected shape


async def dead_letter(event: EventT, error: str) -> None:
    """Send the record to the dead-letter topic with the reason, and log it; the stream goes on."""
    message = event.message
    letter = DeadLetter.of(message.topic, message.partition, message.offset, message.key,
                           redact(message.topic, message.value), error)
    log.warning("dead letter from %s[%d]@%d: %s", message.topic, message.partition,
                message.offset, letter.error)
    await dead_letter_topic.send(key=message.key, value=letter.to_bytes())
