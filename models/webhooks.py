"""Outcome webhooks, pure: the signature, and what is pending for one outcome (rule 21).

Every outcome is POSTed to each webhook URL; a try that fails (not 2xx, a timeout, a refused
connection) is tried again after a gap that starts at ``base`` seconds and doubles, at most
:data:`MAX_GAP` apart, until ``max_age`` seconds after the outcome; then it is given up.
:class:`Pending` is that state for one outcome (a table value of the webhook stage, keyed by
the instance id); the functions here decide, the stage sends.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

from pydantic import BaseModel, ConfigDict

#: Longest gap between two tries of one URL (seconds).
MAX_GAP = 600.0


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``Phoneverify-Signature`` header: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of
    "<t>.<body>" under the secret>``."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class Target(BaseModel):
    """One URL not yet delivered to: tries so far, and when the next is due (epoch s)."""

    model_config = ConfigDict(frozen=True)

    tries: int = 0
    due: float
    last_error: str = ""


class Pending(BaseModel):
    """An outcome not yet delivered to every URL."""

    model_config = ConfigDict(frozen=True)

    instance_id: str
    body: str  # the outcome as published: the exact bytes POSTed (UTF-8)
    at: float  # when the outcome was published (its record's time)
    origin: tuple[str, int, int]  # its topic, partition, offset (for the dead letter)
    targets: dict[str, Target]

    @property
    def next_due(self) -> float | None:
        return min((t.due for t in self.targets.values()), default=None)


def pending(instance_id: str, body: str, at: float, origin: tuple[str, int, int],
            urls: tuple[str, ...]) -> Pending:
    """A new outcome: every URL is due at once."""
    return Pending(instance_id=instance_id, body=body, at=at, origin=origin,
                   targets={url: Target(due=at) for url in urls})


Result = Literal["delivered", "retry", "given_up", "stale"]


def tried(state: Pending, url: str, attempt: int, ok: bool, error: str, now: float,
          base: float, max_age: float) -> tuple[Pending, Result]:
    """Fold in the result of try number ``attempt`` (1-based) of ``url`` that ended at
    ``now``: delivered (the URL is done), given up (its age is past ``max_age``, or its next
    try would be), or due again after the gap. A result for another try than the last one
    started (a copy after a crash or a move) changes nothing, unless it was a delivery."""
    target = state.targets.get(url)
    if target is None:
        return state, "stale"
    if ok:
        return _without(state, url), "delivered"
    if attempt != target.tries + 1:
        return state, "stale"
    gap = min(base * 2 ** (attempt - 1), MAX_GAP)
    if now + gap > state.at + max_age:
        return _without(state, url), "given_up"
    again = Target(tries=attempt, due=now + gap, last_error=error)
    return state.model_copy(update={"targets": {**state.targets, url: again}}), "retry"


def due(state: Pending, now: float) -> list[tuple[str, int]]:
    """The URLs whose next try is due at ``now``, each with that try's number."""
    return [(url, t.tries + 1) for url, t in state.targets.items() if t.due <= now]


def _without(state: Pending, url: str) -> Pending:
    return state.model_copy(update={"targets": {u: t for u, t in state.targets.items()
                                                if u != url}})
