"""The three-node cluster is real: with acks=all and min.insync.replicas=2, a SIGKILLed broker
loses no acknowledged record."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from assured.testing.kafka import KafkaCluster
from tests.conftest import create_topic

# 27 s with the cluster's start; the soak and the acceptance matrix lean on it (slow too)
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_sigkill_of_the_leader_loses_no_acknowledged_record(kafka_cluster: KafkaCluster) -> None:
    bootstrap = kafka_cluster.bootstrap
    topic = create_topic(
        bootstrap, partitions=1, replication=3, config={"min.insync.replicas": "2"}
    )
    # A new topic's metadata reaches every broker a moment after its creation is confirmed.
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + 30
    while True:
        partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
        if (0 in partitions and len(partitions[0].replicas) == 3) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    partition = partitions[0]
    assert len(partition.replicas) == 3
    leader = partition.leader

    acked: list[bytes] = []
    failed: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is None:
            value = msg.value()
            assert value is not None
            acked.append(value)
        else:
            failed.append(str(err))

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.timeout.ms": 60000,
        }
    )
    sent = 0

    def send(n: int) -> None:
        nonlocal sent
        for _ in range(n):
            producer.produce(
                topic, value=f"r-{sent:05d}".encode(), partition=0, on_delivery=on_delivery
            )
            sent += 1
            producer.poll(0)

    send(1000)
    producer.flush(30)
    acked_before_kill = len(acked)
    send(1000)  # in flight while the leader dies
    kafka_cluster.kill(leader)
    assert leader not in kafka_cluster.running()
    send(1000)
    assert producer.flush(90) == 0, "records still unacknowledged 90 s after the kill"

    assert acked_before_kill == 1000
    assert failed == []
    assert len(acked) == sent == 3000

    kafka_cluster.restart(leader)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    read: list[bytes] = []
    try:
        while True:
            msg = consumer.poll(30)
            assert msg is not None, f"stalled after reading {len(read)} records"
            err = msg.error()
            if err is not None and err.code() == KafkaError._PARTITION_EOF:
                break
            assert err is None, str(err)
            value = msg.value()
            assert value is not None
            read.append(value)
    finally:
        consumer.close()
    assert set(acked) <= set(read)
    assert len(read) == len(set(read)) == 3000, "idempotence: no record written twice"
