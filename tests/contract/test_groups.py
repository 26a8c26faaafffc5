"""Consumer groups: partitions divided among members, moved on join and leave, no record lost."""

from __future__ import annotations

from collections.abc import Callable

from assured.log import Consumer, Log, Record, TopicPartition
from tests.contract.conftest import poll_until, unique


class Tracker:
    """A member's rebalance callbacks, and the at-least-once commit on revoke."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.assigned: list[list[TopicPartition]] = []
        self.revoked: list[list[TopicPartition]] = []
        self.lost: list[list[TopicPartition]] = []

    def on_assign(self, tps: list[TopicPartition]) -> None:
        self.assigned.append(tps)

    def on_revoke(self, tps: list[TopicPartition]) -> None:
        self.revoked.append(tps)
        self.consumer.commit()  # what was processed stays processed

    def on_lost(self, tps: list[TopicPartition]) -> None:
        self.lost.append(tps)


def test_two_members_share_partitions_and_lose_no_record_across_the_move(
    log: Log, topic: Callable[..., str]
) -> None:
    name = topic(partitions=4)
    group = unique("g")
    with log.producer() as producer:
        for i in range(400):
            producer.send(name, f"{i}".encode(), key=f"k{i}".encode())
        producer.flush(30)

    first = log.consumer(group_id=group, session_timeout_ms=6000, heartbeat_interval_ms=500)
    one = Tracker(first)
    first.subscribe([name], on_assign=one.on_assign, on_revoke=one.on_revoke)
    seen: list[Record] = poll_until(first, lambda: len(first.assignment()) == 4)
    assert one.assigned[-1] == [TopicPartition(name, p) for p in range(4)]
    # Take part of the topic, and commit it.
    while len(seen) < 150:
        seen += first.poll(max_records=50, timeout=0.5)
    first.commit()

    second = log.consumer(group_id=group, session_timeout_ms=6000, heartbeat_interval_ms=500)
    two = Tracker(second)
    second.subscribe([name], on_assign=two.on_assign, on_revoke=two.on_revoke)

    def balanced() -> bool:
        seen.extend(first.poll(max_records=50, timeout=0.1))
        seen.extend(second.poll(max_records=50, timeout=0.1))
        return len(first.assignment()) == 2 and len(second.assignment()) == 2

    deadline_rounds = 0
    while not balanced():
        deadline_rounds += 1
        assert deadline_rounds < 300, "the group never settled on two members"
    assert one.revoked, "the first member had its partitions revoked before they moved"
    assert set(first.assignment()).isdisjoint(second.assignment())
    assert set(first.assignment()) | set(second.assignment()) == {
        TopicPartition(name, p) for p in range(4)
    }
    for _ in range(60):
        seen += first.poll(max_records=100, timeout=0.1)
        seen += second.poll(max_records=100, timeout=0.1)
        if len({r.value for r in seen}) == 400:
            break
    first.commit()
    second.commit()
    values = {int(r.value or b"") for r in seen}
    assert values == set(range(400)), "no record lost across the rebalance"

    second.close()  # leaving hands its partitions back
    poll_until(first, lambda: len(first.assignment()) == 4)
    first.close()
    with log.admin() as admin:
        committed = admin.committed_offsets(group)
        for p in range(4):
            high = admin.watermarks(TopicPartition(name, p)).high
            assert committed[TopicPartition(name, p)] == high


def test_group_metadata_and_describe(log: Log, topic: Callable[..., str]) -> None:
    name = topic(partitions=2)
    group = unique("g")
    with log.consumer(group_id=group) as consumer:
        consumer.subscribe([name])
        poll_until(consumer, lambda: len(consumer.assignment()) == 2)
        meta = consumer.group_metadata()
        assert meta.group_id == group
        with log.admin() as admin:
            assert group in admin.list_groups()
            desc = admin.describe_group(group)
            assert desc.state == "Stable"
            assert len(desc.members) == 1
            assert set(desc.members[0].assignment) == {TopicPartition(name, p) for p in range(2)}
