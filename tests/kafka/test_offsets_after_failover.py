"""Committed offsets read while the group coordinator moves (three brokers, the coordinator
SIGKILLed and restarted): a plain read may answer from the new coordinator's lagging high
watermark, offsets a commit or two old; a stable read (``committed_offsets(stable=True)``, as a
read_committed consumer starts) never goes backwards. The audit confirms every drop it sees
with a stable read before it calls it a commit regression (a soak round on three brokers had
reported three that the offsets log never held)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaException
from confluent_kafka import TopicPartition as KTopicPartition
from confluent_kafka.admin import AdminClient

from assured import TopicPartition, open_log
from assured.testing.kafka import KafkaCluster
from tests.conftest import create_topic

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _coordinator(bootstrap: str, group: str) -> int:
    deadline = time.monotonic() + 60
    while True:  # the coordinator may still be moving (NOT_COORDINATOR): ask again, afresh
        admin = AdminClient({"bootstrap.servers": bootstrap})
        try:
            found = admin.describe_consumer_groups([group])[group].result(timeout=30)
            return int(found.coordinator.id)
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_stable_read_of_committed_offsets_never_goes_backwards(
    kafka_cluster: KafkaCluster,
) -> None:
    bootstrap = kafka_cluster.bootstrap
    topic = create_topic(bootstrap, partitions=1, replication=3)
    group = f"failover-{uuid.uuid4().hex[:8]}"
    tp = TopicPartition(topic, 0)
    committer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    acked = [0]
    stop = threading.Event()

    def commit() -> None:  # back to back, from a member that never joins (the group is empty)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                committer.commit(offsets=[KTopicPartition(topic, 0, n)], asynchronous=False)
                acked[0] = n
            except KafkaException:
                n -= 1
                time.sleep(0.05)

    drops: dict[bool, list[tuple[int, int]]] = {False: [], True: []}

    def watch(stable: bool) -> None:
        log = open_log(f"kafka://{bootstrap}")
        last = -1
        with log.admin() as admin:
            while not stop.is_set():
                try:
                    now = admin.committed_offsets(group, [topic], stable=stable).get(tp, -1)
                except Exception:
                    time.sleep(0.05)
                    continue
                if now < last:
                    drops[stable].append((last, now))
                last = max(last, now)
                time.sleep(0.01)

    threads = [threading.Thread(target=commit)] + [
        threading.Thread(target=watch, args=(s,)) for s in (False, True)
    ]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while acked[0] < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        before = acked[0]
        for _ in range(3):
            node = _coordinator(bootstrap, group)
            kafka_cluster.kill(node)
            time.sleep(3)
            kafka_cluster.restart(node)
            time.sleep(2)
        assert acked[0] > before  # the commits went on through every failover
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        committer.close()
    assert drops[True] == [], f"a stable read went backwards: {drops[True]}"
    print(f"plain reads that lagged: {drops[False]}; stable: none; commits: {acked[0]}")
