"""The per-phone-number rate limit (contract rule 9) as a pure function over a sliding window."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict

from models.messages import UtcTime

Verdict = Literal["admitted", "rate_limited"]


class Window(BaseModel):
    """The starts admitted for one phone number inside the window: ``(instance_id, time)``."""

    model_config = ConfigDict(frozen=True)

    admitted: tuple[tuple[str, UtcTime], ...] = ()


def admit(window: Window, instance_id: str, at: datetime, limit: int,
          seconds: float) -> tuple[Verdict, Window]:
    """Admit a start unless ``limit`` starts were admitted in the ``seconds`` before ``at``.

    A start seen before (a redelivery) gets its earlier verdict "admitted" again and is not
    counted twice.
    """
    since = at - timedelta(seconds=seconds)
    recent = tuple(entry for entry in window.admitted if entry[1] > since)
    if any(iid == instance_id for iid, _ in recent):
        return "admitted", Window(admitted=recent)
    if len(recent) >= limit:
        return "rate_limited", Window(admitted=recent)
    return "admitted", Window(admitted=(*recent, (instance_id, at)))
