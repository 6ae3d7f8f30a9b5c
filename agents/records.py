"""Helpers shared by the agents: record time and origin, validation errors, dead letters."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from faust.types import EventT
from pydantic import ValidationError

from phoneverify.agents.app import names
from phoneverify.agents.batch import Outbox
from phoneverify.models.messages import DeadLetter, Tick, explain
from phoneverify.ops import metrics

log = logging.getLogger("phoneverify")

_DIGITS = re.compile(r"[0-9]")


def record_time(event: EventT) -> datetime:
    """The record's timestamp (the broker's clock on input topics) as UTC."""
    return datetime.fromtimestamp(event.message.timestamp, UTC)


#: How far a tick's ``now`` may run ahead of the broker's time of its record (seconds).
TICK_SKEW = 2.0


def tick_time(event: EventT) -> datetime:
    """A tick's time, at most ``TICK_SKEW`` past its record's (broker) time: a tick written
    by someone else cannot expire, forget or prune what is not due yet."""
    latest = record_time(event) + timedelta(seconds=TICK_SKEW)
    return min(Tick.from_bytes(event.message.value).now, latest)


def origin_of(event: EventT) -> str:
    """Where a record sits: ``topic:partition:offset``."""
    message = event.message
    return f"{message.topic}:{message.partition}:{message.offset}"


def describe(error: Exception) -> str:
    """A validation error as ``field: why`` pairs, never echoing the input (it may be a code)."""
    if isinstance(error, ValidationError):
        return explain(error)
    return str(error)  # our own messages; the input is never in them


def redact(topic: str, value: bytes | None) -> bytes | None:
    """The record value with any code removed (responses carry codes; nothing else does)."""
    if value is None or topic not in (names.response, names.rerouted):
        return value
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than json can parse
        parsed = None
    if isinstance(parsed, dict) and "code" in parsed:
        parsed["code"] = "<redacted>"
        return json.dumps(parsed).encode()
    return _DIGITS.sub("#", value.decode("utf-8", "replace")).encode()  # not the expected shape


def letter(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
           error: str, level: int = logging.WARNING) -> DeadLetter:
    """A dead letter for a record (its value redacted), logged as it is made: a WARNING, or
    ``level`` (INFO for a command answered ``unknown``: a person's wrong id, not a fault)."""
    dead = DeadLetter.of(topic, partition, offset, key, redact(topic, value), error)
    log.log(level, "dead letter from %s[%d]@%d: %s", topic, partition, offset, dead.error)
    metrics.dead_letters.labels(topic.removeprefix(names.prefix)).inc()
    return dead


async def dead_letter(outbox: Outbox, event: EventT, error: str) -> None:
    """Send the record to the dead-letter topic with the reason; the stream goes on. A record
    the actor moved to its partition is named as the client wrote it (its origin header)."""
    message = event.message
    topic, partition, offset = message.topic, message.partition, message.offset
    if topic == names.rerouted:
        topic, partition, offset = _origin(message.headers) or (topic, partition, offset)
    dead = letter(topic, partition, offset, message.key, message.value, error)
    await outbox.send(names.dead_letter, message.key, dead.to_bytes())


def _origin(headers: Any) -> tuple[str, int, int] | None:
    """``topic:partition:offset`` from a rerouted record's ``origin`` header, if it has one."""
    try:
        origin = bytes(dict(headers or ())["origin"]).decode()
        topic, partition, offset = origin.rsplit(":", 2)
        return topic, int(partition), int(offset)
    except (KeyError, TypeError, ValueError):
        return None
