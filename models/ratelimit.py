"""The per-phone-number rate limit (contract rule 9) as a pure function over a sliding window."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict

from phoneverify.models.messages import UtcTime

Verdict = Literal["admitted", "rate_limited"]


class Window(BaseModel):
    """The starts admitted for one phone number inside the window: ``(instance_id, time)``."""

    model_config = ConfigDict(frozen=True)

    admitted: tuple[tuple[str, UtcTime], ...] = ()


def admit(window: Window, instance_id: str, at: datetime, limit: int,
          seconds: float) -> tuple[Verdict, Window]:
    """Admit a start unless some window of ``seconds`` holding ``at`` would exceed ``limit``.

    Starts for one number may arrive slightly out of time order (they come from different
    partitions), so a start is checked against every admitted start less than ``seconds``
    before or after it, and entries are kept for twice the window. A start seen before (a
    redelivery) gets its earlier verdict "admitted" again and is not counted twice.
    """
    span = timedelta(seconds=seconds)
    newest = max([at, *(time for _, time in window.admitted)])
    kept = tuple(entry for entry in window.admitted if entry[1] > newest - 2 * span)
    if any(iid == instance_id for iid, _ in kept):
        return "admitted", Window(admitted=kept)
    near = [entry for entry in kept if at - span < entry[1] < at + span]
    if len(near) >= limit:
        return "rate_limited", Window(admitted=kept)
    return "admitted", Window(admitted=(*kept, (instance_id, at)))
