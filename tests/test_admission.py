"""Per-number admission (rules 9 and 11), given-when-then, and the properties that make them exact.

Pure and fast: ``admit``, ``settle``, ``prune`` and ``next_due`` over one number's state; starts
are named by their origin (``topic:partition:offset`` in the service, any string here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import hypothesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from phoneverify.models.admission import (
    Limits,
    Number,
    Reservation,
    Spent,
    Verdict,
    admit,
    next_due,
    prune,
    settle,
)

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
LIMIT = 5
SECONDS = 600.0
DAY = 86400.0
HOLD = 11.0  # the early-command grace (10 s) plus a tick interval (1 s)
TIMEOUT = 90.0

#: Only the rate limit matters: a budget no test here can use up.
RATE = Limits(starts=LIMIT, starts_window=SECONDS, guesses=10**6, guess_window=DAY,
              max_attempts=4, timeout=TIMEOUT, hold=HOLD)
#: The contract's defaults: 5 starts per 600 s, 20 wrong codes per day, 4 attempts.
DEFAULTS = Limits(starts=LIMIT, starts_window=SECONDS, guesses=20, guess_window=DAY,
                  max_attempts=4, timeout=TIMEOUT, hold=HOLD)
#: A small budget (the rate limit out of the way): 10 wrong codes per day.
BUDGET = DEFAULTS.model_copy(update={"starts": 10**6, "guesses": 10})


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def given(*starts: tuple[str, float], limits: Limits = RATE) -> Number:
    """The number after admitting ``(origin, seconds after T0)`` starts, in order."""
    number = Number()
    for origin, seconds in starts:
        _, number = admit(number, origin, at(seconds), limits)
    return number


# ---------------------------------------------------------------- rate limit (rule 9)


def test_five_starts_in_the_window_are_admitted_the_sixth_is_limited():
    number = Number()
    for n in range(LIMIT):
        verdict, number = admit(number, f"v{n}", at(n * 10), RATE)
        assert verdict == Verdict("admitted", 4)
    verdict, after = admit(number, "v5", at(60), RATE)
    assert verdict.verdict == "rate_limited"
    assert verdict.attempts == 0
    assert verdict.retry_after == SECONDS - 60  # the first start leaves the window at 600 s
    assert after == number  # a limited start is not counted
    verdict, _ = admit(after, "v6", at(SECONDS - 1), RATE)
    assert verdict == Verdict("rate_limited", 0, 1.0)


def test_a_redelivered_start_keeps_its_verdict_and_attempts_and_counts_once():
    number = given(("v0", 0), ("v1", 1))
    verdict, after = admit(number, "v1", at(1), RATE)
    assert verdict == Verdict("admitted", 4)
    assert after == number
    # Even at the limit, a start already admitted keeps its verdict.
    full = given(*((f"v{n}", n) for n in range(LIMIT)))
    verdict, after = admit(full, "v4", at(4), RATE)
    assert (verdict, after) == (Verdict("admitted", 4), full)
    verdict, after = admit(full, "v9", at(5), RATE)
    assert verdict.verdict == "rate_limited"
    # A redelivered limited start stays limited while the window is full.
    assert admit(after, "v9", at(5), RATE) == (verdict, full)


def test_a_redelivered_start_keeps_its_attempts_even_when_the_budget_moved():
    number = given(("a", 0), ("b", 1), limits=BUDGET)
    verdict, number = admit(number, "c", at(2), BUDGET)
    assert verdict == Verdict("admitted", 2)  # 10 - 4 - 4
    assert admit(number, "a", at(0), BUDGET) == (Verdict("admitted", 4), number)
    assert admit(number, "c", at(2), BUDGET) == (Verdict("admitted", 2), number)
    assert [r.origin for r in number.open] == ["a", "b", "c"]
    assert [o for o, _ in number.starts] == ["a", "b", "c"]


def test_starts_older_than_the_window_drop_out():
    full = given(*((f"v{n}", n) for n in range(LIMIT)))
    # v0 (at 0 s) is exactly one window old at 600 s: it no longer counts.
    verdict, after = admit(full, "late", at(SECONDS), RATE)
    assert verdict.verdict == "admitted"
    # It is still kept (for two windows), for starts that arrive late.
    assert [origin for origin, _ in after.starts] == ["v0", "v1", "v2", "v3", "v4", "late"]
    # Just before, all five still count.
    verdict, _ = admit(full, "early", at(SECONDS - 0.001), RATE)
    assert verdict.verdict == "rate_limited"
    # Long after, the window is empty again.
    verdict, after = admit(full, "much-later", at(10 * SECONDS), RATE)
    assert verdict.verdict == "admitted"
    assert after.starts == (("much-later", at(10 * SECONDS)),)


def test_a_start_stamped_before_admitted_ones_is_counted_against_them():
    # Starts for one number come from several partitions: slightly out of time order.
    full = given(*((f"v{n}", 100 + n) for n in range(LIMIT)))  # 100 s to 104 s
    verdict, _ = admit(full, "early", at(104 - SECONDS + 0.001), RATE)
    assert verdict.verdict == "rate_limited"  # it and all five would lie in one window
    verdict, _ = admit(full, "earlier", at(104 - SECONDS), RATE)
    assert verdict.verdict == "admitted"  # v4 at 104 s is a full window later


def test_the_number_survives_json():
    number = given(*((f"v{n}", n * 1.5) for n in range(LIMIT)), limits=DEFAULTS)
    number = settle(number, "v1", (at(2), at(3)))
    assert number.open and number.spent and number.starts
    assert Number.model_validate_json(number.model_dump_json()) == number


def admitted_times(starts: list[tuple[str, datetime]], limits: Limits) -> dict[str, datetime]:
    """The times of the starts whose first verdict is "admitted": those that send an SMS (the
    actor acts on an instance's first verdict; a later one finds it started or failed)."""
    number = Number()
    first: dict[str, tuple[str, datetime]] = {}
    for origin, when in starts:
        verdict, number = admit(number, origin, when, limits)
        first.setdefault(origin, (verdict.verdict, when))
    return {o: when for o, (verdict, when) in first.items() if verdict == "admitted"}


def assert_no_window_over(times: list[datetime], limit: int, seconds: float) -> None:
    """No window ``(end - seconds, end]`` holds more than ``limit`` of ``times``."""
    span = timedelta(seconds=seconds)
    times = sorted(times)
    for i, end in enumerate(times):  # the fullest windows end on one of the times
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
    (an origin seen before comes again at its first time)."""
    limits = RATE.model_copy(update={"starts": limit, "starts_window": seconds})
    first_seen: dict[str, datetime] = {}
    starts = []
    clock = T0
    for n, gap_ms in steps:
        origin = f"v{n}"
        if origin in first_seen:
            starts.append((origin, first_seen[origin]))  # a redelivery carries its record time
            continue
        clock += timedelta(milliseconds=gap_ms * seconds)
        first_seen[origin] = clock
        starts.append((origin, clock))
    admitted = admitted_times(starts, limits)
    assert_no_window_over(list(admitted.values()), limit, seconds)


def test_a_late_start_cannot_overfill_a_window():
    # limit 2 per 10 s: a and b at 100 s and 101 s; c at 112 s; d stamped 103 s (a producer
    # whose clock is behind) arrives last: a, b, d would all lie in (93 s, 103 s].
    limits = RATE.model_copy(update={"starts": 2, "starts_window": 10.0})
    starts = [("a", at(100)), ("b", at(101)), ("c", at(112)), ("d", at(103))]
    admitted = admitted_times(starts, limits)
    assert "d" not in admitted
    assert_no_window_over(list(admitted.values()), 2, 10.0)


# ---------------------------------------------------------------- guess budget (rule 11)


def test_a_start_is_admitted_with_max_attempts_while_the_budget_has_them():
    verdict, number = admit(Number(), "a", T0, DEFAULTS)
    assert verdict == Verdict("admitted", 4)
    assert number.open == (Reservation(origin="a", attempts=4, at=T0),)


def test_attempts_are_the_smaller_of_max_attempts_and_the_budget_left():
    number = Number()
    attempts = []
    for n in range(3):
        verdict, number = admit(number, f"v{n}", at(n), BUDGET)
        attempts.append(verdict.attempts)
    assert attempts == [4, 4, 2]  # 10 = 4 + 4 + 2: concurrent starts share the budget
    assert sum(r.attempts for r in number.open) == BUDGET.guesses


def test_a_start_with_no_budget_left_is_rate_limited_until_a_reservation_returns():
    number = given(("v0", 0), ("v1", 1), ("v2", 2), limits=BUDGET)
    verdict, after = admit(number, "v3", at(5), BUDGET)
    assert verdict == Verdict("rate_limited", 0, TIMEOUT - 5)  # v0 concludes by 90 s
    assert after == number  # nothing reserved, nothing counted
    assert [o for o, _ in after.starts] == ["v0", "v1", "v2"]


def test_a_start_with_no_budget_left_waits_for_the_first_wrong_code_to_leave_the_window():
    number = given(("v0", 0), ("v1", 1), ("v2", 2), limits=BUDGET)
    number = settle(number, "v0", (at(10), at(11), at(12), at(13)))
    number = settle(number, "v1", (at(20), at(21), at(22), at(23)))
    number = settle(number, "v2", (at(30), at(31)))
    verdict, _ = admit(number, "v3", at(100), BUDGET)
    # The first wrong code (10 s) stops counting one window plus the hold margin later.
    assert verdict == Verdict("rate_limited", 0, 10 + DAY + HOLD - 100)
    # Exactly then it no longer counts: one attempt.
    verdict, _ = admit(number, "v3", at(10 + DAY + HOLD), BUDGET)
    assert verdict == Verdict("admitted", 1)


def test_settle_returns_the_attempts_not_spent_and_keeps_the_wrong_codes():
    number = given(("v0", 0), ("v1", 1), ("v2", 2), limits=BUDGET)
    number = settle(number, "v0", (at(3),))  # one wrong code, then verified
    assert [r.origin for r in number.open] == ["v1", "v2"]
    assert number.spent == (Spent(origin="v0", at=(at(3),)),)
    verdict, number = admit(number, "v3", at(10), BUDGET)
    assert verdict == Verdict("admitted", 3)  # 10 - 1 spent - 4 - 2 reserved
    number = settle(number, "v1", ())
    number = settle(number, "v2", ())
    number = settle(number, "v3", ())
    verdict, _ = admit(number, "v4", at(20), BUDGET)
    assert verdict == Verdict("admitted", 4)
    assert number.spent == (Spent(origin="v0", at=(at(3),)),)  # no wrong codes: nothing kept


def test_wrong_codes_count_for_the_window_and_the_hold_margin():
    limits = BUDGET.model_copy(update={"guesses": 4})
    number = settle(given(("v0", 0), limits=limits), "v0",
                    (at(1), at(2), at(3), at(4)))
    for seconds in (5, DAY, 1 + DAY + HOLD - 0.001):
        verdict, _ = admit(number, "v1", at(seconds), limits)
        assert verdict.verdict == "rate_limited", seconds
    assert admit(number, "v1", at(1 + DAY + HOLD), limits)[0] == Verdict("admitted", 1)
    assert admit(number, "v1", at(4 + DAY + HOLD), limits)[0] == Verdict("admitted", 4)


def test_a_wrong_code_held_before_its_start_cannot_share_a_window_with_uncounted_ones():
    # Why the budget looks ``hold`` further back than one window: a response that overtook
    # its start is applied when the start comes, at its own (earlier) time.
    limits = BUDGET.model_copy(update={"guesses": 4, "guess_window": 100.0, "hold": 3.0})
    number = settle(given(("v0", 0), limits=limits), "v0", (at(0), at(0), at(0), at(0)))
    verdict, _ = admit(number, "v1", at(102.5), limits)
    # Admitted, v1 could count a wrong code held from 99.5 s: five in (-0.5 s, 99.5 s].
    assert verdict.verdict == "rate_limited"
    verdict, _ = admit(number, "v1", at(103), limits)
    assert verdict == Verdict("admitted", 4)  # its earliest wrong code is at 100 s


def test_settle_is_idempotent():
    number = given(("v0", 0), ("v1", 1), limits=DEFAULTS)
    once = settle(number, "v0", (at(5), at(6)))
    assert settle(once, "v0", (at(5), at(6))) == once
    assert settle(settle(once, "v1", ()), "v1", ()) == settle(once, "v1", ())


def test_settle_of_a_start_never_admitted_or_without_wrong_codes_changes_nothing():
    number = given(("v0", 0), limits=DEFAULTS)
    assert settle(number, "unknown", ()) == number
    assert settle(Number(), "unknown", ()) == Number()


def test_a_start_redelivered_after_its_settlement_is_counted_once_in_the_rate_window():
    number = settle(given(("v0", 0), limits=DEFAULTS), "v0", (at(1),))
    verdict, after = admit(number, "v0", T0, DEFAULTS)
    assert verdict.verdict == "admitted"
    assert after.starts == number.starts  # the same start, counted once
    # It reserves again (the actor settles again with the same wrong codes): never less safe.
    again = settle(after, "v0", (at(1),))
    assert again == number


def test_the_default_budget_allows_twenty_wrong_codes_a_day_across_verifications():
    number, wrong = Number(), 0
    seconds = 0.0
    while True:
        verdict, number = admit(number, f"v{seconds:g}", at(seconds), DEFAULTS)
        if verdict.verdict == "rate_limited":
            break
        codes = tuple(at(seconds + k + 1) for k in range(verdict.attempts))
        number = settle(number, f"v{seconds:g}", codes)  # all wrong
        wrong += len(codes)
        seconds += SECONDS  # one start per rate window: only the budget limits
    assert wrong == DEFAULTS.guesses


# ---------------------------------------------------------------- prune, next_due, is_empty


def test_an_empty_number_is_empty_and_never_due():
    assert Number().is_empty
    assert next_due(Number(), DEFAULTS) is None
    assert prune(Number(), at(1e6), DEFAULTS) == Number()


def test_an_open_reservation_is_kept_until_its_settlement():
    _, number = admit(Number(), "v0", T0, DEFAULTS)
    pruned = prune(number, at(10 * DAY), DEFAULTS)
    assert pruned.starts == ()
    assert pruned.open == number.open
    assert not pruned.is_empty
    assert next_due(pruned, DEFAULTS) is None  # a settlement will touch it
    assert settle(pruned, "v0", ()).is_empty


def test_prune_forgets_starts_after_two_rate_windows():
    number = settle(given(("v0", 0), ("v1", 100), limits=DEFAULTS), "v0", ())
    number = settle(number, "v1", ())
    assert next_due(number, DEFAULTS) == at(2 * SECONDS)
    assert prune(number, at(2 * SECONDS - 1), DEFAULTS) == number
    pruned = prune(number, at(2 * SECONDS), DEFAULTS)
    assert pruned.starts == (("v1", at(100)),)
    assert next_due(pruned, DEFAULTS) == at(100 + 2 * SECONDS)
    assert prune(pruned, at(100 + 2 * SECONDS), DEFAULTS).is_empty


KEPT = DAY + HOLD + SECONDS  # a wrong code's window, the hold margin, the late allowance


def test_prune_forgets_wrong_codes_after_the_window_the_hold_margin_and_a_rate_window():
    number = settle(given(("v0", 0), limits=DEFAULTS), "v0", (at(1), at(2)))
    number = prune(number, at(2 * SECONDS), DEFAULTS)  # the start leaves first
    assert number.starts == ()
    assert next_due(number, DEFAULTS) == at(1 + KEPT)
    assert prune(number, at(KEPT), DEFAULTS) == number
    pruned = prune(number, at(1 + KEPT), DEFAULTS)
    assert pruned.spent == (Spent(origin="v0", at=(at(2),)),)
    assert next_due(pruned, DEFAULTS) == at(2 + KEPT)
    gone = prune(pruned, at(2 + KEPT), DEFAULTS)
    assert gone.is_empty
    assert next_due(gone, DEFAULTS) is None


def test_prune_forgets_nothing_that_a_start_stamped_up_to_a_rate_window_earlier_counts():
    limits = BUDGET.model_copy(update={"max_attempts": BUDGET.guesses})  # attempts: all left
    number = given(("v0", 0), ("v1", 50), limits=limits)
    number = settle(settle(number, "v0", (at(1), at(2), at(3))), "v1", (at(60),))
    for now in (0, 100, 2 * SECONDS, DAY, DAY + HOLD + 2, DAY + HOLD + 61, KEPT + 2, 3 * DAY):
        pruned = prune(number, at(now), limits)
        for later in (now - SECONDS, now - 1, now, now + 1, now + DAY):
            assert admit(pruned, "new", at(later), limits)[0] == admit(
                number, "new", at(later), limits)[0], (now, later)


def test_a_start_that_reaches_admission_after_a_later_tick_still_counts_every_wrong_code():
    # Found by the property below: a tick at 5.75 s forgot the wrong code at 0 s, which a
    # start stamped 5.25 s (on its way when the tick came) must count: its own wrong code may
    # be held from 4.75 s, in one 5 s window with the one at 0 s.
    limits = Limits(starts=100, starts_window=5.0, guesses=1, guess_window=5.0, max_attempts=1,
                    timeout=1.0, hold=0.5)
    number = settle(admit(Number(), "s0", T0, limits)[1], "s0", (T0,))
    assert admit(number, "s1", at(5.25), limits)[0].verdict == "rate_limited"
    pruned = prune(number, at(5.75), limits)
    assert admit(pruned, "s1", at(5.25), limits)[0].verdict == "rate_limited"


@settings(max_examples=200, deadline=None)
@hypothesis.given(
    starts=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4000)), max_size=12),
    wrong=st.lists(st.integers(-20, 100), max_size=12),
    now=st.integers(0, 5000),
)
def test_next_due_is_when_prune_next_changes_something(starts, wrong, now):
    limits = DEFAULTS.model_copy(update={"starts_window": 60.0, "guess_window": 1000.0,
                                         "hold": 10.0, "guesses": 10**6})
    number = Number()
    for n, seconds in starts:
        _, number = admit(number, f"v{n}", at(seconds), limits)
    if starts:
        number = settle(number, f"v{starts[0][0]}", tuple(at(s) for s in wrong))
    number = prune(number, at(now), limits)
    due = next_due(number, limits)
    if due is None:
        assert number.starts == () and number.spent == ()
        return
    assert due > at(now)  # what was due is gone
    before = due - timedelta(milliseconds=1)
    assert prune(number, before, limits) == number
    assert prune(number, due, limits) != number


# ---------------------------------------------------------------- the budget's property


@dataclass
class Run:
    """A verification that an admitted start runs: its reservation and its wrong codes."""

    origin: str
    start: datetime
    attempts: int
    wrong: tuple[datetime, ...]
    settled: bool = False


@dataclass
class World:
    limits: Limits
    number: Number = field(default_factory=Number)
    #: Each origin's first verdict: what the actor acts on (a redelivery finds it started).
    first: dict[str, Verdict] = field(default_factory=dict)
    runs: dict[str, Run] = field(default_factory=dict)
    times: dict[str, datetime] = field(default_factory=dict)


QUARTER = timedelta(milliseconds=250)  # times on a grid, so that boundaries are hit


@st.composite
def guess_limits(draw: st.DrawFn) -> Limits:
    return Limits(starts=draw(st.sampled_from([2, 100])), starts_window=5.0,
                  guesses=draw(st.integers(1, 8)), guess_window=draw(st.sampled_from([5., 20.])),
                  max_attempts=draw(st.integers(1, 4)), timeout=draw(st.sampled_from([1., 3.])),
                  hold=draw(st.sampled_from([0.0, 0.5, 2.0])))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@hypothesis.given(limits=guess_limits(), data=st.data(),
                  steps=st.lists(st.sampled_from(["start", "start", "start", "again", "settle",
                                                  "settle", "resettle", "prune"]),
                                 min_size=1, max_size=40))
def test_no_window_holds_more_wrong_codes_than_the_guess_limit(limits, data, steps):
    """Concurrent starts for one number, in roughly time order (a start may be stamped up to
    ``jitter`` before the newest one: they come from different partitions), redelivered,
    settled in any order with wrong codes in ``[start - hold, start + timeout]`` (a response
    held for its start is up to ``hold`` older) and no more than the attempts reserved, pruned
    by ticks that the starts still to come may be stamped up to ``jitter`` before (they were
    on their way to admission when the tick came): in no window of ``guess_window`` seconds
    are there more than ``guesses`` wrong codes."""
    world = World(limits)
    clock = T0
    jitter = data.draw(st.sampled_from([0, 2, 8]), label="jitter (quarter seconds)")
    for step in steps:
        if step == "start":
            clock = advance(world, clock, jitter, data)
            origin = f"s{len(world.times)}"
            late = data.draw(st.just(jitter) | st.integers(0, jitter), label="stamped earlier")
            world.times[origin] = clock - QUARTER * late
            take_start(world, origin, data)
        elif step == "again" and world.times:
            origin = data.draw(st.sampled_from(sorted(world.times)))
            take_start(world, origin, data)  # redelivered: its record time again
        elif step in ("settle", "resettle"):
            runs = [r for r in world.runs.values() if r.settled == (step == "resettle")]
            if runs:
                run = data.draw(st.sampled_from(runs))
                world.number = settle(world.number, run.origin, run.wrong)
                run.settled = True
        elif step == "prune":
            # A tick: the starts still to come may be stamped up to ``jitter`` before it.
            clock = advance(world, clock, jitter, data)
            world.number = prune(world.number, clock, limits)
        check_windows(world)
    # Every run reaches its conclusion eventually and settles its reservation.
    for run in world.runs.values():
        world.number = settle(world.number, run.origin, run.wrong)
    check_windows(world)
    # Left open only: a start first refused, then admitted when delivered again (no run).
    for reservation in world.number.open:
        assert world.first[reservation.origin].verdict == "rate_limited"


def advance(world: World, clock: datetime, jitter: int, data: st.DataObject) -> datetime:
    """The time of the next start or tick: a little or a lot later, or (adversarial) just
    when some wrong code may have left the window."""
    clock += QUARTER * data.draw(st.integers(0, 12) | st.integers(0, 100))
    wrong = sorted(t for run in world.runs.values() for t in run.wrong)
    if wrong and data.draw(st.booleans(), label="right after a window"):
        since = data.draw(st.sampled_from(wrong))
        margin = data.draw(st.integers(0, int(world.limits.hold * 4) + jitter + 1))
        clock = max(clock, since + timedelta(seconds=world.limits.guess_window) + QUARTER * margin)
    return clock


def take_start(world: World, origin: str, data: st.DataObject) -> None:
    when = world.times[origin]
    running = {r.origin: r.attempts for r in world.number.open}
    before = world.number
    verdict, world.number = admit(world.number, origin, when, world.limits)
    if origin in running:  # delivered again while it runs: the same verdict, nothing counted
        assert verdict == Verdict("admitted", running[origin])
        assert world.number == before
    assert verdict.attempts <= world.limits.max_attempts
    if verdict.verdict == "rate_limited":
        assert verdict.attempts == 0
        assert verdict.retry_after is not None and verdict.retry_after >= 0
    else:
        assert verdict.attempts >= 1
    open_run = world.runs.get(origin)
    if origin in world.first:
        if verdict.verdict == "admitted" and open_run is not None and open_run.settled:
            open_run.settled = False  # the actor settles it again (a start seen before)
        return
    world.first[origin] = verdict
    if verdict.verdict == "admitted":
        count = data.draw(st.just(verdict.attempts) | st.integers(0, verdict.attempts),
                          label=f"wrong codes of {origin}")  # all of them, mostly
        low, high = -int(world.limits.hold * 4), int(world.limits.timeout * 4)
        offsets = st.sampled_from([low, high]) | st.integers(low, high)  # the edges, mostly
        wrong = sorted(when + QUARTER * data.draw(offsets) for _ in range(count))
        world.runs[origin] = Run(origin, when, verdict.attempts, tuple(wrong))


def check_windows(world: World) -> None:
    wrong = [t for run in world.runs.values() for t in run.wrong]
    assert_no_window_over(wrong, world.limits.guesses, world.limits.guess_window)
    reserved = sum(r.attempts for r in world.number.open)
    assert reserved <= world.limits.guesses
