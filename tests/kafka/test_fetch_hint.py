"""``maybe_more_fetched``: the hint that tells exactly-once's adaptive commit a short poll of a
Kafka consumer was only its queue running dry between fetches, not the end of the input."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from assured.log import TopicPartition, open_log
from tests.conftest import create_topic

pytestmark = pytest.mark.kafka


def test_more_fetched_until_the_consumer_reaches_the_high_watermark(kafka_bootstrap: str) -> None:
    topic = create_topic(kafka_bootstrap)
    log = open_log(f"kafka://{kafka_bootstrap}")
    with log.producer() as producer:
        for i in range(2000):
            producer.send(topic, b"v", key=b"%d" % i)
        producer.flush()
    with log.consumer(group_id=f"g-{topic}") as consumer:
        assert not consumer.maybe_more_fetched()  # nothing assigned, nothing fetched
        consumer.assign([TopicPartition(topic, 0)])
        first: list[object] = []
        deadline = time.monotonic() + 30
        while not first and time.monotonic() < deadline:
            first = list(consumer.poll(max_records=10, timeout=1))
        assert len(first) == 10
        # The client fetched past the ten it handed out: a short poll now would not mean the
        # end of the input.
        assert consumer.maybe_more_fetched()
        seen = 10
        while seen < 2000 and time.monotonic() < deadline:
            seen += len(consumer.poll(max_records=500, timeout=1))
        assert seen == 2000
        assert not consumer.maybe_more_fetched()
    log.close()


def test_the_embedded_engine_never_holds_more_than_it_hands_out(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        admin.create_topic("t", 1)
    with log.producer() as producer:
        for i in range(100):
            producer.send("t", b"v", key=b"%d" % i)
    with log.consumer() as consumer:
        consumer.assign([TopicPartition("t", 0)])
        assert len(consumer.poll(max_records=10, timeout=1)) == 10
        assert not consumer.maybe_more_fetched()
    log.close()
