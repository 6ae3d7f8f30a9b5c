"""The worker's Prometheus metrics (``GET /metrics``), with ``prometheus_client``.

The agents count what they publish once Kafka has acknowledged it; lag per partition is read
from Faust's monitor when scraped. Names are the contract's, plus a few for operators.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, CPU seconds, open files
#: Seconds, from 1 ms to 30 s: what a person waits for.
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

outcomes = Counter("phoneverify_outcomes", "Outcomes published, by reason.", ["reason"],
                   registry=REGISTRY)
sms = Counter("phoneverify_sms", "SMS handed to the provider (sent, failed) and delivery "
              "receipts (delivered, undelivered), by result.", ["result"], registry=REGISTRY)
deliveries = Counter("phoneverify_deliveries", "Deliveries handed to the provider, by channel "
                     "(sms, whatsapp, call) and result (sent, failed).", ["channel", "result"],
                     registry=REGISTRY)
replies = Counter("phoneverify_replies", "Replies published, by result.", ["result"],
                  registry=REGISTRY)
pending = Gauge("phoneverify_pending_verifications",
                "Verifications started and not concluded, on this worker's partitions.",
                registry=REGISTRY)
kept = Gauge("phoneverify_kept_verifications", "Verifications the table keeps (pending, "
             "held, or concluded within VERIFICATION_RETENTION_SECONDS), on this worker's "
             "partitions.", registry=REGISTRY)
response_to_outcome = Histogram(
    "phoneverify_response_to_outcome_seconds",
    "From the response record (broker time) to its outcome published.", buckets=LATENCY,
    registry=REGISTRY)
reply_latency = Histogram(
    "phoneverify_reply_seconds", "From a command record (broker time) to its reply published.",
    ["command"], buckets=LATENCY, registry=REGISTRY)
sms_send = Histogram("phoneverify_sms_send_seconds", "How long the SMS provider took to "
                     "accept (or refuse) one SMS, retries included.", buckets=LATENCY,
                     registry=REGISTRY)
misrouted = Counter("phoneverify_misrouted_records", "Records a client's partitioner put on "
                    "another partition than the service's, moved to theirs.", ["topic"],
                    registry=REGISTRY)
webhooks = Counter("phoneverify_webhooks", "Webhook tries by result: delivered, failed (a "
                   "try that failed; retried), given_up (after WEBHOOK_MAX_AGE_SECONDS).",
                   ["result"], registry=REGISTRY)
webhook_pending = Gauge("phoneverify_webhook_pending", "Webhook deliveries (outcome and URL) "
                        "not done yet, on this worker's partitions.", registry=REGISTRY)
dead_letters = Counter("phoneverify_dead_letters", "Records sent to the dead-letter topic.",
                       ["topic"], registry=REGISTRY)
fraud_blocks = Counter("phoneverify_fraud_blocks", "Blocks the fraud guard made or an operator "
                       "set, by level (prefix, country).", ["level"], registry=REGISTRY)
for _level in ("prefix", "country"):
    fraud_blocks.labels(_level)


class FraudBlocked(Collector):
    """Blocks in force now, by level (every worker reads them all: take the max, not the sum)."""

    def __init__(self, levels: Callable[[], list[str]]) -> None:
        self.levels = levels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("phoneverify_fraud_blocked",
                                   "Prefixes and countries blocked now (the fraud guard), by "
                                   "level.", labels=["level"])
        levels = self.levels()
        for level in ("prefix", "country"):
            family.add_metric([level], levels.count(level))
        yield family


def watch_fraud_blocks(levels: Callable[[], list[str]]) -> None:
    REGISTRY.register(FraudBlocked(levels))


class Lag(Collector):
    """Records not yet read, per input partition this worker consumes (Faust's monitor)."""

    def __init__(self, monitor: Callable[[], Any]) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("phoneverify_consumer_lag",
                                   "Records behind the partition's end, per input partition.",
                                   labels=["topic", "partition"])
        monitor = self.monitor()
        ends = dict(getattr(monitor, "tp_end_offsets", None) or {})
        read = getattr(monitor, "tp_read_offsets", None) or {}
        for tp, end in ends.items():
            behind = max(0, end - (read.get(tp, -1) + 1))
            family.add_metric([tp.topic, str(tp.partition)], behind)
        yield family


def watch_lag(monitor: Callable[[], Any]) -> None:
    REGISTRY.register(Lag(monitor))


#: RocksDB's own estimates of the memory a database holds, by what holds it.
ROCKSDB_MEMORY = {"memtables": "rocksdb.cur-size-all-mem-tables",
                  "block_cache": "rocksdb.block-cache-usage",
                  "table_readers": "rocksdb.estimate-table-readers-mem"}


class Stores(Collector):
    """Memory of the worker's RocksDB stores (every open partition of every table), by kind."""

    def __init__(self, databases: Callable[[], Iterator[Any]]) -> None:
        self.databases = databases

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("phoneverify_rocksdb_memory_bytes",
                                   "Memory RocksDB reports for this worker's stores, by kind.",
                                   labels=["kind"])
        totals = dict.fromkeys(ROCKSDB_MEMORY, 0)
        for db in self.databases():
            for kind, name in ROCKSDB_MEMORY.items():
                try:
                    totals[kind] += db.property_int_value(name) or 0
                except Exception:  # noqa: S112 - a store closing meanwhile: count the others
                    continue
        for kind, total in totals.items():
            family.add_metric([kind], total)
        yield family


def watch_stores(databases: Callable[[], Iterator[Any]]) -> None:
    REGISTRY.register(Stores(databases))


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
