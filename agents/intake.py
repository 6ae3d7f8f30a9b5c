"""Intake: parse starts, normalise phone numbers, re-key them by phone number for the limiter."""

from __future__ import annotations

from faust.types import StreamT
from pydantic import ValidationError

from phoneverify.agents.app import admitted_topic, app, settings, start_by_phone_topic, start_topic
from phoneverify.agents.records import dead_letter, describe, record_time
from phoneverify.models.messages import Admission, PhoneStart, StartVerification
from phoneverify.models.phone import InvalidPhoneNumber, normalise


@app.agent(start_topic, concurrency=1)
async def intake(stream: StreamT[bytes]) -> None:
    async for event in stream.events():
        try:
            start = StartVerification.from_bytes(event.value)
        except ValidationError as error:
            await dead_letter(event, describe(error))
            continue
        key = start.instance_id.encode()
        if event.message.key not in (None, key):
            await dead_letter(event, "record key must be the instance_id")
            continue
        at = record_time(event)
        try:
            phone = normalise(start.phone_number, settings.phone_default_region)
        except InvalidPhoneNumber as error:
            await dead_letter(event, f"phone_number: {error}")
            verdict = Admission(instance_id=start.instance_id, verdict="invalid_phone_number",
                                requested_at=at)
            await admitted_topic.send(key=key, value=verdict.to_bytes())
            continue
        forward = PhoneStart(instance_id=start.instance_id, phone_number=phone, requested_at=at)
        await start_by_phone_topic.send(key=phone.encode(), value=forward.to_bytes())
