"""The sender: delivers each delivery command (sms, whatsapp, call) through the configured
backend, reports each result.

Idempotent by ``command_id``: the ``sms-sent`` table (keyed by instance id, as the topic)
keeps the status each of the verification's commands got (a resend or a fallback is a command
of its own), so a command delivered again is not sent twice: its recorded status is reported
again instead. Commands are taken in batches and sent
concurrently. The actor deletes an entry when it forgets the verification.
"""

from __future__ import annotations

import asyncio
import json
import time

from faust.types import EventT, StreamT
from pydantic import ValidationError

from phoneverify.agents import fence
from phoneverify.agents.app import app, names, settings, sms_topic
from phoneverify.agents.batch import Outbox, aggregate_table, batches, guarded
from phoneverify.agents.records import dead_letter, describe, log
from phoneverify.delivery import Delivery, backend_from, send_with_retry
from phoneverify.models.messages import SendSms, SmsFailed, SmsSent
from phoneverify.ops import metrics

sent = aggregate_table("sms-sent")
backend = backend_from(settings)


@app.agent(sms_topic, concurrency=1)
async def sender(stream: StreamT[bytes]) -> None:
    async for batch in batches(stream):
        await guarded("sender", handle(batch))


async def handle(batch: list[EventT]) -> None:
    outbox = Outbox()
    commands: dict[str, tuple[SendSms, int]] = {}  # by command_id: a batch may repeat one
    written: dict[bytes, tuple[int, bytes | None]] = {}
    for event in batch:
        try:
            command = SendSms.from_bytes(event.value)
        except (ValidationError, ValueError, OverflowError) as error:
            await dead_letter(outbox, event, describe(error))
            continue
        key, partition = command.instance_id.encode(), event.message.partition
        recorded = _recorded(written.get(key, (partition, sent.read(key, partition)))[1])
        if command.command_id in recorded:
            status_bytes = recorded[command.command_id].encode()
            await outbox.send(names.sms_status, key, status_bytes, partition=partition)
            continue
        commands[command.command_id] = (command, partition)
    deliveries = await asyncio.gather(*(timed(c) for c, _ in commands.values()))
    for (command, partition), delivery in zip(commands.values(), deliveries, strict=True):
        metrics.sms.labels("sent" if delivery.ok else "failed").inc()
        metrics.deliveries.labels(command.channel, "sent" if delivery.ok else "failed").inc()
        if delivery.ok:
            status: SmsSent | SmsFailed = SmsSent(
                command_id=command.command_id, instance_id=command.instance_id,
                provider_id=delivery.provider_id)
        else:
            log.warning("%s %s not delivered: %s", command.channel, command.command_id,
                        delivery.error)
            status = SmsFailed(command_id=command.command_id,
                               instance_id=command.instance_id, error=delivery.error,
                               permanent=delivery.permanent)
        key = command.instance_id.encode()
        await outbox.send(names.sms_status, key, status.to_bytes(), partition=partition)
        recorded = _recorded(written.get(key, (partition, sent.read(key, partition)))[1])
        recorded[command.command_id] = status.model_dump_json()
        written[key] = (partition, json.dumps(recorded).encode())
    await outbox.flush()
    await sent.write(written)



async def timed(command: SendSms) -> Delivery:
    began = time.perf_counter()
    try:
        return await send_with_retry(backend, command.to, command.body,
                                     instance_id=command.instance_id,
                                     command_id=command.command_id, channel=command.channel,
                                     locale=_language(command),
                                     before_each=fence.check)
    finally:
        metrics.sms_send.observe(time.perf_counter() - began)


def _language(command: SendSms) -> str | None:
    """The delivery's language: a call's is its template's voice (``fr-FR``, what Twilio's
    ``<Say language=...>`` takes; TEMPLATES_DIR may change it), a message's its locale."""
    if command.channel == "call":
        return settings.templates.get(command.locale, settings.locale).voice
    return command.locale


def _recorded(raw: bytes | None) -> dict[str, str]:
    """The statuses recorded for one verification's commands, by command id (a value of the
    first round is one status on its own)."""
    if raw is None:
        return {}
    value = json.loads(raw)
    if "type" in value:
        return {value["command_id"]: raw.decode()}
    return value
