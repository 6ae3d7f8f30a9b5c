"""The async Python client: start a verification, submit a code, terminate, wait for outcomes.

It talks to Kafka only (the topics of the wire contract, ``TOPIC_PREFIX`` honoured), through an
idempotent producer (``acks="all"``), keyed by the instance id. Each command carries a new
``request_id`` and returns once the service has decided on it, with its ``Reply``::

    async with VerificationClient() as client:          # settings from the environment
        started = await client.start("+1 425-555-0134")  # raises if refused (see below)
        reply = await client.submit_code(started.instance_id, "0042")  # leading zeros count
        print(reply.result, reply.attempts_left)        # verified | wrong_code | ...
        outcome = await client.wait_for_outcome(started.instance_id, timeout=120)
        again = await client.resend(started.instance_id, channel="call")  # the same code


    async with VerificationClient() as client, client.outcomes() as stream:
        async for outcome in stream:                    # every outcome from now on
            ...

Refusals raise :class:`Refused` subclasses (:class:`InstanceIdInUse`, :class:`RateLimited`,
:class:`InvalidPhoneNumber`, :class:`BlockedNumber`, :class:`ChannelUnavailable`,
:class:`UnknownVerification`, and for a resend :class:`VerificationEnded`), each with its
``reply``. No answer in time raises :class:`ReplyTimeout`: the command may still take
effect. ``send_start``, ``send_code`` and ``send_terminate`` send without waiting.
Input is checked here, before anything is sent (:class:`InvalidInput`); the service checks it
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError
from pydantic import ValidationError

from phoneverify.models import fraud, phone
from phoneverify.models.fraud import FraudBlock
from phoneverify.models.messages import (
    INSTANCE_ID,
    ChannelChoice,
    Message,
    Outcome,
    Reply,
    ResendCode,
    StartVerification,
    SubmitCode,
    Terminate,
    explain,
)
from phoneverify.models.webhooks import signature as webhook_signature
from phoneverify.settings import Settings
from phoneverify.topics import Names, partition_for

log = logging.getLogger("phoneverify.client")
_M = TypeVar("_M", bound=Message)


class VerificationError(Exception):
    """Base of the client's errors."""


class InvalidInput(VerificationError, ValueError):
    """An argument is not valid (instance id, phone number, code, reason); nothing was sent."""


class Refused(VerificationError):
    """The service decided against the command; ``reply`` says how things stand."""

    def __init__(self, message: str, reply: Reply) -> None:
        super().__init__(message)
        self.reply = reply


class InstanceIdInUse(Refused):
    """A start with an instance id already in use: nothing was sent."""


class RateLimited(Refused):
    """Too many starts (or wrong codes) for this number lately; ``retry_after`` seconds."""

    @property
    def retry_after(self) -> float | None:
        return self.reply.retry_after


class InvalidPhoneNumber(Refused):
    """The service holds the number invalid (libphonenumber); no SMS."""


class BlockedNumber(Refused):
    """A valid number this service does not send SMS to (its region or type); no SMS."""


class UnknownVerification(Refused):
    """No verification with this id started (in time): nothing changed."""


class NotBlocked(VerificationError, LookupError):
    """No fraud block is in force for this key: nothing was unblocked."""


class ChannelUnavailable(Refused):
    """The channel asked for is not offered, or cannot reach this number; nothing was sent.
    ``reply.detail`` names the channels that would work."""


class VerificationEnded(Refused):
    """A resend for a verification that had already concluded: nothing was sent."""


class ReplyTimeout(VerificationError, TimeoutError):
    """No reply in time: the command is in Kafka and may still take effect."""


class OutcomeTimeout(VerificationError, TimeoutError):
    """No outcome arrived in time (the verification may still be running)."""


class KafkaUnavailable(VerificationError, ConnectionError):
    """Kafka could not be reached, or the deployment's topics do not exist."""


class WebhookSignatureError(VerificationError, ValueError):
    """A webhook's ``Phoneverify-Signature`` does not match its body and secret, is
    malformed, or is older than the tolerance: do not trust the request."""


def verify_webhook(body: bytes | str, signature: str, secret: bytes | str,
                   tolerance_seconds: float = 300, now: float | None = None) -> Outcome:
    """Check an outcome webhook and return its :class:`Outcome`.

    ``body`` is the request's raw body (the bytes as received, before any JSON parsing),
    ``signature`` its ``Phoneverify-Signature`` header (``t=<unix s>,v1=<hex HMAC-SHA256 of
    "<t>.<body>">``), ``secret`` the service's ``WEBHOOK_SECRET``. Raises
    :class:`WebhookSignatureError` when the signature does not match or its time is more
    than ``tolerance_seconds`` from now (a replay). Compared in constant time.
    """
    raw = body.encode() if isinstance(body, str) else bytes(body)
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    fields: dict[str, list[str]] = {}
    for part in (signature or "").split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        stamp = int(fields["t"][0])
    except (KeyError, ValueError):
        raise WebhookSignatureError("Phoneverify-Signature has no t=<unix seconds>") from None
    expected = webhook_signature(key, stamp, raw).rsplit("v1=", 1)[1]
    if not any(hmac.compare_digest(expected.encode(), given.encode(errors="replace"))
               for given in fields.get("v1", [])):
        raise WebhookSignatureError("Phoneverify-Signature does not match the body and "
                                    "secret")
    age = (time.time() if now is None else now) - stamp
    if abs(age) > tolerance_seconds:
        raise WebhookSignatureError(f"Phoneverify-Signature is {age:.0f} s old, more than "
                                    f"the {tolerance_seconds:g} s tolerated (a replay?)")
    try:
        return Outcome.model_validate_json(raw)
    except ValidationError as error:
        raise WebhookSignatureError(f"signed, but not an outcome: {explain(error)}") from None


_REFUSALS: dict[str, type[Refused]] = {
    "duplicate": InstanceIdInUse, "rate_limited": RateLimited,
    "invalid_phone_number": InvalidPhoneNumber, "blocked_number": BlockedNumber,
    "unknown": UnknownVerification, "channel_unavailable": ChannelUnavailable,
}


def _validated(model: type[Message], **fields: Any) -> Any:
    try:
        return model(**fields)
    except ValidationError as error:
        raise InvalidInput(explain(error)) from None


def check_instance_id(instance_id: str) -> str:
    """The instance id if it is valid (1 to 64 of ``A-Z a-z 0-9 . _ -``), else InvalidInput."""
    if not isinstance(instance_id, str) or not INSTANCE_ID.fullmatch(instance_id):
        raise InvalidInput(f"instance id {instance_id!r} is not valid: use 1 to 64 characters "
                           "of A-Z a-z 0-9 . _ -")
    return instance_id


def explain_refusal(reply: Reply) -> str:
    """A refusal in words a person understands."""
    iid = reply.instance_id
    match reply.result:
        case "duplicate":
            return f"the id {iid} is already in use (status {reply.status}); no SMS was sent"
        case "rate_limited" if reply.command == "resend":
            wait = ("no resend is left" if reply.retry_after is None
                    else f"retry in {max(1, math.ceil(reply.retry_after))} s")
            why = f" ({reply.detail})" if reply.detail else ""
            return f"not resent{why}: {wait}; nothing was sent"
        case "rate_limited":
            wait = ("" if reply.retry_after is None
                    else f"; retry in {max(1, math.ceil(reply.retry_after))} s")  # as Retry-After
            why = reply.detail or "too many verifications for this number lately"
            return f"{why}{wait}; no SMS was sent"
        case "channel_unavailable":
            return f"{reply.detail or 'that channel is not available'}; nothing was sent"
        case "ended":
            return (f"verification {iid} had already concluded ({reply.status}); "
                    "nothing was sent")
        case "invalid_phone_number":
            return f"{reply.detail or 'not a valid phone number'}; no SMS was sent"
        case "blocked_number":
            return f"{reply.detail or 'this number is not served here'}; no SMS was sent"
        case "unknown":
            return f"no verification {iid} has started (check the id); nothing changed"
    return f"{reply.command} of {iid}: {reply.result}"


class VerificationClient:
    """A client of one deployment (bootstrap servers and topic prefix from Settings or given)."""

    def __init__(self, bootstrap_servers: str | None = None, *,
                 topic_prefix: str | None = None, settings: Settings | None = None,
                 request_timeout: float = 30.0, reply_timeout: float = 30.0) -> None:
        self.settings = settings or Settings()
        self.bootstrap_servers = bootstrap_servers or self.settings.kafka_bootstrap_servers
        self.names = Names(self.settings.topic_prefix if topic_prefix is None else topic_prefix)
        self.request_timeout = request_timeout
        #: Default wait for a reply (the service answers a response for an unknown id only
        #: after EARLY_COMMAND_GRACE_SECONDS, 10 s by default).
        self.reply_timeout = reply_timeout
        self._producer: AIOKafkaProducer | None = None
        self._replies: _Replies | None = None
        self._streams: set[OutcomeStream] = set()

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> VerificationClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Start the producer; raises KafkaUnavailable if Kafka cannot be reached."""
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers, enable_idempotence=True, acks="all",
            request_timeout_ms=int(self.request_timeout * 1000), client_id="phoneverify-client")
        try:
            await producer.start()
        except KafkaError as error:
            await producer.stop()
            raise KafkaUnavailable(f"cannot reach Kafka at {self.bootstrap_servers}: "
                                   f"{error}") from None
        self._producer = producer

    async def close(self) -> None:
        for stream in list(self._streams):
            await stream.aclose()
        if self._replies is not None:
            replies, self._replies = self._replies, None
            await replies.close()
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    # ------------------------------------------------------------ commands, answered

    async def start(self, phone_number: str, instance_id: str | None = None, *,
                    locale: str | None = None, accept_language: str | None = None,
                    timeout: float | None = None, client_ip: str | None = None,
                    channel: ChannelChoice | None = None) -> Reply:
        """Start a verification of ``phone_number``; returns once it is started.

        The reply has the ``instance_id`` (a new UUID4 hex if none is given), the
        ``deadline``, ``attempts_left`` and the ``locale`` of its messages. The number may be
        in any form a person types (without a country code it is read in
        ``PHONE_DEFAULT_REGION``). ``locale`` (BCP 47: ``fr``, ``pt-BR``) chooses the
        language, else ``accept_language`` (an ``Accept-Language`` header), else the number's
        country, else ``DEFAULT_LOCALE``; an unknown one falls back, it is no error. Raises
        :class:`InstanceIdInUse`, :class:`RateLimited`, :class:`InvalidPhoneNumber` or
        :class:`BlockedNumber` when it is refused: then no SMS was sent. ``client_ip``, the
        address of the person's client, puts the start under the per-address limit
        (``HTTP_STARTS_PER_IP``). ``channel`` is ``sms`` (the default), ``whatsapp``, ``call``
        or ``auto`` (a call for landlines); :class:`ChannelUnavailable` when it cannot reach
        the number (``reply.detail`` names the channels that would). ``reply.channel`` is the
        channel used.
        """
        message = self._start_message(phone_number, instance_id, locale=locale,
                                      accept_language=accept_language, client_ip=client_ip,
                                      channel=channel)
        return await self._ask(self.names.start, message, timeout)

    async def resend(self, instance_id: str, channel: ChannelChoice | None = None, *,
                     timeout: float | None = None, client_ip: str | None = None) -> Reply:
        """Send the same code again (the deadline and attempts do not change), over
        ``channel`` (default: the one used last); ``reply.channel`` and
        ``reply.resends_left`` say how it went.

        Raises :class:`RateLimited` when it is too soon, none is left or the client address
        sent too many (``retry_after``: seconds until one is allowed, ``None`` when none is
        left), :class:`ChannelUnavailable`, :class:`VerificationEnded` (it had concluded) or
        :class:`UnknownVerification`. ``client_ip``, the address of the person's client, counts
        the resend against the per-address limit (``HTTP_STARTS_PER_IP``), as for starts.
        """
        message = self._resend_message(instance_id, channel, client_ip)
        reply = await self._ask(self.names.resend, message, timeout)
        if reply.result == "ended":
            raise VerificationEnded(explain_refusal(reply), reply)
        return reply

    async def submit_code(self, instance_id: str, code: str, *,
                          timeout: float | None = None) -> Reply:
        """Send the code the person received (a string of digits: ``"0042"`` is not ``"42"``).

        ``reply.result`` is ``verified``, ``wrong_code`` (``attempts_left`` >= 1),
        ``too_many_attempts``, ``expired`` or ``ended`` (it had concluded before: nothing
        changed). Raises :class:`UnknownVerification` if no such verification started.
        """
        return await self._ask(self.names.response, self._code_message(instance_id, code),
                               timeout)

    async def terminate(self, instance_id: str, reason: str = "", *,
                        timeout: float | None = None) -> Reply:
        """End a verification now: ``reply.result`` is ``terminated``, or ``ended`` if it had
        concluded before. Raises :class:`UnknownVerification` if no such verification started."""
        return await self._ask(self.names.terminate,
                               self._terminate_message(instance_id, reason), timeout)

    # ------------------------------------------------------------ commands, not answered

    async def send_start(self, phone_number: str, instance_id: str | None = None, *,
                         locale: str | None = None) -> str:
        """Send a start without waiting for its answer; returns the instance id."""
        message = self._start_message(phone_number, instance_id, locale=locale)
        await self._send(self.names.start, message)
        return message.instance_id

    async def send_code(self, instance_id: str, code: str) -> None:
        """Send a code without waiting for its answer."""
        await self._send(self.names.response, self._code_message(instance_id, code))

    async def send_resend(self, instance_id: str, channel: ChannelChoice | None = None) -> None:
        """Send a resend without waiting for its answer."""
        await self._send(self.names.resend, self._resend_message(instance_id, channel))

    async def send_terminate(self, instance_id: str, reason: str = "") -> None:
        """Send a terminate without waiting for its answer."""
        await self._send(self.names.terminate, self._terminate_message(instance_id, reason))

    # ------------------------------------------------------------ fraud blocks (rule 20)

    async def fraud_blocks(self) -> list[FraudBlock]:
        """The fraud blocks in force now: the last record of each key of
        ``verification.fraud``, read to its end."""
        from phoneverify.ops.replay import records

        producer = await self._ready_producer()
        partitions = await self._check_topic(producer, self.names.fraud)
        last: dict[str, FraudBlock] = {}
        async for record in records(self.bootstrap_servers, self.names.fraud, len(partitions)):
            try:
                block = FraudBlock.from_bytes(record.value)
            except (ValidationError, ValueError):
                continue
            last[block.key] = block
        now = datetime.now(UTC)
        return sorted((b for b in last.values() if b.in_force(now)),
                      key=lambda b: (b.level, b.key))

    async def block(self, key: str, seconds: float) -> FraudBlock:
        """Block a prefix (``+44740012``) or a country (``GB``) for ``seconds``, as an
        operator: starts and resends to it are refused ``blocked_number`` on every worker."""
        try:
            record = fraud.operator_block(key, seconds, datetime.now(UTC),
                                          self.settings.fraud_policy)
        except ValueError as error:
            raise InvalidInput(str(error)) from None
        await self._publish_block(record)
        return record

    async def unblock(self, key: str) -> FraudBlock:
        """Lift the block in force for ``key`` (:class:`NotBlocked` when there is none)."""
        try:
            record = fraud.operator_unblock(key, datetime.now(UTC))
        except ValueError as error:
            raise InvalidInput(str(error)) from None
        if record.key not in {block.key for block in await self.fraud_blocks()}:
            raise NotBlocked(f"no fraud block is in force for {record.key}; nothing changed")
        await self._publish_block(record)
        return record

    async def _publish_block(self, record: FraudBlock) -> None:
        producer = await self._ready_producer()
        partitions = await self._check_topic(producer, self.names.fraud)
        key = record.key.encode()
        await producer.send_and_wait(self.names.fraud, record.to_bytes(), key=key,
                                     partition=partition_for(key, len(partitions)))

    # ------------------------------------------------------------ messages

    def _start_message(self, phone_number: str, instance_id: str | None,
                       request_id: str | None = None, *, locale: str | None = None,
                       accept_language: str | None = None, client_ip: str | None = None,
                       channel: str | None = None) -> StartVerification:
        iid = uuid.uuid4().hex if instance_id is None else check_instance_id(instance_id)
        if not isinstance(phone_number, str):
            raise InvalidInput("phone_number must be a string")
        try:
            e164 = phone.normalise(phone_number, self.settings.phone_default_region)
        except phone.InvalidPhoneNumber as error:
            raise InvalidInput(f"phone_number: {error}") from None
        return _validated(StartVerification, instance_id=iid, phone_number=e164, locale=locale,
                          accept_language=accept_language, client_ip=client_ip,
                          channel=channel)

    def _resend_message(self, instance_id: str, channel: str | None,
                        client_ip: str | None = None) -> ResendCode:
        check_instance_id(instance_id)
        return _validated(ResendCode, instance_id=instance_id, channel=channel,
                          client_ip=client_ip)

    def _code_message(self, instance_id: str, code: str) -> SubmitCode:
        check_instance_id(instance_id)
        if not isinstance(code, str):
            raise InvalidInput("code must be a string of digits (leading zeros count), "
                               f"not {type(code).__name__}")
        if not code.isascii() or not code.isdigit():
            raise InvalidInput("code must be a string of digits 0-9")
        return _validated(SubmitCode, instance_id=instance_id, code=code)

    def _terminate_message(self, instance_id: str, reason: str) -> Terminate:
        check_instance_id(instance_id)
        return _validated(Terminate, instance_id=instance_id, reason=reason)

    async def _ask(self, topic: str, message: Message, timeout: float | None) -> Reply:
        """Send ``message`` with a new request id and wait for its reply."""
        request_id = uuid.uuid4().hex
        message = message.model_copy(update={"request_id": request_id})
        await self._check_topic(await self._ready_producer(), topic)
        replies = await self._ready_replies()
        answer = replies.expect(request_id)
        try:
            await self._send(topic, message)
            wait = self.reply_timeout if timeout is None else timeout
            try:
                reply = await asyncio.wait_for(asyncio.shield(answer), wait)
            except TimeoutError:
                raise ReplyTimeout(
                    f"no reply to {_command_name(topic, self.names)} of "
                    f"{message.instance_id} within {wait:g}s: it is in Kafka and may still "
                    "take effect") from None
        finally:
            replies.forget(request_id)
        refusal = _REFUSALS.get(reply.result)
        if refusal is not None:
            raise refusal(explain_refusal(reply), reply)
        return reply

    async def _send(self, topic: str, message: Message) -> None:
        producer = await self._ready_producer()
        await self._check_topic(producer, topic)
        key = message.instance_id.encode()  # type: ignore[attr-defined]
        try:
            await producer.send_and_wait(topic, message.to_bytes(), key=key)
        except KafkaError as error:
            raise KafkaUnavailable(f"could not write to {topic}: {error!r}") from None

    async def _ready_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            await self.connect()
        assert self._producer is not None
        return self._producer

    async def _ready_replies(self) -> _Replies:
        if self._replies is None:
            producer = await self._ready_producer()
            partitions = await self._check_topic(producer, self.names.replies)
            replies = _Replies(self._consumer(), self.names.replies, partitions)
            await replies.open(self.bootstrap_servers)
            self._replies = replies
        return self._replies

    async def _check_topic(self, producer: AIOKafkaProducer, topic: str) -> set[int]:
        """The topic's partitions; KafkaUnavailable when it does not exist (no worker yet)."""
        cluster = producer.client.cluster
        partitions = cluster.partitions_for_topic(topic)
        if partitions is None:
            producer.client.add_topic(topic)
            try:
                await producer.client.force_metadata_update()
            except KafkaError as error:
                raise KafkaUnavailable(f"cannot reach Kafka: {error!r}") from None
            partitions = cluster.partitions_for_topic(topic)
        if not partitions:
            raise KafkaUnavailable(
                f"topic {topic} does not exist on {self.bootstrap_servers}; a worker creates "
                f"the topics when it starts (is TOPIC_PREFIX {self.names.prefix!r} right?)")
        return partitions

    # ------------------------------------------------------------ outcomes

    def partition_of(self, instance_id: str, partitions: set[int]) -> int:
        """The partition of ``instance_id`` (Java's default partitioner, murmur2)."""
        return partition_for(instance_id.encode(), len(partitions))

    async def wait_for_outcome(self, instance_id: str, timeout: float,
                               from_beginning: bool = True) -> Outcome:
        """The outcome of ``instance_id``, waiting up to ``timeout`` seconds (OutcomeTimeout).

        Reads ``verification.outcome`` from the beginning of the instance's partition (an
        outcome published before the call is found), or with ``from_beginning=False`` only
        what arrives from now on.
        """
        check_instance_id(instance_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        producer = await self._ready_producer()
        topic = self.names.outcome
        partition = self.partition_of(instance_id, await self._check_topic(producer, topic))
        consumer = self._consumer()
        try:
            await _start_consumer(consumer, self.bootstrap_servers)
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            if from_beginning:
                await consumer.seek_to_beginning(tp)
            else:
                await consumer.seek_to_end(tp)
            key = instance_id.encode()
            while (left := deadline - loop.time()) > 0:
                batch = await consumer.getmany(tp, timeout_ms=int(min(left, 1.0) * 1000) + 1)
                for record in batch.get(tp, []):
                    if record.key == key and (outcome := _parsed(Outcome, record)) is not None:
                        return outcome
        finally:
            await consumer.stop()
        raise OutcomeTimeout(f"no outcome for {instance_id} within {timeout:g}s")

    def outcomes(self, instance_id: str | None = None,
                 from_beginning: bool = False) -> OutcomeStream:
        """An async iterator over outcomes as they are published (all, or one instance's).

        Use it as ``async with client.outcomes() as stream: async for o in stream`` to be sure
        it is listening (positions fixed) before you cause anything; a plain ``async for``
        starts listening at the first iteration. Closed with the client at the latest.
        """
        if instance_id is not None:
            check_instance_id(instance_id)
        stream = OutcomeStream(self, instance_id, from_beginning)
        self._streams.add(stream)
        return stream

    def _consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers, enable_auto_commit=False,
            auto_offset_reset="earliest", group_id=None, client_id="phoneverify-client",
            request_timeout_ms=int(self.request_timeout * 1000),
            isolation_level="read_committed")  # under exactly_once: each record once


def _command_name(topic: str, names: Names) -> str:
    return {names.start: "the start", names.response: "the code",
            names.terminate: "the terminate", names.resend: "the resend"}.get(topic, topic)


class _Replies:
    """Every reply from now on, matched to the requests waiting for them by request id."""

    def __init__(self, consumer: AIOKafkaConsumer, topic: str, partitions: set[int]) -> None:
        self._consumer = consumer
        self._tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._task: asyncio.Task[None] | None = None

    async def open(self, bootstrap: str) -> None:
        """Listen from the end of the topic: after this, no reply can be missed."""
        await _start_consumer(self._consumer, bootstrap)
        self._consumer.assign(self._tps)
        await self._consumer.seek_to_end(*self._tps)
        for tp in self._tps:  # resolve the positions now, not at the first fetch
            await self._consumer.position(tp)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def expect(self, request_id: str) -> asyncio.Future[Reply]:
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    async def _run(self) -> None:
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=1000)
            except KafkaError as error:  # keep listening; waiters time out if it lasts
                log.warning("reading replies: %r", error)
                await asyncio.sleep(0.5)
                continue
            for records in batch.values():
                for record in records:
                    reply = _parsed(Reply, record)
                    future = self._waiting.get(reply.request_id) if reply else None
                    if future is not None and not future.done():
                        future.set_result(reply)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()


class OutcomeStream:
    """Outcomes as they come; from :meth:`VerificationClient.outcomes`."""

    def __init__(self, client: VerificationClient, instance_id: str | None,
                 from_beginning: bool) -> None:
        self.client = client
        self.instance_id = instance_id
        self.from_beginning = from_beginning
        self._consumer: AIOKafkaConsumer | None = None
        self._pending: list[Outcome] = []
        self._closed = False
        #: With ``from_beginning``: where each partition ended when the stream opened; what
        #: was there is read whole and handed out in time order, not partition by partition.
        self._backlog: dict[TopicPartition, int] = {}

    async def __aenter__(self) -> OutcomeStream:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Start listening: after this returns, every outcome published is seen."""
        if self._consumer is not None:
            return
        if self._closed:
            raise VerificationError("this outcome stream is closed")
        client = self.client
        producer = await client._ready_producer()
        topic = client.names.outcome
        partitions = await client._check_topic(producer, topic)
        if self.instance_id is not None:
            partitions = {client.partition_of(self.instance_id, partitions)}
        consumer = client._consumer()
        await _start_consumer(consumer, client.bootstrap_servers)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        if self.from_beginning:
            await consumer.seek_to_beginning(*tps)
            self._backlog = await consumer.end_offsets(tps)
        else:
            await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the positions now, not at the first fetch
            await consumer.position(tp)
        self._consumer = consumer

    def __aiter__(self) -> AsyncIterator[Outcome]:
        return self

    async def __anext__(self) -> Outcome:
        if self._consumer is None:
            await self.open()
        assert self._consumer is not None
        key = None if self.instance_id is None else self.instance_id.encode()
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            records = []
            while True:  # the backlog whole (once), else one fetch
                batch = await self._consumer.getmany(timeout_ms=500)
                records += [record for part in batch.values() for record in part]
                if not await self._in_backlog():
                    break
            found = [o for record in records
                     if (key is None or record.key == key) and (o := _parsed(Outcome, record))]
            # In time order across partitions (each partition is in order already).
            self._pending += sorted(found, key=lambda outcome: outcome.completed_at)
        return self._pending.pop(0)

    async def _in_backlog(self) -> bool:
        """Whether records that were there when the stream opened are still to be read."""
        assert self._consumer is not None
        for tp, end in list(self._backlog.items()):
            if await self._consumer.position(tp) >= end:
                del self._backlog[tp]
        return bool(self._backlog) and not self._closed

    async def aclose(self) -> None:
        self._closed = True
        self.client._streams.discard(self)
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()


async def _start_consumer(consumer: AIOKafkaConsumer, bootstrap: str) -> None:
    try:
        await consumer.start()
    except KafkaConnectionError as error:
        await consumer.stop()
        raise KafkaUnavailable(f"cannot reach Kafka at {bootstrap}: {error}") from None


def _parsed(model: type[_M], record: Any) -> _M | None:
    try:
        return model.from_bytes(record.value)  # type: ignore[return-value]
    except (ValidationError, ValueError):
        log.warning("skipping an unreadable %s at %s[%d]@%d", model.__name__, record.topic,
                    record.partition, record.offset)
        return None
