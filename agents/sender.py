"""The SMS sender: delivers SMS commands through the configured backend, reports each result.

Idempotent by ``command_id``: the ``sms-sent`` table (keyed by instance id, as the topic)
remembers what was sent, so a redelivered command sends nothing twice. Commands are taken in
batches and sent concurrently.
"""

from __future__ import annotations

import asyncio

from faust.types import StreamT
from pydantic import ValidationError

from phoneverify.agents.app import app, settings, sms_status_topic, sms_topic
from phoneverify.agents.records import dead_letter, describe, log
from phoneverify.models.messages import SendSms, SmsFailed, SmsSent
from phoneverify.sms import backend_from, send_with_retry

BATCH = 256

sent = app.Table("sms-sent", key_type=bytes, value_type=bytes, partitions=settings.partitions,
                 use_partitioner=True)
backend = backend_from(settings)


@app.agent(sms_topic, concurrency=1)
async def sender(stream: StreamT[bytes]) -> None:
    async for batch in stream.take_events(BATCH, within=0.01):
        commands: dict[str, SendSms] = {}  # by command_id: a batch may hold a redelivery too
        for event in batch:
            try:
                command = SendSms.from_bytes(event.value)
            except ValidationError as error:
                await dead_letter(event, describe(error))
                continue
            if sent.get(command.instance_id.encode()) != command.command_id.encode():
                commands[command.command_id] = command
        results = await asyncio.gather(
            *(send_with_retry(backend, c.to, c.body) for c in commands.values()))
        for command, delivery in zip(commands.values(), results, strict=True):
            key = command.instance_id.encode()
            if delivery.ok:
                status = SmsSent(command_id=command.command_id, instance_id=command.instance_id,
                                 provider_id=delivery.provider_id)
            else:
                log.warning("SMS %s not delivered: %s", command.command_id, delivery.error)
                status = SmsFailed(command_id=command.command_id, instance_id=command.instance_id,
                                   error=delivery.error, permanent=delivery.permanent)
            await sms_status_topic.send(key=key, value=status.to_bytes())
            sent[key] = command.command_id.encode()

