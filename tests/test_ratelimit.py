"""The per-phone-number sliding-window rate limit, given-when-then, and its one property."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import hypothesis
from hypothesis import settings
from hypothesis import strategies as st

from phoneverify.models.ratelimit import Window, admit

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
LIMIT = 5
SECONDS = 600.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def given(*starts: tuple[str, float]) -> Window:
    """The window after admitting ``(instance_id, seconds after T0)`` starts, in order."""
    window = Window()
    for iid, seconds in starts:
        _, window = admit(window, iid, at(seconds), LIMIT, SECONDS)
    return window


def test_five_starts_in_the_window_are_admitted_the_sixth_is_limited():
    window = Window()
    for n in range(LIMIT):
        verdict, window = admit(window, f"v{n}", at(n * 10), LIMIT, SECONDS)
        assert verdict == "admitted"
    verdict, after = admit(window, "v5", at(60), LIMIT, SECONDS)
    assert verdict == "rate_limited"
    assert after == window  # a limited start is not counted
    verdict, _ = admit(after, "v6", at(SECONDS - 1), LIMIT, SECONDS)
    assert verdict == "rate_limited"


def test_a_redelivered_start_stays_admitted_and_is_not_counted_twice():
    window = given(("v0", 0), ("v1", 1))
    verdict, after = admit(window, "v1", at(1), LIMIT, SECONDS)
    assert verdict == "admitted"
    assert after == window
    # Even at the limit, a start already admitted keeps its verdict.
    full = given(*((f"v{n}", n) for n in range(LIMIT)))
    verdict, after = admit(full, "v4", at(4), LIMIT, SECONDS)
    assert (verdict, after) == ("admitted", full)
    verdict, after = admit(full, "v9", at(5), LIMIT, SECONDS)
    assert verdict == "rate_limited"
    # A redelivered limited start stays limited while the window is full.
    assert admit(after, "v9", at(5), LIMIT, SECONDS) == ("rate_limited", full)


def test_entries_older_than_the_window_drop_out():
    full = given(*((f"v{n}", n) for n in range(LIMIT)))
    # v0 (at 0 s) is exactly one window old at 600 s: it no longer counts.
    verdict, after = admit(full, "late", at(SECONDS), LIMIT, SECONDS)
    assert verdict == "admitted"
    # It is still kept (for two windows), for starts that arrive late.
    assert [iid for iid, _ in after.admitted] == ["v0", "v1", "v2", "v3", "v4", "late"]
    # Just before, all five still count.
    verdict, _ = admit(full, "early", at(SECONDS - 0.001), LIMIT, SECONDS)
    assert verdict == "rate_limited"
    # Long after, the window is empty again.
    verdict, after = admit(full, "much-later", at(10 * SECONDS), LIMIT, SECONDS)
    assert (verdict, after.admitted) == ("admitted", (("much-later", at(10 * SECONDS)),))


def test_the_window_survives_json():
    window = given(*((f"v{n}", n * 1.5) for n in range(LIMIT)))
    assert Window.model_validate_json(window.model_dump_json()) == window


def admitted_times(starts: list[tuple[str, datetime]], limit: int,
                   seconds: float) -> dict[str, datetime]:
    """The times of the starts whose first verdict is "admitted": those that send an SMS (the
    actor acts on an instance's first verdict; a later one finds it started or failed)."""
    window = Window()
    first: dict[str, tuple[str, datetime]] = {}
    for iid, when in starts:
        verdict, window = admit(window, iid, when, limit, seconds)
        first.setdefault(iid, (verdict, when))
    return {iid: when for iid, (verdict, when) in first.items() if verdict == "admitted"}


def assert_no_window_over(times: list[datetime], limit: int, seconds: float) -> None:
    span = timedelta(seconds=seconds)
    times = sorted(times)
    for i, end in enumerate(times):  # every window (end - seconds, end] ending on an admission
        inside = [t for t in times[: i + 1] if t > end - span]
        assert len(inside) <= limit, (end, inside)


@settings(max_examples=200, deadline=None)
@hypothesis.given(
    limit=st.integers(1, 4),
    seconds=st.sampled_from([1.0, 10.0, 600.0]),
    steps=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 3000)), max_size=40),
)
def test_no_window_admits_more_than_the_limit(limit, seconds, steps):
    """Starts in time order (as one phone number's partition delivers them), with redeliveries
    (an instance id seen before comes again at its first time)."""
    first_seen: dict[str, datetime] = {}
    starts = []
    clock = T0
    for iid_n, gap_ms in steps:
        iid = f"v{iid_n}"
        if iid in first_seen:
            starts.append((iid, first_seen[iid]))  # a redelivery carries its record time
            continue
        clock += timedelta(milliseconds=gap_ms * seconds)
        first_seen[iid] = clock
        starts.append((iid, clock))
    admitted = admitted_times(starts, limit, seconds)
    assert_no_window_over(list(admitted.values()), limit, seconds)


def test_a_late_start_cannot_overfill_a_window():
    # limit 2 per 10 s: a and b at 100 s and 101 s; c at 112 s prunes both; d stamped 103 s
    # (a producer whose clock is behind) arrives last and is admitted: a, b, d all lie in
    # (93 s, 103 s].
    starts = [("a", at(100)), ("b", at(101)), ("c", at(112)), ("d", at(103))]
    admitted = admitted_times(starts, 2, 10.0)
    assert_no_window_over(list(admitted.values()), 2, 10.0)
