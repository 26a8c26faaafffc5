"""At least once: handle, make the outputs durable, then commit the positions.

A crash after the handling and before the commit hands those records to the next owner, which
handles them again: duplicates, never loss. Commits are batched (every ``commit_every`` records
or ``commit_interval_ms``) and made synchronously when partitions are revoked and at close."""

from __future__ import annotations

import logging
import time

from assured.errors import StaleGenerationError
from assured.log import Producer, Record, TopicPartition
from assured.runtime.crashpoints import crash_point
from assured.runtime.protocols._base import CommitProtocol, next_offsets

__all__ = ["AtLeastOnce"]

log = logging.getLogger("assured.runtime")


class AtLeastOnce(CommitProtocol):
    guarantee = "at-least-once"

    def start(self) -> None:
        self.producer: Producer = self.rt.log.producer()
        self.pending: dict[TopicPartition, int] = {}
        self.uncommitted = 0
        self.last_commit = time.monotonic()

    def process(self, records: list[Record]) -> None:
        sink = self.rt.sink
        if sink is not None:
            with sink.transaction() as tx:
                self.rt.handle(records, self.producer, tx)
            crash_point("after-effect-before-offset")
        else:
            self.rt.handle(records, self.producer)
        self.pending.update(next_offsets(records))
        self.uncommitted += len(records)

    def tick(self) -> None:
        s = self.rt.settings
        due = time.monotonic() - self.last_commit >= s.commit_interval_ms / 1000
        if self.pending and (due or self.uncommitted >= s.commit_every):
            self.commit(synchronous=False)

    def commit(self, synchronous: bool) -> None:
        if not self.pending:
            return
        self.producer.flush()  # outputs are durable before the offsets that cover them
        crash_point("after-handle-before-commit")
        try:
            with self.rt.metrics.commit_latency.labels(self.guarantee).time():
                self.rt.consumer.commit(self.pending, asynchronous=not synchronous)
            self.rt.metrics.committed.labels(self.guarantee).inc()
        except StaleGenerationError as e:
            # The group moved on; the next owners will handle these again (at least once).
            log.warning("commit refused, records will be handled again: %s", e)
        self.pending.clear()
        self.uncommitted = 0
        self.last_commit = time.monotonic()

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        self.commit(synchronous=True)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.pending.pop(tp, None)

    def close(self) -> None:
        if not self.fenced:
            self.commit(synchronous=True)
        self.producer.close()
