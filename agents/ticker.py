"""The ticker: one tick to every partition each TICK_INTERVAL_SECONDS, from the leader only.

Ticks go to the actor (``verification.tick``: deadlines, held commands, retention), to
admission (``verification.admission``: numbers whose windows emptied), to the fraud guard
(``verification.guard``: deliveries unanswered, blocks that end, windows that empty) and, with
webhooks, to their stage (``verification.webhook-tries``: retries due). A tick carries the
leader's clock. Ticks are idempotent (expiring twice changes nothing), so the double fire
around a rebalance is harmless.
"""

from __future__ import annotations

from datetime import UTC, datetime

from phoneverify.agents.app import app, names, settings
from phoneverify.agents.batch import Outbox
from phoneverify.models.messages import Tick

#: The key of the webhook stage's ticks: no instance id can be it (``#`` is not allowed).
TICK_KEY = b"#tick"


@app.timer(settings.tick_interval_seconds, on_leader=True)
async def ticker() -> None:
    now = datetime.now(UTC)
    outbox = Outbox()
    for partition in range(settings.partitions):
        tick = Tick(partition=partition, now=now).to_bytes()
        await outbox.send(names.tick, b"tick", tick, partition=partition)
        await outbox.send(names.admission, b"tick", tick, partition=partition)
        await outbox.send(names.guard, b"tick", tick, partition=partition)
        if settings.webhook_targets:  # the webhook stage's own ticks (see agents/webhooks.py)
            await outbox.send(names.webhook_tries, TICK_KEY, tick, partition=partition)
    await outbox.flush()
