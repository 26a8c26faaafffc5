"""Committed offsets that an open transaction holds (issue 18: an exactly-once duplicate seen on
Kafka, a whole batch handled twice).

A transactional offset commit is pending until its transaction ends; meanwhile a read_committed
member newly assigned the partition must wait for it (KIP-447: the broker answers "unstable").
librdkafka's own fetch of committed offsets forgets that wait when the assignment changes while
it waits (a member joins or leaves): the partition is put back with no offset and starts from
``auto.offset.reset``, from the beginning, so every committed record is handled again. The
consumer now reads the committed offsets itself, waiting until they are stable, and assigns the
partitions there.

Real broker; a raw confluent-kafka transactional producer plays the member frozen between
sending its offsets into its transaction and committing it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer as KConsumer
from confluent_kafka import Producer as KProducer
from confluent_kafka import TopicPartition as KTopicPartition

from assured.errors import LogError
from assured.log import Log, OffsetReset, Record, TopicPartition, open_log
from tests.conftest import create_topic

pytestmark = pytest.mark.kafka

PARTITIONS = 4
HELD = 100  # the offset the open transaction holds for every partition


@pytest.fixture
def log(kafka_bootstrap: str) -> Iterator[Log]:
    opened = open_log(f"kafka://{kafka_bootstrap}")
    yield opened
    opened.close()


def _fill(log: Log, topic: str, per_partition: int, partitions: int = PARTITIONS) -> None:
    producer = log.producer()
    for i in range(per_partition * partitions):
        producer.send(topic, str(i).encode(), partition=i % partitions)
    producer.flush()
    producer.close()


def _hold_offsets(bootstrap: str, group: str, topic: str) -> KProducer:
    """A transaction that sent offset ``HELD`` of every partition for ``group``, left open."""
    member = KConsumer({"bootstrap.servers": bootstrap, "group.id": group})
    producer = KProducer({"bootstrap.servers": bootstrap, "transactional.id": f"held-{group}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    offsets = [KTopicPartition(topic, p, HELD) for p in range(PARTITIONS)]
    producer.send_offsets_to_transaction(offsets, member.consumer_group_metadata(), 30)
    member.close()
    return producer


def test_members_joining_while_a_transaction_holds_the_offsets_start_from_them(
    kafka_bootstrap: str, log: Log
) -> None:
    """Three members join one after another (each join reassigns every partition) while the
    transaction is open: nobody reads a record until it commits, then every partition starts
    at the offset it committed, never at the beginning."""
    _joins_while_held(kafka_bootstrap, log, hold_s=7.0)


@pytest.mark.slow
def test_a_member_waits_for_held_offsets_as_long_as_a_transaction_may_stay_open(
    kafka_bootstrap: str, log: Log
) -> None:
    """A transaction may stay open up to its timeout (the App's default: 60 s), as long as a
    member frozen after sending its offsets is not fenced: the new owners wait it out (45 s
    here; librdkafka's one call gives up after 10 s), rather than stop."""
    _joins_while_held(kafka_bootstrap, log, hold_s=45.0)


def _joins_while_held(kafka_bootstrap: str, log: Log, hold_s: float) -> None:
    topic = create_topic(kafka_bootstrap, PARTITIONS)
    group = f"g-{uuid.uuid4().hex[:8]}"
    _fill(log, topic, 3 * HELD)
    held = _hold_offsets(kafka_bootstrap, group, topic)
    first: dict[tuple[str, int], int] = {}  # (member, partition) -> first offset it read
    read_before_commit: list[tuple[str, int, int]] = []
    committed = threading.Event()
    stop = threading.Event()
    errors: list[BaseException] = []

    def member(name: str, delay: float) -> None:
        try:
            time.sleep(delay)
            consumer = log.consumer(
                group_id=group, session_timeout_ms=6000, heartbeat_interval_ms=300
            )
            consumer.subscribe([topic])
            while not stop.is_set():
                for r in consumer.poll(100, 0.1):
                    first.setdefault((name, r.partition), r.offset)
                    if not committed.is_set():
                        read_before_commit.append((name, r.partition, r.offset))
            consumer.close()
        except BaseException as e:  # pragma: no cover -- reported by the assertion below
            errors.append(e)

    threads = [
        threading.Thread(target=member, args=(name, delay))
        for name, delay in (("a", 0.0), ("b", 2.0), ("c", 4.0))
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(hold_s)
        committed.set()
        held.commit_transaction(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and {p for _, p in first} != set(range(PARTITIONS)):
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert read_before_commit == [], "a partition was read while its offsets were pending"
    assert {p for _, p in first} == set(range(PARTITIONS)), first
    assert all(offset == HELD for offset in first.values()), first


def test_a_partition_without_committed_offsets_starts_at_the_reset_policy(
    kafka_bootstrap: str, log: Log
) -> None:
    """The consumer now picks the start itself: with nothing committed, ``earliest`` is the
    first record and ``latest`` the end, as before."""
    topic = create_topic(kafka_bootstrap, 1)
    _fill(log, topic, 5, partitions=1)
    resets: list[tuple[OffsetReset, list[int], dict[str, str]]] = [
        ("earliest", [0, 1, 2, 3, 4], {}),
        ("latest", [], {}),
        ("earliest", [], {"auto.offset.reset": "latest"}),  # librdkafka's setting counts
    ]
    for reset, expected, config in resets:
        consumer = log.consumer(
            group_id=f"g-{uuid.uuid4().hex[:8]}", auto_offset_reset=reset, config=config
        )
        consumer.subscribe([topic])
        got = []
        deadline = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < deadline:
            got += consumer.poll(10, 0.2)
        got += consumer.poll(10, 1.0)
        position = consumer.position(TopicPartition(topic, 0))
        consumer.close()
        assert [r.offset for r in got] == expected, (reset, config)
        assert position == 5, (reset, config, position)  # read to the end, or started there


class _RevokeOnThirdCall:
    """librdkafka's consumer as a poll sees it when its queue is empty at first (the first call
    returns nothing), a record then arrives (the second), and a rebalance runs in the third: a
    revoke, through the consumer's own path for one."""

    def __init__(self, inner: KConsumer, revoke: Callable[[], None]):
        self._inner = inner
        self._revoke = revoke
        self.calls = 0

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        self.calls += 1
        if self.calls == 1:
            return []
        if self.calls == 3:
            self._revoke()
        return self._inner.consume(num_messages, timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_records_of_a_partition_revoked_during_a_poll_are_not_returned(
    kafka_bootstrap: str, log: Log
) -> None:
    """``poll()`` may take records in up to three calls into librdkafka; when a rebalance runs in
    the last one, what an earlier call returned from a partition that left is dropped (its next
    owner, or this member again, reads it from the committed offset), not handed over to be
    handled after the revoke already committed."""
    topic = create_topic(kafka_bootstrap, 1)
    _fill(log, topic, 10, partitions=1)
    consumer = log.consumer(group_id=f"g-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    early: list[Record] = []
    while not consumer.assignment() and time.monotonic() < deadline:
        early += consumer.poll(1, 0.0)  # the poll that assigns may hand out the first record
    tp = TopicPartition(topic, 0)
    if early:  # then read it again: the proxied poll below must meet it first
        consumer.seek(tp, 0)
    time.sleep(1.0)  # let the fetch fill librdkafka's queue
    proxy = _RevokeOnThirdCall(consumer._c, lambda: consumer._forget([tp]))  # type: ignore[attr-defined]
    consumer._c = proxy  # type: ignore[attr-defined]
    got = consumer.poll(5, 1.0)
    consumer._c = proxy._inner  # type: ignore[attr-defined]
    consumer.close()
    assert proxy.calls == 3, "the poll went through its three calls"
    assert [r for r in got if r.offset < 1] == [], "the first call's record was dropped"


def test_an_error_while_choosing_where_partitions_start_stops_the_consumer_for_good(
    kafka_bootstrap: str, log: Log
) -> None:
    """When on_assign fails, librdkafka assigns the partitions itself, at offsets nobody chose:
    the error comes out of poll(), and every later call raises it again rather than hand out
    records from there."""
    topic = create_topic(kafka_bootstrap, 1)
    producer = log.producer()
    producer.send(topic, b"x")
    producer.flush()
    producer.close()

    def refuse(partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        raise LogError("the sink is away (planned)")

    consumer = log.consumer(group_id=f"g-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([topic], on_assign=refuse)
    with pytest.raises(LogError, match="planned"):
        _poll_for(consumer, 30)
    for _ in range(3):
        with pytest.raises(LogError, match="planned"):
            consumer.poll(10, 0.2)
    with pytest.raises(LogError, match="planned"):
        consumer.commit()
    consumer.close()  # still closes


def _poll_for(consumer: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        consumer.poll(10, 0.2)
