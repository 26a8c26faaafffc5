"""Producing and consuming: order, keys, headers, isolation of plain records."""

from __future__ import annotations

from collections.abc import Callable

from assured.log import DeliveryReport, Log, TopicPartition, partition_for_key
from tests.contract.conftest import drain, unique


def test_per_partition_order_and_keys_land_where_java_puts_them(
    log: Log, topic: Callable[..., str]
) -> None:
    name = topic(partitions=4)
    reports: list[DeliveryReport] = []
    with log.producer() as producer:
        for i in range(200):
            key = f"account-{i % 17}".encode()
            producer.send(name, f"{i}".encode(), key=key, on_delivery=reports.append)
        assert producer.flush(30) == 0
    assert len(reports) == 200
    assert all(r.error is None for r in reports)
    with log.consumer(group_id=unique("g")) as consumer:
        consumer.assign([TopicPartition(name, p) for p in range(4)])
        records = drain(consumer, 200)
    assert len(records) == 200
    for r in records:
        assert r.key is not None
        assert r.partition == partition_for_key(r.key, 4)
    for p in range(4):
        offsets = [r.offset for r in records if r.partition == p]
        assert offsets == sorted(offsets)
        values = [int(r.value or b"") for r in records if r.partition == p]
        assert values == sorted(values), "one partition keeps the order records were sent in"
    by_offset = {(r.partition, r.offset) for r in records}
    assert by_offset == {(r.partition, r.offset) for r in reports}


def test_headers_explicit_partition_and_null_values_round_trip(
    log: Log, topic: Callable[..., str]
) -> None:
    name = topic(partitions=2)
    headers = [("trace", b"abc"), ("empty", b""), ("none", None), ("trace", b"second")]
    with log.producer() as producer:
        producer.send(name, b"v", key=b"k", headers=headers, partition=1)
        producer.send(name, None, key=b"tombstone", partition=1)
        producer.flush(30)
    with log.consumer(group_id=unique("g")) as consumer:
        consumer.assign([TopicPartition(name, 1)])
        first, second = drain(consumer, 2)
    assert first.value == b"v"
    assert first.key == b"k"
    assert list(first.headers) == headers
    assert first.header("trace") == b"second"
    assert first.header("missing") is None
    assert second.value is None
    assert second.key == b"tombstone"
    assert first.timestamp_ms > 0
