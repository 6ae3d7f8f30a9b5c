"""The per-partition deadline index: a tick pops what is due, and only that."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from phoneverify.agents.deadlines import Deadlines

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_due_pops_what_expired_in_deadline_order_and_leaves_the_rest():
    index = Deadlines()
    index.rebuild([(0, at(30), b"c"), (0, at(10), b"a"), (1, at(5), b"x")], partitions=2)
    index.add(0, at(20), b"b")
    assert index.due(0, at(20)) == [b"a", b"b"]
    assert index.due(0, at(20)) == []
    assert index.pending(0) == 1
    assert index.due(1, at(100)) == [b"x"]  # partitions are separate


def test_nothing_is_indexed_before_the_rebuild_and_a_rebalance_forgets_all():
    index = Deadlines()
    index.add(0, at(1), b"early")  # the rebuild will find it in the table
    assert not index.ready(0)
    assert index.due(0, at(10)) == []
    index.rebuild([], partitions=4)
    assert all(index.ready(p) for p in range(4))
    index.forget_all()
    assert not index.ready(0)
