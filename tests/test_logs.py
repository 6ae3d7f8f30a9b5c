"""The startup log filter: the harmless aiokafka errors and warnings at startup are INFO,
nothing else."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from aiokafka.errors import (
    GroupCoordinatorNotAvailableError,
    KafkaConnectionError,
    NotLeaderForPartitionError,
)

from phoneverify.ops.logs import (
    COORDINATOR_DEAD,
    COORDINATOR_FAILED,
    COORDINATOR_LOGGER,
    FETCHER_LOGGER,
    OFFSETS_FAILED,
    HarmlessStartupErrors,
    quiet_harmless_startup_errors,
)

coordinator = logging.getLogger(COORDINATOR_LOGGER)


@pytest.fixture
def installed() -> Iterator[HarmlessStartupErrors]:
    harmless = quiet_harmless_startup_errors()
    yield harmless
    coordinator.removeFilter(harmless)
    logging.getLogger(FETCHER_LOGGER).removeFilter(harmless)


def test_coordinator_not_available_at_startup_is_info_with_a_note(
        installed: HarmlessStartupErrors, caplog: pytest.LogCaptureFixture) -> None:
    # What aiokafka logs, as it logs it (consumer/group_coordinator.py).
    coordinator.error(COORDINATOR_FAILED, GroupCoordinatorNotAvailableError())

    [record] = caplog.records
    assert (record.levelno, record.levelname) == (logging.INFO, "INFO")
    assert "GroupCoordinatorNotAvailableError" in record.getMessage()
    assert "harmless at startup" in record.getMessage()


def test_no_leader_yet_for_a_new_topic_is_info_with_a_note(
        installed: HarmlessStartupErrors, caplog: pytest.LogCaptureFixture) -> None:
    # aiokafka/consumer/fetcher.py, while the topic the worker just created gets its leader.
    logging.getLogger(FETCHER_LOGGER).error(OFFSETS_FAILED, 1, NotLeaderForPartitionError())

    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert "NotLeaderForPartitionError" in record.getMessage()
    assert "harmless at startup" in record.getMessage()


def test_the_coordinator_dead_on_a_new_broker_is_info_with_a_note(
        installed: HarmlessStartupErrors, caplog: pytest.LogCaptureFixture) -> None:
    # A newcomer's first `make run` logged it six times as a WARNING, on a broker just started.
    coordinator.warning(COORDINATOR_DEAD, 1, "phoneverify")

    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("Marking the coordinator dead (node 1)for group "
                                          "phoneverify. (harmless at startup")


def test_other_errors_stay_errors(installed: HarmlessStartupErrors,
                                  caplog: pytest.LogCaptureFixture) -> None:
    coordinator.error(COORDINATOR_FAILED, KafkaConnectionError())
    coordinator.error("Something else: %s", GroupCoordinatorNotAvailableError())
    logging.getLogger("aiokafka.consumer.fetcher").error(
        COORDINATOR_FAILED, GroupCoordinatorNotAvailableError())

    assert [r.levelno for r in caplog.records] == [logging.ERROR] * 3
    assert not [r for r in caplog.records if "harmless" in r.getMessage()]


def test_after_startup_it_is_an_error_again(caplog: pytest.LogCaptureFixture) -> None:
    """A coordinator that stays unavailable (say, too few brokers for __consumer_offsets), or
    one lost later (a broker failing over)."""
    harmless = quiet_harmless_startup_errors(window=0)
    try:
        coordinator.error(COORDINATOR_FAILED, GroupCoordinatorNotAvailableError())
        coordinator.warning(COORDINATOR_DEAD, 1, "phoneverify")
    finally:
        coordinator.removeFilter(harmless)

    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.WARNING]
    assert not [r for r in caplog.records if "harmless" in r.getMessage()]


def test_installing_twice_adds_one_filter(installed: HarmlessStartupErrors) -> None:
    again = quiet_harmless_startup_errors()

    assert again is installed
    assert [f for f in coordinator.filters if isinstance(f, HarmlessStartupErrors)] == [again]


def test_late_ticks_are_a_warning_in_words(caplog: pytest.LogCaptureFixture) -> None:
    from phoneverify.ops.logs import OVERLAPPING, TIMERS_LOGGER, LateTicksInWords

    timers = logging.getLogger(TIMERS_LOGGER)
    late = LateTicksInWords()
    timers.addFilter(late)
    try:  # as mode logs it (mode/timers.py), for the ticker and for another timer
        timers.warning(OVERLAPPING, "phoneverify.agents.ticker.ticker", 1.0, 1.4184183)
        timers.warning(OVERLAPPING, "Monitor.sampler", 1.0, 1.2)
    finally:
        timers.removeFilter(late)

    ticker, other = caplog.records
    assert ticker.levelno == logging.WARNING
    assert ticker.getMessage() == (
        "ticks are late: sending one took 1.4 s, longer than TICK_INTERVAL_SECONDS (1 s), so "
        "expiries ran up to that much late (a busy machine, or a slow broker)")
    assert other.getMessage().startswith("Timer Monitor.sampler is overlapping")


# ---------------------------------------------------------------- Faust's stall detector

def test_a_stall_is_records_waiting_at_every_check() -> None:
    from phoneverify.ops.faust_fixes import waiting_since

    # Read to the end (or nothing known yet): nothing waits.
    assert waiting_since(None, 10.0, highwater=5, position=5, gap=7.5) is None
    assert waiting_since((1.0, 9.0), 10.0, highwater=None, position=None, gap=7.5) is None
    # A record that just came: waiting from now, not since the worker started.
    assert waiting_since(None, 10.0, highwater=6, position=5, gap=7.5) == 10.0
    # Still waiting at the next check: since the first.
    assert waiting_since((10.0, 10.0), 12.5, highwater=9, position=7, gap=7.5) == 10.0
    # Last seen waiting long ago (the partition was elsewhere): from now.
    assert waiting_since((10.0, 10.0), 100.0, highwater=9, position=7, gap=7.5) == 100.0


def test_text_lines_end_without_spaces() -> None:
    from phoneverify.ops.logs import PlainTextFormatter, TextFormatter, text_logging

    formats = text_logging()["formatters"]
    for formatter in (TextFormatter(fmt=formats["colored"]["format"]),
                      PlainTextFormatter(fmt=formats["default"]["format"])):
        def line(message: str, formatter: logging.Formatter = formatter, **data: object) -> str:
            record = logging.LogRecord("phoneverify", logging.INFO, __file__, 1, message, (),
                                       None)
            if data:
                record.data = data
            return formatter.format(record)

        sms = line("[sms to +14255550100 for x] Your verification code is 1708")
        assert sms.endswith("code is 1708")
        table = line("Updating subscribed topics to: \n+----+ \n| a  | ")
        assert table.endswith("to:\n+----+\n| a  |")
        assert line("with data", n=1).endswith("with data n=1")
