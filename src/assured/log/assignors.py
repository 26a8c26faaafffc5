"""How a consumer group's partitions are divided among its members.

Pure functions of (members' subscriptions, partitions per topic[, previous assignment]), so
every member that computes an assignment computes the same one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from assured.log._models import TopicPartition

__all__ = ["ASSIGNORS", "Assignment", "range_assign", "sticky_assign"]

Assignment = dict[str, list[TopicPartition]]


def range_assign(
    subscriptions: Mapping[str, Sequence[str]],
    partitions: Mapping[str, int],
    previous: Mapping[str, Sequence[TopicPartition]] | None = None,
) -> Assignment:
    """Kafka's RangeAssignor: per topic, members (sorted) take contiguous ranges, the first
    ``n % members`` of them one partition more."""
    out: Assignment = {m: [] for m in subscriptions}
    topics = sorted({t for ts in subscriptions.values() for t in ts if t in partitions})
    for topic in topics:
        members = sorted(m for m, ts in subscriptions.items() if topic in ts)
        n = partitions[topic]
        per, extra = divmod(n, len(members))
        start = 0
        for i, m in enumerate(members):
            count = per + (1 if i < extra else 0)
            out[m].extend(TopicPartition(topic, p) for p in range(start, start + count))
            start += count
    return out


def sticky_assign(
    subscriptions: Mapping[str, Sequence[str]],
    partitions: Mapping[str, int],
    previous: Mapping[str, Sequence[TopicPartition]] | None = None,
) -> Assignment:
    """Balanced, and moving as few partitions as it can: each member keeps what it had (up to
    its fair share), the rest go to the least-loaded members that subscribe to them."""
    previous = previous or {}
    members = sorted(subscriptions)
    out: Assignment = {m: [] for m in members}
    all_tps = sorted(
        TopicPartition(t, p)
        for t in {t for ts in subscriptions.values() for t in ts if t in partitions}
        for p in range(partitions[t])
    )
    if not members:
        return out
    quota, extra = divmod(len(all_tps), len(members))
    taken: set[TopicPartition] = set()
    # Keep previous ownership up to the fair share (quota, or quota+1 for the first `extra`).
    bigger = 0
    for m in members:
        kept = [
            tp
            for tp in sorted(previous.get(m, ()))
            if tp in all_tps and tp not in taken and tp.topic in subscriptions[m]
        ]
        cap = quota + (1 if bigger < extra else 0)
        kept = kept[:cap]
        if len(kept) > quota:
            bigger += 1
        out[m].extend(kept)
        taken.update(kept)
    for tp in all_tps:
        if tp in taken:
            continue
        eligible = [m for m in members if tp.topic in subscriptions[m]]
        if not eligible:
            continue
        target = min(eligible, key=lambda m: (len(out[m]), m))
        out[target].append(tp)
        taken.add(tp)
    for m in members:
        out[m].sort()
    return out


ASSIGNORS = {"range": range_assign, "sticky": sticky_assign}
