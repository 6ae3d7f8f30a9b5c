"""The per-partition due index: a tick pops what is due, each key once, and only that."""

from __future__ import annotations

import hypothesis
from hypothesis import settings
from hypothesis import strategies as st

from phoneverify.agents.deadlines import DueIndex


def built(*entries: tuple[float, bytes], partition: int = 0) -> DueIndex:
    index = DueIndex()
    index.build(partition, entries)
    return index


def test_nothing_is_indexed_before_the_build():
    index = DueIndex()
    assert not index.ready(0)
    index.schedule(0, 1.0, b"early")  # the build will find it in the table
    assert index.pop_due(0, 10.0) == []
    assert index.size(0) == 0
    index.build(0, [])
    assert index.ready(0)
    assert not index.ready(1)  # partitions are built one by one
    assert index.pop_due(0, 10.0) == []


def test_build_pops_what_is_due_in_due_order_and_leaves_the_rest():
    index = built((30.0, b"c"), (10.0, b"a"), (20.0, b"b"))
    assert index.size(0) == 3
    assert index.pop_due(0, 20.0) == [b"a", b"b"]  # due at or before now
    assert index.pop_due(0, 20.0) == []
    assert index.size(0) == 1
    assert index.pop_due(0, 29.999) == []
    assert index.pop_due(0, 1e9) == [b"c"]
    assert index.size(0) == 0


def test_build_keeps_one_entry_per_key():
    index = built((10.0, b"a"), (5.0, b"a"))  # the last entry of a key wins
    assert index.size(0) == 1
    assert index.pop_due(0, 7.0) == [b"a"]
    assert index.pop_due(0, 100.0) == []


def test_build_replaces_what_a_partition_had():
    index = built((10.0, b"a"))
    index.build(0, [(20.0, b"b")])
    assert index.pop_due(0, 100.0) == [b"b"]


def test_partitions_are_separate():
    index = built((5.0, b"x"))
    index.build(1, [(5.0, b"x"), (6.0, b"y")])
    assert index.pop_due(1, 100.0) == [b"x", b"y"]
    assert index.pop_due(0, 100.0) == [b"x"]
    index.schedule(2, 1.0, b"z")  # partition 2 is not built: ignored
    assert index.pop_due(2, 100.0) == []


def test_schedule_earlier_moves_a_key_and_the_stale_entry_is_skipped():
    index = built((50.0, b"a"))
    index.schedule(0, 10.0, b"a")
    assert index.size(0) == 1
    assert index.pop_due(0, 10.0) == [b"a"]
    assert index.pop_due(0, 100.0) == []  # the entry at 50 is stale: not popped again
    assert index.size(0) == 0


def test_schedule_later_keeps_the_earliest_due_time():
    index = built((10.0, b"a"))
    index.schedule(0, 50.0, b"a")  # stays at 10: its owner schedules it again when popped
    index.schedule(0, 10.0, b"a")  # the same time: nothing new
    assert index.size(0) == 1
    assert index.pop_due(0, 10.0) == [b"a"]
    assert index.pop_due(0, 100.0) == []


def test_a_popped_key_can_be_scheduled_again():
    index = built((10.0, b"a"))
    assert index.pop_due(0, 10.0) == [b"a"]
    index.schedule(0, 50.0, b"a")
    assert index.pop_due(0, 49.0) == []
    assert index.pop_due(0, 50.0) == [b"a"]


def test_forget_all_drops_every_partition_and_takes_any_signal_arguments():
    index = built((10.0, b"a"))
    index.build(3, [(10.0, b"b")])
    index.forget_all(object(), assigned={1, 2})  # connected to rebalance signals
    assert not index.ready(0)
    assert not index.ready(3)
    assert index.size(0) == 0
    assert index.pop_due(0, 100.0) == []
    index.schedule(0, 1.0, b"a")  # ignored until the partition is built again
    index.build(0, [])
    assert index.pop_due(0, 100.0) == []


@settings(max_examples=200, deadline=None)
@hypothesis.given(
    initial=st.lists(st.tuples(st.integers(0, 100), st.sampled_from(b"abcdef")), max_size=8),
    steps=st.lists(st.one_of(
        st.tuples(st.just("schedule"), st.integers(0, 100), st.sampled_from(b"abcdef")),
        st.tuples(st.just("pop"), st.integers(0, 100), st.just(0)),
    ), max_size=30),
)
def test_the_index_agrees_with_a_dict_of_earliest_due_times(initial, steps):
    """Against a model: each key is popped once, at its earliest due time, never early."""
    index = DueIndex()
    index.build(0, [(float(due), bytes([key])) for due, key in initial])
    model: dict[bytes, float] = {bytes([key]): float(due) for due, key in initial}
    for kind, number, key_byte in steps:
        if kind == "schedule":
            key = bytes([key_byte])
            index.schedule(0, float(number), key)
            model[key] = min(model.get(key, float("inf")), float(number))
        else:
            now = float(number)
            popped = index.pop_due(0, now)
            expected = sorted((due, key) for key, due in model.items() if due <= now)
            assert popped == [key for _, key in expected]
            for key in popped:
                del model[key]
        assert index.size(0) == len(model)
