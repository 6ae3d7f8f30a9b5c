"""Intake: parse starts, apply the number policy and the fraud guard's blocks, choose the
locale, re-key admissible ones by number (or, when they carry a client address, by that
address first).

Stateless, so it does not care which partition a start was written to. An invalid or blocked
number (by the policy, or by a fraud block in force) is refused here: the verdict goes
straight to the actor (which answers and publishes the outcome, since the instance id is
known). An invalid number is a person's typo, not a record that cannot be read: it gets its
answer and an INFO line, not a dead letter (rule 7).
"""

from __future__ import annotations

import logging

from faust.types import EventT, StreamT
from pydantic import ValidationError

from phoneverify.agents.app import app, names, settings, start_topic
from phoneverify.agents.batch import Outbox, batches, guarded
from phoneverify.agents.fraud import ADDRESS, refused
from phoneverify.agents.records import dead_letter, describe, origin_of, record_time
from phoneverify.models.locale import choose
from phoneverify.models.messages import Admission, PhoneStart, StartVerification
from phoneverify.models.phone import BlockedNumber, InvalidPhoneNumber, reachable, region_of
from phoneverify.models.verification import auto_channel, available
from phoneverify.topics import partition_for

log = logging.getLogger("phoneverify")


@app.agent(start_topic, concurrency=1)
async def intake(stream: StreamT[bytes]) -> None:
    async for batch in batches(stream):
        await guarded("intake", handle(batch))


async def handle(batch: list[EventT]) -> None:
    outbox = Outbox()
    for event in batch:
        await take(outbox, event)
    await outbox.flush()


async def take(outbox: Outbox, event: EventT) -> None:
    try:
        start = StartVerification.from_bytes(event.value)
    except (ValidationError, ValueError, OverflowError) as error:
        await dead_letter(outbox, event, describe(error))
        return
    key = start.instance_id.encode()
    if event.message.key != key:
        await dead_letter(outbox, event, "record key must be the instance_id (UTF-8)")
        return
    at, origin = record_time(event), origin_of(event)
    policies = {channel: settings.call_policy if channel == "call" else settings.number_policy
                for channel in settings.offered_channels}
    try:
        phone, channels = reachable(start.phone_number, settings.phone_default_region,
                                    policies)
        pumping = refused(phone, at)
        if pumping is not None:
            raise BlockedNumber(pumping)
    except (InvalidPhoneNumber, BlockedNumber) as error:
        log.info("start %s refused: %s", start.instance_id, error)  # never the number
        verdict = Admission(
            instance_id=start.instance_id, requested_at=at, origin=origin,
            request_id=start.request_id, detail=str(error),
            verdict="invalid_phone_number" if isinstance(error, InvalidPhoneNumber)
            else "blocked_number")
        await outbox.send(names.admitted, key, verdict.to_bytes(),
                          partition=partition_for(key, settings.partitions))
        return
    wanted = start.channel or "sms"
    channel = auto_channel(channels) if wanted == "auto" else wanted
    if channel not in channels:
        why = ("is not offered here" if channel not in settings.offered_channels
               else "cannot reach this number")
        verdict = Admission(instance_id=start.instance_id, requested_at=at, origin=origin,
                            request_id=start.request_id, verdict="channel_unavailable",
                            detail=f"{wanted} {why}; {available(channels)}")
        await outbox.send(names.admitted, key, verdict.to_bytes(),
                          partition=partition_for(key, settings.partitions))
        return
    # Rule 18: its locale, decided once, here; kept with the verification from now on.
    locale = choose(settings.templates.locales, settings.locale, start.locale,
                    start.accept_language, region_of(phone))
    forward = PhoneStart(instance_id=start.instance_id, phone_number=phone, requested_at=at,
                         origin=origin, request_id=start.request_id, locale=locale,
                         client_ip=start.client_ip, channel=channel, channels=channels)
    if start.client_ip is not None and settings.http_starts_per_ip:
        # First the limit per client address, in the fraud guard's stage (by address).
        await outbox.send(names.guard, (ADDRESS + start.client_ip).encode(), forward.to_bytes())
        return
    await outbox.send(names.admission, phone.encode(), forward.to_bytes())
