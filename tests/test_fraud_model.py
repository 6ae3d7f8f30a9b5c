"""The fraud guard's rules (contract rule 20), pure: given a watch, when deliveries are judged,
then it blocks or not; and the per-address limit, exact under any order of starts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phoneverify.models.fraud import (
    MAX_DELIVERIES,
    Address,
    FraudBlock,
    Judgment,
    Policy,
    Waiting,
    Watch,
    admit_address,
    apply,
    blocking,
    client_address,
    conclude,
    count,
    country_of,
    deliver,
    expire,
    judge,
    lift,
    next_due,
    operator_block,
    operator_unblock,
    parse_duration,
    parse_key,
    prefix_of,
    prune,
    prune_address,
    refusal,
    totals,
    waiting_due,
)

T0 = datetime(2026, 12, 4, 1, 0, 0, tzinfo=UTC)
POLICY = Policy(answer=60, window=3600, min_conversion=0.2, prefix_min_sends=20,
                country_min_sends=100, block=43200)
PREFIX = "+44740012"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def delivered(n: int, every: float = 0.5, first: int = 0) -> dict[str, Waiting]:
    """Given ``n`` verifications with a delivery each to the prefix, ``every`` seconds apart:
    their deliveries waiting for an answer, by instance id."""
    return {f"v{i}": deliver(Waiting(), PREFIX, "GB", at(i * every))
            for i in range(first, first + n)}


def expired(waiting: dict[str, Waiting], now: datetime) -> tuple[dict[str, Waiting], Judgment]:
    """A tick at ``now``: the deliveries past their answer window, judged."""
    after, judgment = {}, Judgment()
    for iid, one in waiting.items():
        after[iid], judged = expire(one, now, POLICY)
        judgment += judged
    return after, judgment


# ---------------------------------------------------------------- keys


def test_a_prefix_is_the_number_without_its_last_four_digits_and_a_country_its_region():
    assert prefix_of("+447400123456") == "+44740012"
    assert country_of("+447400123456") == "GB"
    assert country_of("+14255550100") == "US"


@pytest.mark.parametrize(("text", "parsed"), [
    ("+44740012", ("prefix", "+44740012")), ("GB", ("country", "GB")),
    ("gb", ("country", "GB")), (" +1425555 ", ("prefix", "+1425555"))])
def test_operator_keys_are_prefixes_or_regions(text, parsed):
    assert parse_key(text) == parsed


@pytest.mark.parametrize("text", ["", "44740012", "+", "+12345678901234567", "XX", "GBR",
                                  "+4474a", "1.2.3.4", "+44 740"])
def test_a_malformed_key_is_refused_with_its_reason(text):
    with pytest.raises(ValueError, match=r"prefix|region"):
        parse_key(text)


# ---------------------------------------------------------------- judging deliveries


def test_given_deliveries_when_verified_then_they_are_judged_converted():
    waiting = delivered(3)
    concluded, judgment = conclude(waiting["v1"], True)
    assert judgment == Judgment(1, 1) and concluded.is_empty
    watch = count(Watch(), judgment, at(5), POLICY)
    _, judgment = conclude(waiting["v2"], False)
    assert judgment == Judgment(1, 0)
    watch = count(watch, judgment, at(6), POLICY)
    assert totals(watch, at(6), POLICY) == Judgment(2, 1)


def test_given_deliveries_when_the_answer_window_passes_then_they_are_judged_unconverted():
    waiting = delivered(4, every=10)  # at 0, 10, 20, 30
    waiting, judgment = expired(waiting, at(75))  # 0 and 10 are past 60 s
    assert judgment == Judgment(2, 0)
    # a verification verified after its answer window does not count again
    assert conclude(waiting["v0"], True)[1] == Judgment()
    assert conclude(waiting["v2"], True)[1] == Judgment(1, 1)


def test_a_delivery_reported_twice_counts_once_and_a_resend_counts_again():
    waiting = delivered(1)["v0"]
    assert deliver(waiting, PREFIX, "GB", at(0)) == waiting
    resent = deliver(waiting, PREFIX, "GB", at(30))
    assert waiting_due(resent, POLICY) == at(60)  # the first delivery's window ends first
    assert conclude(resent, True)[1] == Judgment(2, 2)
    many = resent
    for n in range(100):  # a bogus stream: one verification follows a bounded number
        many = deliver(many, PREFIX, "GB", at(31 + n))
    assert len(many.at) == MAX_DELIVERIES


def test_a_prefix_keeps_counts_not_deliveries_however_many_wait():
    """10,000 deliveries waiting in one prefix: each has its own state; the prefix's stays
    within its 61 buckets, and all of them are judged."""
    waiting = delivered(10_000, every=0.01)
    waiting, judgment = expired(waiting, at(100 + POLICY.answer))
    assert judgment == Judgment(10_000, 0)
    watch = Watch()
    for second in range(0, 3600, 7):  # judgments spread over the whole window
        watch = count(watch, Judgment(1, 1), at(second), POLICY)
    assert len(watch.judged) <= 61
    assert judge(count(watch, judgment, at(3600), POLICY), "prefix", PREFIX, at(3600),
                 POLICY)[1] is not None


# ---------------------------------------------------------------- blocking


def pumped(n: int) -> Watch:
    """Given ``n`` deliveries to one prefix nobody answered, judged after the answer window."""
    now = at(n * 0.5 + POLICY.answer)
    return count(Watch(), expired(delivered(n), now)[1], now, POLICY)


def test_given_min_sends_unanswered_then_the_prefix_is_blocked_with_its_figures():
    now = at(100)
    watch, block = judge(pumped(19), "prefix", PREFIX, now, POLICY)
    assert block is None  # not enough judged yet
    watch, block = judge(pumped(20), "prefix", PREFIX, now, POLICY)
    assert block == FraudBlock(level="prefix", key=PREFIX, blocked=True,
                               blocked_until=now + timedelta(hours=12), judged=20,
                               converted=0, at=now, by="guard")
    assert watch.block is not None
    _, again = judge(watch, "prefix", PREFIX, at(200), POLICY)
    assert again is None  # blocked once, not again while in force


def test_a_conversion_at_the_minimum_is_not_blocked_below_it_is():
    waiting, watch = delivered(20), Watch()
    for i in range(4):  # 4 of 20 = 0.2
        waiting[f"v{i}"], judgment = conclude(waiting[f"v{i}"], True)
        watch = count(watch, judgment, at(20), POLICY)
    watch = count(watch, expired(waiting, at(200))[1], at(200), POLICY)
    assert judge(watch, "prefix", PREFIX, at(200), POLICY)[1] is None
    _, judgment = conclude(delivered(1, first=20)["v20"], False)  # 4 of 21
    watch = count(watch, judgment, at(201), POLICY)
    assert judge(watch, "prefix", PREFIX, at(201), POLICY)[1] is not None


def test_a_country_needs_its_own_minimum():
    watch = count(Watch(), Judgment(99, 0), at(0), POLICY)
    assert judge(watch, "country", "GB", at(1), POLICY)[1] is None
    watch = count(watch, Judgment(1, 0), at(1), POLICY)
    assert judge(watch, "country", "GB", at(2), POLICY)[1] is not None


def test_judgments_leave_the_window():
    watch = pumped(20)
    later = at(10 + POLICY.answer + POLICY.window + 60)
    assert totals(watch, later, POLICY) == Judgment()
    assert judge(watch, "prefix", PREFIX, later, POLICY)[1] is None
    assert prune(watch, later, POLICY).judged == ()


def test_a_safe_prefix_is_never_blocked():
    safe = POLICY.model_copy(update={"safe_prefixes": ("+447400",)})
    assert judge(pumped(50), "prefix", PREFIX, at(100), safe)[1] is None


def test_a_block_ends_by_itself_and_its_judgments_are_forgotten():
    watch, _ = judge(pumped(20), "prefix", PREFIX, at(100), POLICY)
    assert lift(watch, "prefix", PREFIX, at(100 + 43199), POLICY)[1] is None
    after, record = lift(watch, "prefix", PREFIX, at(100 + 43200), POLICY)
    assert record is not None and not record.blocked and record.by == "guard"
    assert after.block is None and after.judged == ()


def test_an_operator_block_and_unblock_apply_and_the_guards_own_record_changes_nothing():
    watch, block = judge(pumped(20), "prefix", PREFIX, at(100), POLICY)
    assert block is not None
    assert apply(watch, block) == watch
    unblock = FraudBlock(level="prefix", key=PREFIX, blocked=False, at=at(200), by="operator")
    lifted = apply(watch, unblock)
    assert lifted.block is None and lifted.judged == ()
    # an unblock older than the block in force does not lift it
    assert apply(watch, unblock.model_copy(update={"at": at(50)})) == watch
    manual = FraudBlock(level="prefix", key=PREFIX, blocked=True, blocked_until=at(900),
                        at=at(300), by="operator")
    assert apply(lifted, manual).block.by == "operator"


def test_next_due_is_the_first_answer_window_block_end_or_bucket_to_leave():
    assert waiting_due(delivered(1, first=20)["v20"], POLICY) == at(10 + 60)
    assert waiting_due(Waiting(), POLICY) is None
    assert next_due(Watch(), POLICY) is None
    watch = pumped(20)  # its bucket starts at 60 s (60-second buckets over an hour)
    assert next_due(watch, POLICY) == at(60 + 3600)
    watch, _ = judge(watch, "prefix", PREFIX, at(100), POLICY)
    assert next_due(watch, POLICY) == at(60 + 3600)  # before the block's end (12 h)


# ---------------------------------------------------------------- refusing


def test_a_block_in_force_refuses_its_numbers_with_a_detail_a_person_understands():
    block = FraudBlock(level="prefix", key=PREFIX, blocked=True, blocked_until=at(8000),
                       at=at(0), by="guard")
    blocks = {PREFIX: block}
    assert blocking("+447400123456", blocks, at(10), POLICY) == block
    assert refusal(block, at(10)) == ("suspected SMS pumping to +44740012…, blocked until "
                                      "03:13 UTC")
    assert blocking("+447400133456", blocks, at(10), POLICY) is None  # another prefix
    shorter = block.model_copy(update={"key": "+447"})  # an operator's, of any length
    assert blocking("+447400133456", {"+447": shorter}, at(10), POLICY) == shorter
    assert blocking("+14255550100", {"+447": shorter}, at(10), POLICY) is None
    assert blocking("+447400123456", blocks, at(8000), POLICY) is None  # it ended
    safe = POLICY.model_copy(update={"safe_prefixes": ("+4474001234",)})
    assert blocking("+447400123456", blocks, at(10), safe) is None


def test_a_country_block_refuses_every_number_of_the_country():
    block = FraudBlock(level="country", key="GB", blocked=True, blocked_until=at(3 * 86400),
                       at=at(0), by="operator")
    assert blocking("+447400123456", {"GB": block}, at(10), POLICY) == block
    assert blocking("+14255550100", {"GB": block}, at(10), POLICY) is None
    assert refusal(block, at(10)) == ("suspected SMS pumping to numbers in GB, blocked by an "
                                      "operator until 2026-12-07 01:00 UTC")


# ---------------------------------------------------------------- operators


@pytest.mark.parametrize(("text", "seconds"), [("3600", 3600), ("90s", 90), ("30m", 1800),
                                               ("12h", 43200), ("7d", 604800), ("1.5h", 5400)])
def test_durations_an_operator_types(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5m", "12x", "h", "1e9", "400d", "nan"])
def test_a_malformed_duration_is_refused_with_its_reason(text):
    with pytest.raises(ValueError, match=r"duration|seconds must be"):
        parse_duration(text)


def test_an_operator_block_and_what_it_refuses():
    block = operator_block("gb", 3600, at(0), POLICY)
    assert (block.level, block.key, block.by, block.blocked_until) == (
        "country", "GB", "operator", at(3600))
    assert operator_unblock("+44740012", at(5)).blocked is False
    safe = POLICY.model_copy(update={"safe_prefixes": ("+4474",)})
    for key, seconds in (("+4474001", 60), ("GB", 0), ("GB", True), ("GB", float("inf")),
                         ("nowhere", 60)):
        with pytest.raises(ValueError, match=r"never blocked|seconds must|neither"):
            operator_block(key, seconds, at(0), safe)


# ---------------------------------------------------------------- per client address


def test_addresses_are_canonical_and_malformed_ones_refused():
    assert client_address("2001:DB8::0:1") == "2001:db8::1"
    assert client_address("203.0.113.9") == "203.0.113.9"
    for bad in ("", "1.2.3", "203.0.113.9, 10.0.0.1", "localhost", "x" * 100):
        with pytest.raises(ValueError, match="IPv4 or IPv6"):
            client_address(bad)


def test_given_the_limit_reached_then_a_start_waits_for_the_oldest_to_leave():
    address = Address()
    for i in range(3):
        retry, address = admit_address(address, f"s{i}", at(i * 10), 3, 100)
        assert retry is None
    retry, after = admit_address(address, "s3", at(30), 3, 100)
    assert retry == 70.0 and after == address
    assert admit_address(address, "s1", at(31), 3, 100) == (None, address)  # again: counted once
    assert admit_address(address, "s4", at(100.5), 3, 100)[0] is None
    assert prune_address(address, at(199), 100) == address  # kept for late arrivals
    assert prune_address(address, at(205), 100).starts == address.starts[1:]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=40),
       st.integers(1, 5), st.floats(1, 300))
def test_never_more_than_the_limit_in_any_window_whatever_the_order(times, limit, window):
    address, admitted = Address(), []
    for n, t in enumerate(times):
        retry, address = admit_address(address, f"s{n}", at(t), limit, window)
        if retry is None:
            admitted.append(at(t))
        else:
            # a start that arrives late may wait for one that came before it but is newer
            assert 0 <= retry <= 2 * window + 0.001  # (rounded to ms)
    span = timedelta(seconds=window)  # times as the model sees them: to the microsecond
    for t in admitted:
        assert sum(1 for u in admitted if t <= u < t + span) <= limit
