"""The Faust application: settings, Kafka topics as Faust channels, and the agents' registration.

Run a worker with ``phoneverify worker`` (or ``make run``); it creates every topic with its
partition count first (:func:`topics.ensure_topics`), then starts Faust.
"""

from __future__ import annotations

import faust

from phoneverify.ops import faust_fixes
from phoneverify.settings import Settings
from phoneverify.topics import Names

faust_fixes.apply()
settings = Settings()
names = Names(settings.topic_prefix)


def _broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap.split(","))


app = faust.App(
    settings.app_id,
    broker=_broker_url(settings.kafka_bootstrap_servers),
    store="memory://",  # tables are rebuilt from their changelogs: Kafka is the only store
    key_serializer="raw",
    value_serializer="raw",
    topic_partitions=settings.partitions,
    topic_replication_factor=settings.replication_factor,
    topic_allow_declare=True,
    producer_acks=-1,
    datadir=str(settings.data_dir / "faust"),
    web_enabled=True,
    web_bind=settings.web_host,
    web_port=settings.web_port,
    web_host=settings.web_advertised_host or settings.web_host,
    web_tables_enabled=False,  # never expose tables (they hold code hashes)
    web_graph_enabled=False,
    web_router_enabled=True,  # used to route status requests to the owning worker
    web_stats_enabled=False,
    web_metrics_enabled=False,
    consumer_auto_offset_reset="earliest",
    broker_commit_interval=1.0,
    worker_redirect_stdouts_level="INFO",  # the console SMS backend prints; not a warning
)


def _topic(name: str) -> faust.TopicT:
    return app.topic(name, key_type=bytes, value_type=bytes, partitions=settings.partitions,
                     key_serializer="raw", value_serializer="raw")


start_topic = _topic(names.start)
response_topic = _topic(names.response)
terminate_topic = _topic(names.terminate)
tick_topic = _topic(names.tick)
sms_topic = _topic(names.sms)
sms_status_topic = _topic(names.sms_status)
events_topic = _topic(names.events)
outcome_topic = _topic(names.outcome)
dead_letter_topic = _topic(names.dead_letter)
start_by_phone_topic = _topic(names.start_by_phone)
admitted_topic = _topic(names.admitted)

# Registers the agents, tables, timer and HTTP views on ``app``.
import phoneverify.agents.actor  # noqa: E402
import phoneverify.agents.intake  # noqa: E402
import phoneverify.agents.ratelimit  # noqa: E402
import phoneverify.agents.sender  # noqa: E402
import phoneverify.agents.ticker  # noqa: E402
import phoneverify.interfaces.http  # noqa: E402,F401
