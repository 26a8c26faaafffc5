"""The offsets a protocol commits and rewinds to, from a polled batch."""

from __future__ import annotations

from assured.log import Record, TopicPartition
from assured.runtime.protocols._base import first_offsets, next_offsets


def rec(topic: str, partition: int, offset: int) -> Record:
    return Record(topic, partition, offset, 0, None, b"v", ())


# A batch as a consumer returns it: partitions interleaved, each in offset order (with gaps
# where transaction markers took offsets).
BATCH = [rec("a", 0, 5), rec("a", 1, 9), rec("a", 0, 6), rec("b", 0, 2), rec("a", 0, 8)]


def test_next_offsets_are_one_past_each_partitions_last_record() -> None:
    got = next_offsets(BATCH)
    assert got == {TopicPartition("a", 0): 9, TopicPartition("a", 1): 10, TopicPartition("b", 0): 3}
    assert all(type(tp) is TopicPartition for tp in got)  # keys usable as .topic/.partition


def test_first_offsets_are_each_partitions_first_record_in_first_seen_order() -> None:
    got = first_offsets(BATCH)
    assert list(got.items()) == [
        (TopicPartition("a", 0), 5),
        (TopicPartition("a", 1), 9),
        (TopicPartition("b", 0), 2),
    ]
    assert all(type(tp) is TopicPartition for tp in got)


def test_empty_batch_has_no_offsets() -> None:
    assert next_offsets([]) == {}
    assert first_offsets([]) == {}
