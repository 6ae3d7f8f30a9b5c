"""Topic names, their Kafka configuration, and their creation before any worker subscribes.

Every topic here has ``PARTITIONS`` partitions. All but ``START_BY_PHONE`` are keyed by
``instance_id``, so one verification lives on one partition number across all of them (the
Faust tables' changelogs included). Input topics stamp records with the broker's clock
(``LogAppendTime``): the actor's notion of time comes from records, not from clients' clocks.
"""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

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
# Internal: starts re-keyed by phone number for the rate limiter, and its verdicts.
START_BY_PHONE = "verification.start-by-phone"
ADMITTED = "verification.admitted"

BROKER_TIME = {"message.timestamp.type": "LogAppendTime"}
FOREVER = {"retention.ms": "-1"}

CONFIGS: dict[str, dict[str, str]] = {
    START: BROKER_TIME,
    RESPONSE: BROKER_TIME,
    TERMINATE: BROKER_TIME,
    EVENTS: FOREVER,  # the source of truth for replay
    OUTCOME: FOREVER,
}
ALL = (START, RESPONSE, TERMINATE, TICK, SMS, SMS_STATUS, EVENTS, OUTCOME, DEAD_LETTER,
       START_BY_PHONE, ADMITTED)


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
        self.start_by_phone = prefix + START_BY_PHONE
        self.admitted = prefix + ADMITTED

    def all(self) -> list[str]:
        return [self.prefix + name for name in ALL]


def names(settings: Settings) -> Names:
    return Names(settings.topic_prefix)


async def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create every topic with its partition count; returns those that were new."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers,
                                request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(settings.topic_prefix + name, settings.partitions,
                     settings.replication_factor, topic_configs=CONFIGS.get(name, {}))
            for name in ALL
            if settings.topic_prefix + name not in existing
        ]
        if wanted:
            response = await admin.create_topics(wanted, timeout_ms=int(timeout * 1000))
            for name, code, *_ in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):  # another worker won the race
                    raise RuntimeError(f"creating topic {name} failed with Kafka error {code}")
        await _wait_for_metadata(admin, [t.name for t in wanted], timeout)
        return [t.name for t in wanted]
    finally:
        await admin.close()


async def _wait_for_metadata(admin: AIOKafkaAdminClient, topics: list[str], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while topics and loop.time() < deadline:
        described = await admin.describe_topics(topics)
        if all(not t.get("error_code") and t.get("partitions") for t in described):
            return
        await asyncio.sleep(0.1)
