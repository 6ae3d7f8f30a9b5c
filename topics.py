"""The wiring contract: topic names, keys, partitions, configurations, and their creation.

Every topic here has ``PARTITIONS`` partitions. All but ``ADMISSION`` (by phone number),
``GUARD`` and ``FRAUD`` (by prefix, country or client address) are keyed by ``instance_id``,
so one verification lives on one partition number across all of them (the
tables' changelogs included): the partition Java's default partitioner gives the key.
Input topics stamp records with the broker's clock (``LogAppendTime``): the actor's notion of
time comes from records, not from clients' clocks.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from phoneverify.models.codes import fingerprint
from phoneverify.settings import Settings

START = "verification.start"
RESPONSE = "verification.response"
TERMINATE = "verification.terminate"
TICK = "verification.tick"
SMS = "verification.sms"
SMS_STATUS = "verification.sms-status"
EVENTS = "verification.events"
OUTCOME = "verification.outcome"
DEAD_LETTER = "verification.dead-letter"
REPLIES = "verification.replies"
RESEND = "verification.resend"
# Internal. Admission's input, keyed by phone number: parsed starts, settlements, ticks.
ADMISSION = "verification.admission"
# Admission's verdicts, keyed by instance id, for the actor.
ADMITTED = "verification.admitted"
# Responses and terminates that a client's partitioner put on another partition than the
# service's, moved to the right one (with their original time and coordinates).
REROUTED = "verification.rerouted"
# Internal. The webhook stage's results of its tries, keyed by instance id.
WEBHOOK_TRIES = "verification.webhook-tries"
# The fraud guard's blocks and unblocks (rule 20), keyed by prefix or country; compacted:
# the last record of a key is its state, and every worker reads it all at start.
FRAUD = "verification.fraud"
# Internal. The fraud guard's input, keyed by prefix, country or client address: deliveries
# and conclusions (from the actor), judgments (prefix -> country), starts carrying a client
# address (from intake), ticks.
GUARD = "verification.guard"
# The fingerprint of the deployment's CODE_HASH_KEY: every worker must have the same key.
KEYS = "verification.keys"

ALL = (START, RESPONSE, TERMINATE, TICK, SMS, SMS_STATUS, EVENTS, OUTCOME, DEAD_LETTER,
       REPLIES, ADMISSION, ADMITTED, REROUTED, WEBHOOK_TRIES, FRAUD,
       GUARD, RESEND)  # and KEYS, one partition

log = logging.getLogger("phoneverify")


def configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Each topic's configuration beyond the broker's defaults."""
    broker_time = {"message.timestamp.type": "LogAppendTime"}
    forever = {"retention.ms": "-1"}
    return {
        START: broker_time,
        RESPONSE: broker_time,
        TERMINATE: broker_time,
        RESEND: broker_time,
        TICK: broker_time,  # a tick's time is checked against it
        ADMISSION: broker_time,
        GUARD: broker_time,  # a client address's starts are counted at it
        FRAUD: {"cleanup.policy": "compact"},
        # Plain codes: kept no longer than needed to deliver them (rule 13).
        SMS: {"retention.ms": str(int(settings.sms_topic_retention_seconds * 1000))},
        EVENTS: forever,  # the audit trail; replay reads it
        OUTCOME: forever,
        REPLIES: {"retention.ms": str(24 * 3600 * 1000)},  # answers are read at once
        REROUTED: {"message.timestamp.type": "CreateTime"},  # keeps the original's time
    }


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Java's default partitioner (murmur2) gives ``key``, as aiokafka's."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class Names:
    """The topic names of one deployment: ``TOPIC_PREFIX`` before each of the contract's."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.start = prefix + START
        self.response = prefix + RESPONSE
        self.terminate = prefix + TERMINATE
        self.tick = prefix + TICK
        self.sms = prefix + SMS
        self.sms_status = prefix + SMS_STATUS
        self.events = prefix + EVENTS
        self.outcome = prefix + OUTCOME
        self.dead_letter = prefix + DEAD_LETTER
        self.replies = prefix + REPLIES
        self.admission = prefix + ADMISSION
        self.admitted = prefix + ADMITTED
        self.rerouted = prefix + REROUTED
        self.webhook_tries = prefix + WEBHOOK_TRIES
        self.fraud = prefix + FRAUD
        self.guard = prefix + GUARD
        self.resend = prefix + RESEND

    def all(self) -> list[str]:
        return [self.prefix + name for name in ALL]


TABLES = ("verifications", "numbers", "sms-sent", "webhooks", "guard")


def changelog(settings: Settings, table: str) -> str:
    """The changelog topic Faust keeps for ``table``."""
    return f"{settings.app_id}-{table}-changelog"


async def replication_factor(settings: Settings, admin: AIOKafkaAdminClient) -> int:
    """REPLICATION_FACTOR, or by default as many replicas as brokers, at most 3."""
    if settings.replication_factor is not None:
        return settings.replication_factor
    cluster = await admin.describe_cluster()
    return max(1, min(3, len(cluster["brokers"])))


async def ensure_topics(settings: Settings, timeout: float = 30.0) -> tuple[list[str], int]:
    """Create every topic (the tables' changelogs too) with its partition count, replication
    and configuration, and bring the configuration of existing ones in line; returns the
    topics that were new and the replication factor used."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers,
                                request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        replicas = await replication_factor(settings, admin)
        # With replicas, a write is acknowledged once all in-sync replicas have it (acks=all),
        # and refused when fewer than all but one are in sync: one broker may be lost.
        durable = {"min.insync.replicas": str(replicas - 1)} if replicas > 1 else {}
        wanted_configs = {name: {**durable, **config}
                          for name, config in configs(settings).items()}
        compacted = {**durable, "cleanup.policy": "compact"}
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(settings.topic_prefix + name, settings.partitions, replicas,
                     topic_configs=wanted_configs.get(name, durable))
            for name in ALL
            if settings.topic_prefix + name not in existing
        ] + [
            NewTopic(changelog(settings, table), settings.partitions, replicas,
                     topic_configs=compacted)
            for table in TABLES
            if changelog(settings, table) not in existing
        ]
        if settings.topic_prefix + KEYS not in existing:
            wanted.append(NewTopic(settings.topic_prefix + KEYS, 1, replicas,
                                   topic_configs=compacted))
        if wanted:
            response = await admin.create_topics(wanted, timeout_ms=int(timeout * 1000))
            for name, code, *_ in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):  # another worker won the race
                    raise RuntimeError(f"creating topic {name} failed with Kafka error {code}")
        await _align_configs(admin, settings, existing, wanted_configs)
        await _wait_for_metadata(admin, [t.name for t in wanted], timeout)
        return [t.name for t in wanted], replicas
    finally:
        await admin.close()


class KeyMismatch(RuntimeError):
    """This worker's CODE_HASH_KEY is not the one the deployment's other workers use."""


async def check_code_key(settings: Settings, timeout: float = 30.0) -> str:
    """Record the fingerprint of CODE_HASH_KEY in Kafka, or check it is the one recorded.

    Workers with different keys would draw different codes for the same verification and
    refuse each other's right codes; a worker whose key differs must not start.
    """
    ours = fingerprint(settings.code_key)
    topic = settings.topic_prefix + KEYS
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    try:  # started inside: stopped even when cancelled while starting (Ctrl-C)
        await consumer.start()
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        recorded = None
        while await consumer.position(tp) < end:
            fetched = await consumer.getmany(tp, timeout_ms=int(timeout * 1000))
            for record in fetched.get(tp, []):
                if record.key == b"code_hash_key" and record.value:
                    recorded = record.value.decode()
    finally:
        await consumer.stop()
    if recorded is None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                    acks="all")
        try:
            await producer.start()
            await producer.send_and_wait(topic, ours.encode(), key=b"code_hash_key")
        finally:
            await producer.stop()
    elif recorded != ours:
        raise KeyMismatch(
            f"CODE_HASH_KEY differs from the one this deployment's workers use (its "
            f"fingerprint is {recorded}, this worker's {ours}): give every worker the same "
            "CODE_HASH_KEY, or codes drawn by one worker fail on another")
    return ours


async def _align_configs(admin: AIOKafkaAdminClient, settings: Settings, existing: set[str],
                         wanted: dict[str, dict[str, str]]) -> None:
    """Alter the configuration of topics that exist with other values (say, a retention)."""
    names = [name for name in wanted if settings.topic_prefix + name in existing]
    if not names:
        return
    resources = [ConfigResource(ConfigResourceType.TOPIC, settings.topic_prefix + name)
                 for name in names]
    described = await admin.describe_configs(resources)
    current: dict[str, dict[str, str | None]] = {}
    for response in described:
        for _code, _message, _type, name, entries in response.resources:
            current[name] = {entry[0]: entry[1] for entry in entries}
    for name in names:
        full = settings.topic_prefix + name
        have = current.get(full, {})
        if all(have.get(key) == value for key, value in wanted[name].items()):
            continue
        # Incremental alteration is not in aiokafka; a full AlterConfigs sets every given
        # key and resets the rest to the broker's defaults, so send all we set.
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, full,
                                                  configs=wanted[name])])
        log.info("topic %s: configuration set to %s", full, wanted[name])


async def _wait_for_metadata(admin: AIOKafkaAdminClient, topics: list[str], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while topics and loop.time() < deadline:
        described = await admin.describe_topics(topics)
        if all(not t.get("error_code") and t.get("partitions")
               and all(p.get("leader", -1) >= 0 for p in t["partitions"]) for t in described):
            return  # every partition has its leader: reads and writes are served
        await asyncio.sleep(0.1)
