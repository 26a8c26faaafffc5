"""The audit's input: N messages with unique ids, each keyed by an account, each with the fate
it was meant to have in a header (``ok``, or ``poison``: the handler rejects it, so it must end
in the dead-letter topic, not among the effects)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from assured.log import DeliveryReport, Log, Producer, TopicPartition

__all__ = ["Workload", "make_ids", "produce"]

ACCOUNTS = 50


def make_ids(n: int) -> list[str]:
    return [f"m-{i:07d}" for i in range(n)]


@dataclass
class Workload:
    """What was sent, and what the producer was told of it."""

    topic: str
    ids: list[str]
    keys: dict[str, str]
    poison: set[str]
    acked: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    lost_acks: int = 0  # injected: the write landed, the acknowledgement did not
    ends: dict[TopicPartition, int] = field(default_factory=dict)


def produce(
    log: Log,
    topic: str,
    n: int,
    seed: int,
    poison_rate: float = 0.0,
    lost_acks: int = 0,
) -> Workload:
    """Send ``n`` messages to ``topic``; ``lost_acks`` of the producer's batches lose their
    acknowledgement (embedded engine only: the idempotent producer must not duplicate them)."""
    rng = random.Random(seed)
    ids = make_ids(n)
    keys = {i: f"acct-{rng.randrange(ACCOUNTS):03d}" for i in ids}
    poison = {i for i in ids if rng.random() < poison_rate}
    wl = Workload(topic, ids, keys, poison)
    producer = log.producer(linger_ms=20, batch_size=500)
    inject = lost_acks > 0 and hasattr(producer, "lose_next_ack")
    lose_at = (
        sorted(rng.sample(range(1, max(2, n)), min(lost_acks, max(1, n - 1)))) if inject else []
    )

    def delivered(mid: str) -> Callable[[DeliveryReport], None]:
        def record(report: DeliveryReport) -> None:
            (wl.failed if report.error else wl.acked).add(mid)

        return record

    for index, mid in enumerate(ids):
        fate = "poison" if mid in poison else "ok"
        value = json.dumps({"id": mid, "account": keys[mid], "cents": rng.randrange(100, 100_000)})
        producer.send(
            topic,
            value.encode(),
            key=keys[mid].encode(),
            headers=[("id", mid.encode()), ("fate", fate.encode())],
            on_delivery=delivered(mid),
        )
        if lose_at and index == lose_at[0]:
            lose_at.pop(0)
            _lose_next_ack(producer)
            wl.lost_acks += 1
    producer.flush(120)
    producer.close()
    with log.admin() as admin:
        for p in range(admin.describe_topic(topic).partitions):
            tp = TopicPartition(topic, p)
            wl.ends[tp] = admin.watermarks(tp).high
    return wl


def _lose_next_ack(producer: Producer) -> None:
    producer.lose_next_ack = True  # type: ignore[attr-defined]
    producer.flush(60)  # the batch so far lands; its acknowledgement goes missing; it is resent
