"""The ticker: one tick to every partition each TICK_INTERVAL_SECONDS, from the leader only.

A tick carries the leader's clock; the actor expires what is due by it. Ticks are idempotent
(expiring twice changes nothing), so the double fire around a rebalance is harmless.
"""

from __future__ import annotations

from datetime import UTC, datetime

from phoneverify.agents.app import app, settings, tick_topic
from phoneverify.models.messages import Tick


@app.timer(settings.tick_interval_seconds, on_leader=True)
async def ticker() -> None:
    now = datetime.now(UTC)
    for partition in range(settings.partitions):
        tick = Tick(partition=partition, now=now)
        await tick_topic.send(key=b"tick", value=tick.to_bytes(), partition=partition)
