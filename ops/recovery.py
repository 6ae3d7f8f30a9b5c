"""A worker's local stores against the Kafka cluster: Kafka is the source of truth.

The RocksDB stores in ``DATA_DIR`` are a copy of the tables' changelogs; each partition's store
records the last changelog offset it holds, and a restarted worker reads only what follows.
That is right only while the cluster has those offsets. Two checks keep it so, and neither
ever stops the worker:

- **At start** (:func:`check_cluster`, from ``phoneverify worker``): ``DATA_DIR`` records the
  id of the Kafka cluster its stores were built from. A worker started against another one (a
  new or rebuilt cluster, ``BROKERS=3 make run`` after ``make run`` on one checkout, a disk
  restored elsewhere) sets the whole store aside before Faust opens it, and rebuilds it from
  that cluster's changelogs.
- **At every recovery** (:func:`apply`, a patch to Faust's ``Recovery``): a partition whose
  store records an offset past the changelog's last one (the topics were deleted and created
  again, or a log lost its tail) is set aside and restored from the changelog. Faust would
  raise ``ConsistencyError`` and stop the worker ("persisted offset ... higher than the last
  offset in that topic (highwater) (4 > -1)"); with it, the worker's ``make run`` stopped the
  broker. The check replaces Faust's (``recovery_consistency_check`` is off in the app).

  A changelog's last offset that is not known yet is waited for (:func:`known_highwaters`),
  never taken for "empty": Faust's own exactly-once mode read it as -1 before anything was
  fetched, and crashed a worker whose store held more when a second worker joined.

Set aside means moved under ``DATA_DIR/set-aside/<UTC time>/`` with one log line saying what
and why; nothing is deleted. Those folders can be deleted once nobody needs them.

A ``DATA_DIR`` written before the cluster id was recorded is taken as this cluster's (its id
is recorded then); the offset check still sets aside what the cluster lacks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from faust.tables.recovery import Recovery
from faust.types import TP

log = logging.getLogger("phoneverify")

#: Under DATA_DIR: what was set aside, one folder per occasion.
SET_ASIDE_DIR = "set-aside"
#: Under DATA_DIR: the id of the Kafka cluster the stores were built from.
CLUSTER_ID_FILE = "kafka-cluster-id"
#: Under DATA_DIR: Faust's data (the table stores), as the app configures it.
STORE_DIR = "faust"
#: How long one ask for the last offsets may take before it is asked again.
ASK_TIMEOUT = 10.0

_PATCHED = "_phoneverify_recovery_checked"


def _folder(data_dir: Path) -> Path:
    """A new folder under DATA_DIR/set-aside for what is set aside now."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = data_dir / SET_ASIDE_DIR
    folder, n = base / stamp, 1
    while folder.exists():
        n += 1
        folder = base / f"{stamp}-{n}"
    folder.mkdir(parents=True)
    return folder


# ----------------------------------------------------------------------------- at start


async def cluster_id(bootstrap: str, timeout: float = 30.0) -> str:
    """The id of the Kafka cluster at ``bootstrap`` (from its metadata)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        return str((await admin.describe_cluster())["cluster_id"])
    finally:
        await admin.close()


def check_cluster(data_dir: Path, current: str) -> Path | None:
    """Set the store in ``data_dir`` aside if it was built against another cluster than
    ``current``; record ``current``. Returns where the store went, if it was moved."""
    record = data_dir / CLUSTER_ID_FILE
    recorded = record.read_text().strip() if record.exists() else None
    store = data_dir / STORE_DIR
    moved = None
    if recorded is not None and recorded != current and store.exists() and any(store.iterdir()):
        moved = _folder(data_dir) / STORE_DIR
        shutil.move(store, moved)
        log.warning("the local store in %s was built from another Kafka cluster (id %s; this "
                    "one is %s): set aside in %s; the tables are rebuilt from this cluster's "
                    "changelogs", store, recorded, current, moved)
    if recorded != current:
        data_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(current + "\n")
    return moved


# ------------------------------------------------------------------------ at recovery

#: Asks Kafka for the end offsets of some partitions (a value may be None: not known).
Ask = Callable[[set[TP]], Awaitable[Mapping[Any, int | None]]]


async def known_highwaters(ask: Ask, tps: Iterable[TP], *, retry: float = 0.5,
                           patience: float | None = None,
                           on_impatience: Callable[[], None] | None = None) -> dict[TP, int]:
    """The end offset of every partition in ``tps`` (the offset the next record will get),
    asked again until each is known; a partition Kafka cannot answer for yet (no leader, not
    created yet, nothing fetched) is waited for, with one log line. After ``patience``
    seconds ``on_impatience`` is called once (and the wait goes on)."""
    wanted = {TP(tp.topic, tp.partition) for tp in tps}
    known: dict[TP, int] = {}
    began = time.monotonic()
    said = impatient = False
    while missing := wanted - known.keys():
        try:
            answer = await asyncio.wait_for(ask(missing), ASK_TIMEOUT)
        except (TimeoutError, KafkaError):
            answer = {}
        known.update({TP(tp.topic, tp.partition): offset for tp, offset in answer.items()
                      if offset is not None and TP(tp.topic, tp.partition) in missing})
        if not wanted - known.keys():
            break
        if not said:
            said = True
            log.warning("recovery waits for the last offsets of %d changelog partitions, not "
                        "known yet (%s)", len(wanted - known.keys()),
                        ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(missing)))
        if (patience is not None and on_impatience is not None and not impatient
                and time.monotonic() - began > patience):
            impatient = True
            on_impatience()
        await asyncio.sleep(retry)
    return known


def _restart_recovery(recovery: Recovery) -> Callable[[], None]:
    """Start Faust's recovery over (from its first step), before its own limit on a step
    (``broker_request_timeout``) would end it for good without the worker ever being ready."""
    return recovery.signal_recovery_start.set


async def _last_offsets(recovery: Recovery, consumer: Any, tps: Iterable[TP]) -> dict[TP, int]:
    """The offset of each partition's last record (-1: empty), as Faust counts highwaters."""
    patience = float(recovery.app.conf.broker_request_timeout) / 2
    ends = await known_highwaters(lambda missing: consumer.highwaters(*missing), tps,
                                  patience=patience, on_impatience=_restart_recovery(recovery))
    return {tp: end - 1 for tp, end in ends.items()}


async def _build_highwaters(self: Recovery, consumer: Any, tps: set[TP],
                            destination: MutableMapping[TP, int], title: str) -> None:
    """Faust's ``Recovery._build_highwaters``, waiting for what is not known yet (Faust wrote
    -1, "empty", for it)."""
    highwaters = await _last_offsets(self, consumer, tps)
    self.log.info("Highwater for %s changelog partitions:\n%s", title,
                  self._highwater_logtable(highwaters, title=title))
    destination.clear()
    destination.update(highwaters)


def _checked_offsets(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Faust's ``Recovery._build_offsets`` (which starts each partition's restore after the
    offset its store records), first setting aside every partition store that records an
    offset past the changelog's last one: that partition is then restored from the start."""

    @functools.wraps(method)
    async def wrapper(self: Recovery, consumer: Any, tps: set[TP],
                      destination: MutableMapping[TP, int | None], title: str) -> None:
        stored = {tp: destination[tp] for tp in tps if destination.get(tp) is not None}
        if stored:
            last = await _last_offsets(self, consumer, stored)
            ahead = {tp: (offset, last[tp]) for tp, offset in stored.items()
                     if offset is not None and offset > last[tp]}
            if ahead:
                folder = _set_aside(self, ahead)
                for tp in ahead:
                    destination[tp] = None  # read from the changelog's start
                log.warning(
                    "the local store of %d %s changelog partitions holds offsets this Kafka "
                    "cluster does not have (%s: stored offset > last offset): set aside in %s; "
                    "those partitions are restored from the changelog", len(ahead), title,
                    ", ".join(f"{tp.topic}[{tp.partition}] {was} > {end}"
                              for tp, (was, end) in sorted(ahead.items())), folder)
        await method(self, consumer, tps, destination, title)

    setattr(wrapper, _PATCHED, True)
    return wrapper


def _set_aside(recovery: Recovery, tps: Iterable[TP]) -> Path:
    """Close each partition's store, move its files aside, open an empty one in its place."""
    folder = _folder(_data_dir)
    for tp in tps:
        store = recovery.tp_to_table[tp].data  # faust.stores.rocksdb.Store
        db = store._dbs.pop(tp.partition, None)
        if db is not None:
            db.close()
        path = Path(store.partition_path(tp.partition))
        if path.exists():
            shutil.move(path, folder / path.name)
        store._key_index.clear()  # it may name this partition for keys no longer there
        store._db_for_partition(tp.partition)
    return folder


_data_dir = Path(".")


def apply(data_dir: Path) -> None:
    """Patch Faust's ``Recovery`` once (a second call only changes ``data_dir``)."""
    global _data_dir
    _data_dir = Path(data_dir)
    if not getattr(Recovery._build_offsets, _PATCHED, False):
        Recovery._build_offsets = _checked_offsets(Recovery._build_offsets)  # type: ignore[method-assign]
        Recovery._build_highwaters = _build_highwaters  # type: ignore[method-assign]
