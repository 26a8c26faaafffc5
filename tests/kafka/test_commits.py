"""Consumer commits and group membership on Kafka (issue 18, items 7 and 13).

- Asynchronous commits land in the order they were asked for: the committed offset never moves
  backwards, read straight from the broker's ``__consumer_offsets`` log, even across a broker
  pause (SIGSTOP) that makes requests time out; a synchronous commit lands after them.
- A consumer that misses ``max.poll.interval.ms`` reports its partitions lost, does not raise,
  rejoins, and can commit again.

Real broker throughout.
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer as KConsumer
from confluent_kafka import TopicPartition as KTopicPartition

from assured.log import Log, Record, TopicPartition, open_log
from assured.testing.kafka import KafkaCluster
from tests.conftest import create_topic
from tests.kafka.test_delivery import paused

pytestmark = pytest.mark.kafka


@pytest.fixture
def log(kafka_bootstrap: str) -> Iterator[Log]:
    opened = open_log(f"kafka://{kafka_bootstrap}")
    yield opened
    opened.close()


def _string(buf: bytes, at: int) -> tuple[str, int]:
    (n,) = struct.unpack_from(">h", buf, at)
    return buf[at + 2 : at + 2 + n].decode(), at + 2 + n


def commit_history(bootstrap: str, group: str, tp: TopicPartition) -> list[int]:
    """Every offset committed for ``group`` on ``tp``, in the order the group coordinator wrote
    them to ``__consumer_offsets`` (key: int16 version 0/1, group, topic, int32 partition;
    value: int16 version, int64 offset, ...)."""
    reader = KConsumer(
        {"bootstrap.servers": bootstrap, "group.id": f"audit-{uuid.uuid4().hex[:8]}"}
    )
    parts = reader.list_topics("__consumer_offsets", timeout=10).topics["__consumer_offsets"]
    ktps = [KTopicPartition("__consumer_offsets", p) for p in parts.partitions]
    ends = {k.partition: reader.get_watermark_offsets(k, timeout=10)[1] for k in ktps}
    reader.assign([KTopicPartition(k.topic, k.partition, 0) for k in ktps])
    found: list[int] = []
    done: set[int] = {p for p, end in ends.items() if end == 0}
    deadline = time.monotonic() + 30
    while len(done) < len(ends) and time.monotonic() < deadline:
        for m in reader.consume(500, 0.5):
            if m.error() is not None:
                continue
            partition = m.partition() or 0
            if (m.offset() or 0) + 1 >= ends[partition]:
                done.add(partition)
            key, value = m.key(), m.value()
            if not key or value is None:
                continue
            (version,) = struct.unpack_from(">h", key, 0)
            if version not in (0, 1):
                continue  # group metadata, not an offset commit
            g, at = _string(key, 2)
            topic, at = _string(key, at)
            (p,) = struct.unpack_from(">i", key, at)
            if (g, topic, p) == (group, tp.topic, tp.partition):
                found.append(struct.unpack_from(">q", value, 2)[0])
        # A partition whose last offset is a transaction's marker (offsets committed in a
        # transaction write one) never hands that offset out: its position says it is read.
        rest = [KTopicPartition("__consumer_offsets", p) for p in ends if p not in done]
        for position in reader.position(rest) if rest else []:
            if position.offset >= ends[position.partition]:
                done.add(position.partition)
    reader.close()
    assert len(done) == len(ends), "read __consumer_offsets to its end"
    return found


def test_async_commits_land_in_order_across_a_broker_pause(
    log: Log, kafka_bootstrap: str, kafka_broker: KafkaCluster
) -> None:
    topic = create_topic(kafka_bootstrap)
    group = f"g-{uuid.uuid4().hex[:10]}"
    tp = TopicPartition(topic, 0)
    consumer = log.consumer(group_id=group, config={"socket.timeout.ms": 1500})
    consumer.assign([tp])
    stop = threading.Event()

    def pause_now_and_then() -> None:
        while not stop.wait(0.4):
            with paused(kafka_broker):
                time.sleep(2.5)  # past the client's request timeout

    pauser = threading.Thread(target=pause_now_and_then)
    pauser.start()
    try:
        last = 0
        started = time.monotonic()
        while time.monotonic() - started < 8:
            last += 1
            consumer.commit({tp: last}, asynchronous=True)
            consumer.poll(max_records=1, timeout=0.005)
    finally:
        stop.set()
        pauser.join()
    consumer.commit({tp: last + 1})  # synchronous: after every asynchronous one
    assert consumer.committed([tp]) == {tp: last + 1}
    consumer.close()
    history = commit_history(kafka_bootstrap, group, tp)
    assert history, "commits were written"
    backwards = [(a, b) for a, b in itertools.pairwise(history) if b < a]
    assert backwards == [], f"the committed offset moved backwards: {backwards[:5]}"
    assert history[-1] == last + 1


def test_a_commit_that_waits_for_an_asynchronous_one_loses_and_repeats_no_record(
    log: Log, kafka_bootstrap: str
) -> None:
    """A synchronous commit serves the consumer until the asynchronous commit in flight is
    answered, with the partitions paused: reading goes on afterwards exactly where it was."""
    topic = create_topic(kafka_bootstrap, partitions=2)
    with log.producer() as producer:
        for i in range(2000):
            producer.send(topic, f"{i}".encode(), partition=i % 2)
        producer.flush(30)
    group = f"g-{uuid.uuid4().hex[:10]}"
    consumer = log.consumer(group_id=group)
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    consumer.assign(tps)
    seen: dict[int, list[int]] = {0: [], 1: []}
    deadline = time.monotonic() + 60
    rounds = 0
    while sum(map(len, seen.values())) < 2000:
        assert time.monotonic() < deadline, {p: len(o) for p, o in seen.items()}
        records = consumer.poll(max_records=50, timeout=0.5)
        for r in records:
            seen[r.partition].append(r.offset)
        if records:
            rounds += 1
            offsets = {TopicPartition(topic, p): o[-1] + 1 for p, o in seen.items() if o}
            consumer.commit(offsets, asynchronous=rounds % 3 != 0)
    assert consumer.poll(timeout=0.5) == []
    assert seen == {0: list(range(1000)), 1: list(range(1000))}
    consumer.commit({tps[0]: 1000})  # synchronous: after the asynchronous ones, with them
    assert consumer.committed(tps) == dict.fromkeys(tps, 1000)
    consumer.close()


def test_a_missed_poll_interval_reports_lost_then_rejoins(
    log: Log, kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="assured.log.kafka")
    topic = create_topic(kafka_bootstrap, partitions=2)
    with log.producer() as producer:
        for i in range(20):
            producer.send(topic, f"{i}".encode(), partition=i % 2)
        producer.flush(30)
    lost: list[list[TopicPartition]] = []
    consumer = log.consumer(
        group_id=f"g-{uuid.uuid4().hex[:10]}",
        session_timeout_ms=1000,
        heartbeat_interval_ms=300,
        max_poll_interval_ms=1000,  # librdkafka's floor is the session timeout
    )
    consumer.subscribe([topic], on_lost=lost.append)
    deadline = time.monotonic() + 30
    got: list[Record] = []
    while not got:
        assert time.monotonic() < deadline, "nothing read"
        got = consumer.poll(timeout=0.2)
    time.sleep(2.5)  # a handler slower than max.poll.interval.ms

    rejoined = False
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (lost and rejoined):
        consumer.poll(timeout=0.2)  # never raises for it
        rejoined = len(consumer.assignment()) == 2
    assert lost, "on_lost ran"
    assert sorted(tp.partition for tp in lost[0]) == [0, 1]
    assert rejoined, "the consumer got its partitions back"
    assert any("max_poll_interval_ms" in r.getMessage() for r in caplog.records)
    consumer.commit({TopicPartition(topic, 0): 3})
    assert consumer.committed([TopicPartition(topic, 0)]) == {TopicPartition(topic, 0): 3}
    consumer.close()
