"""Exactly once, log to database: effects and positions commit in one database transaction.

On assignment we claim the partitions in the database (bumping an epoch that fences any older
owner) and start reading where the database says we stopped. Each batch is one database
transaction: the handlers' effects, then the positions, written only if our epoch still holds.
The group offset is committed afterwards too, only so lag tools show the truth; the database
is what counts."""

from __future__ import annotations

import logging

from assured.errors import AssuredError
from assured.log import Producer, Record, TopicPartition
from assured.runtime.crashpoints import crash_point
from assured.runtime.protocols._base import CommitProtocol, next_offsets
from assured.sinks import Sink, SinkFencedError

__all__ = ["ExactlyOnceSink"]

log = logging.getLogger("assured.runtime")


class ExactlyOnceSink(CommitProtocol):
    guarantee = "exactly-once"

    def start(self) -> None:
        assert self.rt.sink is not None
        self.sink: Sink = self.rt.sink
        self.dead_letters: Producer = self.rt.log.producer()
        self.epochs: dict[TopicPartition, int] = {}

    def on_assign(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        claims = self.sink.claim(self.rt.settings.group, partitions)
        starts: dict[TopicPartition, int] = {}
        for tp, (stored, epoch) in claims.items():
            self.epochs[tp] = epoch
            if stored is not None:
                starts[tp] = stored  # the database, not the group offset, says where we were
        return starts

    def process(self, records: list[Record]) -> None:
        mine = [r for r in records if TopicPartition(r.topic, r.partition) in self.epochs]
        if not mine:
            return
        offsets = next_offsets(mine)
        try:
            timer = self.rt.metrics.commit_latency.labels(self.guarantee).time()
            with timer, self.sink.transaction() as tx:
                self.rt.handle(mine, self.dead_letters, tx)
                crash_point("after-effect-before-offset")
                self.sink.store_offsets(tx, self.rt.settings.group, offsets, self.epochs)
                # Dead letters must be durable before the offsets that skip their records.
                self.dead_letters.flush()
        except SinkFencedError as e:
            log.warning("%s; dropping the partitions until the group reassigns them", e)
            for tp in offsets:
                self.epochs.pop(tp, None)
            return
        self.rt.metrics.committed.labels(self.guarantee).inc()
        try:
            self.rt.consumer.commit(offsets, asynchronous=True)
        except AssuredError as e:  # only for lag tools; the database already has the truth
            log.debug("group offset commit skipped: %s", e)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.epochs.pop(tp, None)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        self.on_revoke(partitions)

    def close(self) -> None:
        self.dead_letters.close()
