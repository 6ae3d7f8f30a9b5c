"""Rate limit: at most RATE_LIMIT_STARTS starts per phone number per window (keyed by phone)."""

from __future__ import annotations

from faust.types import StreamT
from pydantic import ValidationError

from phoneverify.agents.app import admitted_topic, app, settings, start_by_phone_topic
from phoneverify.agents.records import dead_letter, describe
from phoneverify.models.messages import Admission, PhoneStart
from phoneverify.models.ratelimit import Window, admit

windows = app.Table("rate-windows", key_type=bytes, value_type=bytes,
                    partitions=settings.partitions)


@app.agent(start_by_phone_topic, concurrency=1)
async def ratelimit(stream: StreamT[bytes]) -> None:
    async for event in stream.events():
        try:
            start = PhoneStart.from_bytes(event.value)
        except ValidationError as error:
            await dead_letter(event, describe(error))
            continue
        phone = start.phone_number.encode()
        stored = windows.get(phone)
        window = Window.model_validate_json(stored) if stored else Window()
        verdict, window = admit(window, start.instance_id, start.requested_at,
                                settings.rate_limit_starts, settings.rate_limit_window_seconds)
        admission = Admission(instance_id=start.instance_id, verdict=verdict,
                              phone_number=start.phone_number if verdict == "admitted" else None,
                              requested_at=start.requested_at)
        await admitted_topic.send(key=start.instance_id.encode(), value=admission.to_bytes())
        windows[phone] = window.model_dump_json().encode()
