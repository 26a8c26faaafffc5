"""Positions, seeks, commits and auto.offset.reset."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from assured.errors import ConfigError
from assured.log import Log, TopicPartition
from tests.contract.conftest import drain, unique


def _fill(log: Log, name: str, n: int) -> None:
    with log.producer() as producer:
        for i in range(n):
            producer.send(name, f"r{i}".encode(), partition=0)
        producer.flush(30)


def test_commit_committed_position_and_seek(log: Log, topic: Callable[..., str]) -> None:
    name = topic()
    tp = TopicPartition(name, 0)
    _fill(log, name, 10)
    group = unique("g")
    with log.consumer(group_id=group) as consumer:
        consumer.assign([tp])
        assert consumer.committed([tp]) == {tp: None}
        assert consumer.position(tp) == 0
        records = drain(consumer, 10)
        assert [r.offset for r in records] == list(range(10))
        assert consumer.position(tp) == 10
        consumer.commit({tp: 4})
        assert consumer.committed([tp]) == {tp: 4}
        consumer.seek(tp, 7)
        assert [r.value for r in drain(consumer, 3)] == [b"r7", b"r8", b"r9"]
    with log.admin() as admin:
        assert admin.committed_offsets(group) == {tp: 4}
        (lag,) = admin.lag(group, [name])
        assert (lag.committed, lag.high, lag.lag) == (4, 10, 6)
    # A new consumer in the group starts at the committed offset.
    with log.consumer(group_id=group) as again:
        again.assign([tp])
        assert [r.offset for r in drain(again, 6)] == list(range(4, 10))


def test_auto_offset_reset_earliest_and_latest(log: Log, topic: Callable[..., str]) -> None:
    name = topic()
    tp = TopicPartition(name, 0)
    _fill(log, name, 5)
    with log.consumer(group_id=unique("g"), auto_offset_reset="latest") as latest:
        latest.assign([tp])
        assert latest.position(tp) == 5
        assert latest.poll(timeout=0.5) == []
        _fill(log, name, 2)
        assert [r.offset for r in drain(latest, 2)] == [5, 6]
    with log.consumer(group_id=unique("g"), auto_offset_reset="earliest") as earliest:
        earliest.assign([tp])
        assert [r.offset for r in drain(earliest, 7)] == list(range(7))


def test_pause_and_resume(log: Log, topic: Callable[..., str]) -> None:
    name = topic(partitions=2)
    with log.producer() as producer:
        for p in (0, 1):
            producer.send(name, b"x", partition=p)
        producer.flush(30)
    a, b = TopicPartition(name, 0), TopicPartition(name, 1)
    with log.consumer(group_id=unique("g")) as consumer:
        consumer.assign([a, b])
        consumer.pause([a])
        assert {r.partition for r in drain(consumer, 1)} == {1}
        consumer.resume([a])
        assert {r.partition for r in drain(consumer, 1)} == {0}


def test_offset_metadata_is_kept_with_the_committed_offset(
    log: Log, topic: Callable[..., str]
) -> None:
    """Metadata goes with its offset, synchronous or not; a commit without it clears it; the
    broker's bound (4,000 characters here) is refused before anything is sent."""
    name = topic(partitions=2)
    a, b = TopicPartition(name, 0), TopicPartition(name, 1)
    _fill(log, name, 4)
    group = unique("g")
    with log.consumer(group_id=group) as consumer:
        consumer.assign([a, b])
        assert consumer.committed_metadata([a, b]) == {}
        consumer.commit({a: 2, b: 0}, metadata={a: "a1:2:1.3"})
        assert consumer.committed_metadata([a, b]) == {a: (2, "a1:2:1.3"), b: (0, "")}
        consumer.commit({a: 3}, asynchronous=True, metadata={a: "x" * 4000})
        consumer.commit({b: 1}, metadata={b: "later"})  # waits for the asynchronous one
        assert consumer.committed_metadata([a, b]) == {a: (3, "x" * 4000), b: (1, "later")}
        consumer.commit({a: 4})
        assert consumer.committed_metadata([a]) == {a: (4, "")}
        with pytest.raises(ConfigError, match="at most 4000"):
            consumer.commit({a: 4}, metadata={a: "x" * 4001})
        with pytest.raises(ConfigError, match="ASCII"):
            consumer.commit({a: 4}, metadata={a: "é"})
        assert consumer.committed_metadata([a]) == {a: (4, "")}
    with log.consumer(group_id=group) as other:  # another member reads what was kept
        assert other.committed_metadata([a, b]) == {a: (4, ""), b: (1, "later")}
