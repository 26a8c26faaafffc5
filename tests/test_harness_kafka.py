"""The single broker is real: Kafka's transactions hide aborted records from read_committed."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from tests.conftest import create_topic

pytestmark = pytest.mark.kafka


def read_all(bootstrap: str, topic: str, isolation: str) -> list[bytes]:
    """Every record of partition 0 visible at ``isolation``, up to the end of the partition."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "isolation.level": isolation,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return values
                raise AssertionError(f"consumer error: {err}")
            value = msg.value()
            assert value is not None
            values.append(value)
        raise AssertionError(f"no end of partition within 30 s; read {len(values)}")
    finally:
        consumer.close()


def test_read_committed_sees_only_the_committed_transaction(kafka_bootstrap: str) -> None:
    topic = create_topic(kafka_bootstrap)
    producer = Producer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "transactional.id": f"smoke-{uuid.uuid4().hex[:8]}",
        }
    )
    producer.init_transactions(30)

    producer.begin_transaction()
    for i in range(10):
        producer.produce(topic, value=f"aborted-{i}".encode(), partition=0)
    producer.flush(30)  # the records reach the log before the abort marker does
    producer.abort_transaction(30)

    producer.begin_transaction()
    for i in range(10):
        producer.produce(topic, value=f"committed-{i}".encode(), partition=0)
    producer.commit_transaction(30)

    committed = [f"committed-{i}".encode() for i in range(10)]
    aborted = [f"aborted-{i}".encode() for i in range(10)]
    assert read_all(kafka_bootstrap, topic, "read_committed") == committed
    assert read_all(kafka_bootstrap, topic, "read_uncommitted") == aborted + committed
