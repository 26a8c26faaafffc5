"""The audit's input: N messages with unique ids, each keyed by an account, each with the fate
it was meant to have in a header. The processor's handler reads the fate and acts it out; the
checker knows from it what each message's outcome must be.

Fates whose outcome is an effect (a record on the output topic, or a row in the sink):

- ``ok``: handled once, no trouble;
- ``transient``: the first attempt in each process sends its output, then raises; the retry
  succeeds (a failed attempt must leave nothing behind);
- ``stray``: as ``transient``, and the failed attempt leaves work running (a task, or a thread
  for a plain ``def``) that makes the effect again a moment later, through the same ``out`` or
  ``db``: it must be refused, not committed with the retry or with another record's work;
- ``fatal``: once in the whole run, the handler sends its output, then raises an error the
  runtime must not retry (a fatal one): the App stops and is restarted;
- ``slow``: once in the whole run, the handler outlasts the transaction timeout and
  ``max_poll_interval_ms``;
- ``zombie``: once in the whole run, the handler SIGSTOPs its own process in the middle of a
  transaction or database batch (the audit SIGCONTs it once its partitions have moved). Under
  exactly-once to topics, every other zombie (by its id) stops later instead: after the
  transaction's offsets were sent into it and before its commit, so the group's position is
  pending (unstable) while the partitions move and the group rebalances again around it.

Fates whose outcome is a dead letter, never an effect:

- ``poison``: the handler always raises at once;
- ``permanent``: the handler always sends its output, then raises;
- ``oversize``: the handler's only output is refused: a 2 MB record (over the log's limit), or
  on a sink a row the database refuses (a NULL in a NOT NULL column).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from assured.log import DeliveryReport, Log, Producer, TopicPartition

__all__ = ["EFFECT_FATES", "REFUSED_FATES", "Workload", "make_ids", "produce"]

ACCOUNTS = 50
EFFECT_FATES = ("ok", "transient", "stray", "fatal", "slow", "zombie", "diskfull", "conflict")
REFUSED_FATES = ("poison", "permanent", "oversize")


def make_ids(n: int) -> list[str]:
    return [f"m-{i:07d}" for i in range(n)]


@dataclass
class Workload:
    """What was sent, and what the producer was told of it."""

    topic: str
    ids: list[str]
    keys: dict[str, str]
    poison: set[str]  # ids whose outcome must be a dead letter (every refused fate)
    fates: dict[str, str] = field(default_factory=dict)  # id -> fate, for every fate but ok
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
    fates: Mapping[int, str] | None = None,
) -> Workload:
    """Send ``n`` messages to ``topic``; ``fates`` marks messages by index (the rest are ``ok``,
    or ``poison`` at ``poison_rate``); ``lost_acks`` of the producer's batches lose their
    acknowledgement (embedded engine only: the idempotent producer must not duplicate them)."""
    rng = random.Random(seed)
    ids = make_ids(n)
    keys = {i: f"acct-{rng.randrange(ACCOUNTS):03d}" for i in ids}
    poison = {i for i in ids if rng.random() < poison_rate}
    marked = {ids[index]: fate for index, fate in (fates or {}).items() if index < n}
    for mid in poison:
        marked.setdefault(mid, "poison")
    unknown = set(marked.values()) - set(EFFECT_FATES) - set(REFUSED_FATES)
    if unknown:
        raise ValueError(f"unknown fate(s) {sorted(unknown)}")
    refused = {mid for mid, fate in marked.items() if fate in REFUSED_FATES}
    wl = Workload(topic, ids, keys, refused, {m: f for m, f in marked.items() if f != "ok"})
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
        fate = marked.get(mid, "ok")
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
