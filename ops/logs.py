"""Logging adjustments for the worker.

The first worker on a new broker logs, from aiokafka's group coordinator::

    [ERROR] Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError

The group coordinator is not elected yet (the broker is still creating ``__consumer_offsets``);
aiokafka retries and the worker goes on to join the group a moment later. That one message,
during startup only, is not an error: :func:`quiet_harmless_startup_errors` logs it at INFO
with a note saying so. Later, or with any other error, the record is left as it is: a
coordinator that stays unavailable (for example ``__consumer_offsets`` asking for more
replicas than there are brokers) must still show as an error. Likewise aiokafka's
"Failed fetch offsets ... NotLeaderForPartitionError" for a topic the worker has just created
(the broker names a leader a moment before that leader serves it), and the warnings
"Marking the coordinator dead" that a brand-new broker causes while it loads
``__consumer_offsets`` (six of them, in a newcomer's first ``make run``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from aiokafka.errors import GroupCoordinatorNotAvailableError, NotLeaderForPartitionError
from colorlog import TTYColoredFormatter
from mode.utils.logging import DEFAULT_COLORS, ExtensionFormatter

COORDINATOR_LOGGER = "aiokafka.consumer.group_coordinator"
COORDINATOR_FAILED = "Group Coordinator Request failed: %s"
NOTE = (" (harmless at startup: the group coordinator is not elected yet on a new broker;"
        " the consumer retries)")
FETCHER_LOGGER = "aiokafka.consumer.fetcher"
OFFSETS_FAILED = "Failed fetch offsets from %s: %s"
OFFSETS_NOTE = (" (harmless at startup: a partition's leader is not ready yet, on a topic"
                " just created or a broker failing over; the consumer retries)")
COORDINATOR_DEAD = "Marking the coordinator dead (node %s)for group %s."
DEAD_NOTE = (" (harmless at startup: on a new broker the group's coordinator is still loading"
             " __consumer_offsets and turns the worker away; the consumer finds it again)")
STARTUP_SECONDS = 60.0

#: What is harmless at startup: (logger, message, the error among its arguments or None, the
#: note).
HARMLESS = ((COORDINATOR_LOGGER, COORDINATOR_FAILED, GroupCoordinatorNotAvailableError, NOTE),
            (FETCHER_LOGGER, OFFSETS_FAILED, NotLeaderForPartitionError, OFFSETS_NOTE),
            (COORDINATOR_LOGGER, COORDINATOR_DEAD, None, DEAD_NOTE))


class HarmlessStartupErrors(logging.Filter):
    """Downgrades the errors and warnings in :data:`HARMLESS` to INFO, with their note, within
    ``window`` seconds of install."""

    def __init__(self, window: float = STARTUP_SECONDS) -> None:
        super().__init__()
        self.until = time.monotonic() + window

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or time.monotonic() >= self.until:
            return True
        for logger, message, error, note in HARMLESS:
            if (record.name == logger and record.msg == message
                    and (error is None or (isinstance(record.args, tuple) and record.args
                                           and isinstance(record.args[-1], error)))):
                record.levelno = logging.INFO
                record.levelname = logging.getLevelName(logging.INFO)
                record.msg = message + note
        return True


def quiet_harmless_startup_errors(window: float = STARTUP_SECONDS) -> HarmlessStartupErrors:
    """Install the filter on aiokafka's loggers (once; a second call renews the window). Call
    it when the worker starts; returns the filter."""
    loggers = [logging.getLogger(name) for name in dict.fromkeys(n for n, *_ in HARMLESS)]
    for existing in loggers[0].filters:
        if isinstance(existing, HarmlessStartupErrors):
            existing.until = time.monotonic() + window
            return existing
    installed = HarmlessStartupErrors(window)
    for logger in loggers:
        logger.addFilter(installed)
    return installed


# ---------------------------------------------------------------- LOG_FORMAT=text

#: mode's format, whose ``" %(extra)s"`` ended every line with a space (a script reading the
#: last field of a line, such as the code of a console SMS, found nothing): the separator is
#: now part of the extra, present only when there is one.
TEXT_FORMAT = "[%(asctime)s] [%(process)s] [%(levelname)s] %(log_color)s%(message)s%(extra)s"


def _extra(record: logging.LogRecord) -> str:
    """mode's extra data (``extra={"data": ...}``), with its separator, or nothing."""
    data = record.__dict__.get("data") or {}
    return " " + ", ".join(f"{k}={v!r}" for k, v in data.items()) if data else ""


def _no_trailing_spaces(text: str) -> str:
    # Faust's own multi-line messages (tables) end some lines with spaces too.
    if " \n" in text:
        return "\n".join(line.rstrip() for line in text.split("\n"))
    return text.rstrip(" ")


class TextFormatter(ExtensionFormatter):
    """mode's console formatter (colours on a terminal), without trailing spaces."""

    def format(self, record: logging.LogRecord) -> str:
        self._format_args(record)  # as mode does
        record.extra = _extra(record)
        return _no_trailing_spaces(TTYColoredFormatter.format(self, record))


class PlainTextFormatter(logging.Formatter):
    """The same for a log file (``--logfile``), without colours."""

    def format(self, record: logging.LogRecord) -> str:
        record.extra = _extra(record)
        return _no_trailing_spaces(super().format(record))


def text_logging() -> dict[str, Any]:
    """Faust's ``logging_config`` for text lines: mode's handlers, these formatters."""
    return {"merge": True, "formatters": {
        "colored": {"()": f"{__name__}.TextFormatter", "format": TEXT_FORMAT,
                    "log_colors": DEFAULT_COLORS, "stream": sys.stdout},
        "default": {"()": f"{__name__}.PlainTextFormatter",
                    "format": TEXT_FORMAT.replace("%(log_color)s", "")}}}


# ---------------------------------------------------------------- LOG_FORMAT=json

#: Fields a log record may carry (``extra=``) that a JSON line keeps.
FIELDS = ("instance_id", "status", "reason", "attempts", "duration_s", "topic", "partition",
          "offset")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({name: getattr(record, name) for name in FIELDS if hasattr(record, name)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)

    converter = time.gmtime  # type: ignore[assignment]


def json_logging(level: str) -> dict[str, object]:
    """A ``logging.config.dictConfig`` for JSON lines on standard output."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json",
                                "stream": "ext://sys.stdout"}},
        "root": {"level": level.upper(), "handlers": ["stdout"]},
    }


class BadRequestsAreInfo(logging.Filter):
    """aiohttp logs each malformed request (a bad request line, an invalid header) as an
    error with a traceback: anyone could fill the log. One line at INFO says enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "bad HTTP request refused: %s", (error.message,)
            record.exc_info = record.exc_text = None
        return True


def quiet_bad_requests() -> None:
    logging.getLogger("aiohttp.server").addFilter(BadRequestsAreInfo())


# ---------------------------------------------------------------- a starved event loop

#: The logger of Faust's consumer thread, the one ``mode.threads.ServiceThread`` of a worker.
KEEPALIVE_LOGGER = "faust.transport.drivers.aiokafka"
KEEPALIVE_FAILED = "Thread keepalive is not responding..."
STARVED_NOTE = ("the worker's event loop did not run for over 3 s (the machine was busy, or the "
                "process was paused: Ctrl-Z, a debugger); verifications waited, none was lost. "
                "If this repeats, the worker needs more CPU")


class StarvedLoopIsAWarning(logging.Filter):
    """mode checks every 1.1 s that the worker's event loop ran and, after a gap of over 3 s,
    logs ``[ERROR] Thread keepalive is not responding...``. The loop could not run: a busy
    laptop, Ctrl-Z and ``fg``, a debugger. Records wait and are processed once it runs again,
    so a person should know it happened, not read it as an outage: a WARNING saying what it
    means."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).endswith(KEEPALIVE_FAILED):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = STARVED_NOTE, ()
        return True


def quiet_starved_loop() -> None:
    logging.getLogger(KEEPALIVE_LOGGER).addFilter(StarvedLoopIsAWarning())


# ---------------------------------------------------------------- a rebalance

REBALANCING = "Heartbeat failed for group %s because it is rebalancing"
REBALANCING_NOTE = (" (a worker joined or left the group: the partitions are being shared out "
                    "again; normal, the heartbeats go on)")


class RebalanceIsInfo(logging.Filter):
    """aiokafka warns ``Heartbeat failed for group ... because it is rebalancing`` at every
    worker that stays when another joins or leaves: that is how a consumer learns of a
    rebalance, which is how Kafka moves partitions, not a failure. INFO, with a note."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.msg == REBALANCING:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = REBALANCING + REBALANCING_NOTE
        return True


def quiet_rebalances() -> None:
    logging.getLogger(COORDINATOR_LOGGER).addFilter(RebalanceIsInfo())


# ---------------------------------------------------------------- a late tick

TIMERS_LOGGER = "mode.timers"
OVERLAPPING = "Timer %s is overlapping (interval=%r runtime=%r)"
LATE_TICKS = ("ticks are late: sending one took %.1f s, longer than TICK_INTERVAL_SECONDS "
              "(%g s), so expiries ran up to that much late (a busy machine, or a slow broker)")


class LateTicksInWords(logging.Filter):
    """mode warns ``Timer phoneverify.agents.ticker.ticker is overlapping (interval=1.0
    runtime=1.418...)`` when the ticker's sends take longer than its interval (seen on a
    loaded laptop in a newcomer's first ``make run``). It stays a WARNING (expiry is promised
    within one tick interval), said in words: what is late, by how much, and why."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (record.msg == OVERLAPPING and isinstance(args, tuple) and len(args) == 3
                and str(args[0]).endswith(".ticker")):
            record.msg, record.args = LATE_TICKS, (float(args[2]), float(args[1]))
        return True


def quiet_late_ticks() -> None:
    logging.getLogger(TIMERS_LOGGER).addFilter(LateTicksInWords())
