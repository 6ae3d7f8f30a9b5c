"""The Faust application: settings, Kafka topics as Faust channels, and the agents' registration.

Run a worker with ``phoneverify worker`` (or ``make run``); it creates every topic with its
partition count first (:func:`phoneverify.topics.ensure_topics`), then starts Faust.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import faust

from phoneverify.ops import faust_fixes, fetch_linger, recovery, restore, stopping
from phoneverify.ops.broker.local import worker_client_id
from phoneverify.ops.logs import json_logging, text_logging
from phoneverify.settings import Settings
from phoneverify.topics import Names

faust_fixes.apply()
settings = Settings()
recovery.apply(settings.data_dir)
restore.apply(settings.restore_batch)  # after recovery's: its offset check comes first
fetch_linger.apply(settings.fetch_linger_ms / 1000)
names = Names(settings.topic_prefix)


def _broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap.split(","))


class Worker(faust.Worker):
    """Faust's worker, stopped by SIGHUP (a closed terminal) as by SIGTERM, and by a stop signal
    that came after ``run_worker`` handed over and before these handlers were in
    (:mod:`phoneverify.ops.stopping`)."""

    def _install_signal_handlers_unix(self) -> None:
        super()._install_signal_handlers_unix()
        stopping.faust_handlers_in(self)

    async def _sentinel_task(self) -> None:
        """The last turn before the event loop closes, once everything has stopped and every
        task is gathered: mode waits a whole second here, every stop; a tenth lets what
        closing connections scheduled run."""
        await asyncio.sleep(0.1)


app = faust.App(
    settings.app_id,
    Worker=Worker,
    # Faust reads no setting from the environment: every one it uses is given here. The
    # environment holds ours, and some share Faust's names with another meaning: with
    # PROCESSING_GUARANTEE=exactly_once (our rule 23) Faust would turn on its own
    # exactly-once mode, and WEB_HOST (our bind address) would replace the advertised host.
    env={},
    processing_guarantee="at_least_once",  # Faust's own exactly-once mode stays off
    # ops/recovery.py checks each store against the changelog instead (and sets aside, where
    # Faust's check would stop the worker).
    recovery_consistency_check=False,
    broker=_broker_url(settings.kafka_bootstrap_servers),
    # Tables live in RocksDB (one database per partition, in DATA_DIR) with their changelogs
    # in Kafka: a restarted worker replays only the changelog's tail. See agents/tables.py
    # for the order of writes that keeps the local store from ever running ahead of Kafka.
    store="rocksdb://",
    key_serializer="raw",
    value_serializer="raw",
    topic_partitions=settings.partitions,
    topic_replication_factor=settings.replication_factor or 1,  # set by ensure_topics
    topic_allow_declare=True,
    producer_acks=-1,
    # Per process: `make run` tells its own worker from the others that use its broker.
    broker_client_id=worker_client_id(os.getpid()),
    datadir=str(settings.data_dir / recovery.STORE_DIR),
    # A dead worker's partitions move to the others after this long without heartbeats.
    broker_session_timeout=15.0,
    broker_heartbeat_interval=3.0,
    # The Cython stream iterator takes a queued record without awaiting (opt-in in 0.15).
    cython_optimizations=True,
    web_enabled=True,
    web_bind=settings.web_host,
    web_port=settings.web_port,
    web_host=settings.web_advertised_host or settings.web_host,
    web_tables_enabled=False,  # never expose tables (they hold code hashes)
    web_graph_enabled=False,
    web_router_enabled=True,  # used to route per-verification requests to the owning worker
    web_stats_enabled=False,
    web_metrics_enabled=False,
    consumer_auto_offset_reset="earliest",
    broker_commit_interval=1.0,
    worker_redirect_stdouts_level="INFO",  # the console SMS backend prints; not a warning
    logging_config=(json_logging(settings.log_level) if settings.log_format == "json"
                    else text_logging()),
)


#: How long a stopping worker waits, once its consumer has stopped, for Kafka to take what the
#: producer still holds. With no broker left to take it, Faust would wait forever.
STOP_LIMIT = 15.0


@app.on_before_shutdown.connect
async def _bounded_stop(sender: faust.App, **kwargs: object) -> None:
    """Exit after :data:`STOP_LIMIT` if the last flush has not finished by then. Nothing is
    lost: the inputs of what was not delivered are not committed and are handled again."""

    def give_up() -> None:
        logging.getLogger("phoneverify").error(
            "stopping: Kafka did not take the last records within %.0f s (is a broker "
            "reachable?); exiting without them: their inputs were not committed and will be "
            "handled again", STOP_LIMIT)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(STOP_LIMIT, give_up)
    timer.daemon = True  # a worker that stops in time does not wait for it
    timer.start()


def _topic(name: str) -> faust.TopicT:
    return app.topic(name, key_type=bytes, value_type=bytes, partitions=settings.partitions,
                     key_serializer="raw", value_serializer="raw")


start_topic = _topic(names.start)
tick_topic = _topic(names.tick)
sms_topic = _topic(names.sms)
admission_topic = _topic(names.admission)

# Registers the agents, tables, timer and HTTP views on ``app``.
import phoneverify.agents.actor  # noqa: E402
import phoneverify.agents.admission  # noqa: E402
import phoneverify.agents.fraud  # noqa: E402
import phoneverify.agents.intake  # noqa: E402
import phoneverify.agents.sender  # noqa: E402
import phoneverify.agents.ticker  # noqa: E402
import phoneverify.agents.webhooks  # noqa: E402
import phoneverify.interfaces.http  # noqa: E402,F401
