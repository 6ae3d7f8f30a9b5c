"""The async Python client: start a verification, submit a code, terminate, wait for outcomes.

It talks to Kafka only (the topics of the wire contract, ``TOPIC_PREFIX`` honoured), through an
idempotent producer (``enable_idempotence=True``, ``acks="all"``); records are keyed by the
instance id (UTF-8), so everything about one verification lands on one partition::

    async with VerificationClient() as client:          # settings from the environment
        iid = await client.start("+1 425-555-0100")
        await client.submit_code(iid, "0042")           # a string: leading zeros count
        outcome = await client.wait_for_outcome(iid, timeout=120)
        print(outcome.status, outcome.reason)

    async with VerificationClient() as client, client.outcomes() as stream:
        async for outcome in stream:                    # every outcome from now on
            ...

Input is checked here, before anything is sent (:class:`InvalidInput`); the worker checks
again. Exceptions: :class:`VerificationError` and its subclasses.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError
from aiokafka.partitioner import DefaultPartitioner
from pydantic import ValidationError

from phoneverify.models.messages import (
    INSTANCE_ID,
    Message,
    Outcome,
    StartVerification,
    SubmitCode,
    Terminate,
    explain,
)
from phoneverify.models.phone import InvalidPhoneNumber, normalise
from phoneverify.settings import Settings
from phoneverify.topics import Names

log = logging.getLogger("phoneverify.client")


class VerificationError(Exception):
    """Base of the client's errors."""


class InvalidInput(VerificationError, ValueError):
    """An argument is not valid (instance id, phone number, code, reason); nothing was sent."""


class OutcomeTimeout(VerificationError, TimeoutError):
    """No outcome arrived in time (the verification may still be running)."""


class KafkaUnavailable(VerificationError, ConnectionError):
    """Kafka could not be reached, or the deployment's topics do not exist."""


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


class VerificationClient:
    """A client of one deployment (bootstrap servers and topic prefix from Settings or given)."""

    def __init__(self, bootstrap_servers: str | None = None, *,
                 topic_prefix: str | None = None, settings: Settings | None = None,
                 request_timeout: float = 30.0) -> None:
        self.settings = settings or Settings()
        self.bootstrap_servers = bootstrap_servers or self.settings.kafka_bootstrap_servers
        self.names = Names(self.settings.topic_prefix if topic_prefix is None else topic_prefix)
        self.request_timeout = request_timeout
        self._producer: AIOKafkaProducer | None = None
        self._streams: set[OutcomeStream] = set()
        self._partitioner = DefaultPartitioner()

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
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    # ------------------------------------------------------------ commands

    async def start(self, phone_number: str, instance_id: str | None = None) -> str:
        """Start a verification of ``phone_number``; returns its instance id (UUID4 hex if none).

        The number may be in any form a person types; it is sent normalised to E.164 (numbers
        without a country code are read in ``PHONE_DEFAULT_REGION``). Starting again with a used
        instance id sends no second SMS.
        """
        iid = uuid.uuid4().hex if instance_id is None else check_instance_id(instance_id)
        if not isinstance(phone_number, str):
            raise InvalidInput("phone_number must be a string")
        try:
            e164 = normalise(phone_number, self.settings.phone_default_region)
        except InvalidPhoneNumber as error:
            raise InvalidInput(f"phone_number: {error}") from None
        await self._send(self.names.start, _validated(StartVerification, instance_id=iid,
                                                      phone_number=e164))
        return iid

    async def submit_code(self, instance_id: str, code: str) -> None:
        """Send the code the person received (a string of digits: ``"0042"`` is not ``"42"``)."""
        check_instance_id(instance_id)
        if not isinstance(code, str):
            raise InvalidInput("code must be a string of digits (leading zeros count), "
                               f"not {type(code).__name__}")
        if not code.isascii() or not code.isdigit():
            raise InvalidInput("code must be a string of digits 0-9")
        await self._send(self.names.response,
                         _validated(SubmitCode, instance_id=instance_id, code=code))

    async def terminate(self, instance_id: str, reason: str = "") -> None:
        """End a verification now (outcome ``terminated``), with a reason of up to 500 chars."""
        check_instance_id(instance_id)
        await self._send(self.names.terminate,
                         _validated(Terminate, instance_id=instance_id, reason=reason))

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
        """The partition of ``instance_id`` (the producer's default partitioner, murmur2)."""
        ordered = sorted(partitions)
        return self._partitioner(instance_id.encode(), ordered, ordered)

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
                    if record.key == key and (outcome := _outcome(record)) is not None:
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
            request_timeout_ms=int(self.request_timeout * 1000))


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
            batch = await self._consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    if (key is None or record.key == key) and (o := _outcome(record)):
                        self._pending.append(o)
        return self._pending.pop(0)

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


def _outcome(record: Any) -> Outcome | None:
    try:
        return Outcome.from_bytes(record.value)  # type: ignore[return-value]
    except (ValidationError, ValueError):
        log.warning("skipping an unreadable outcome at %s[%d]@%d", record.topic,
                    record.partition, record.offset)
        return None
