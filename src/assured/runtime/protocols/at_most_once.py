"""At most once: commit the positions, then handle.

A crash after the commit and before the handling loses those records; nothing is ever handled
twice, because the next owner starts after them."""

from __future__ import annotations

import logging

from assured._retry import Backoff
from assured.errors import LogError, StaleGenerationError
from assured.log import Producer, Record, TopicPartition
from assured.runtime.crashpoints import crash_point
from assured.runtime.protocols._base import CommitProtocol, log_commit, next_offsets

__all__ = ["AtMostOnce"]

log = logging.getLogger("assured.runtime")


class AtMostOnce(CommitProtocol):
    guarantee = "at-most-once"

    def start(self) -> None:
        self.producer: Producer = self.rt.log.producer()

    def process(self, records: list[Record]) -> None:
        if not records:  # records side by side still running: let them go on
            self.rt.handle([], self.producer)
            return
        offsets = next_offsets(records)
        try:
            with self.rt.metrics.commit_latency.labels(self.guarantee).time():
                self.rt.consumer.commit(offsets)  # the offset, before processing
        except StaleGenerationError as e:
            # Not ours any more: the new owner starts at the committed offset, so handling
            # these here could handle them twice. Skip them.
            log.warning("commit refused, skipping %d records: %s", len(records), e)
            return
        self.rt.metrics.committed.labels(self.guarantee).inc()
        log_commit("commit", "committed before handling", offsets)
        crash_point("after-commit-before-handle")
        sink = self.rt.sink
        if sink is None:
            self.rt.handle(records, self.producer)
        else:
            for record in records:  # each effect its own database transaction
                if self.rt.specs[record.topic].sink is not None:
                    self._into_sink(record)
                else:
                    self.rt.handle([record], self.producer)
        # No flush per batch: losing an unflushed output in a crash is within this guarantee,
        # and waiting for acknowledgements would stall every batch. close() flushes.
        self.producer.poll(0)

    def _into_sink(self, record: Record) -> None:
        """One record's effects in one database transaction. A database that is away is
        waited for (within the retry deadline), then the record is given up: lost, as this
        guarantee allows, and said so; never dead-lettered for a fault that is not its own."""
        assert self.rt.sink is not None
        backoff = Backoff(self.rt.settings.retry_deadline_ms / 1000)
        while True:
            try:
                with self.rt.sink.transaction(
                    group=self.rt.settings.group, incarnations=self.rt.incarnations
                ) as tx:
                    self.rt.handle([record], self.producer, tx)
                return
            except LogError as e:
                if not e.retriable:
                    raise
                if not backoff.pause():
                    log.error(
                        "%s[%d]@%d lost: its offset was committed before handling "
                        "(at-most-once) and the database stayed unavailable: %s",
                        record.topic, record.partition, record.offset, e,
                    )  # fmt: skip
                    return

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        # Records side by side finish before their partitions go (committed already).
        if self.rt.in_flight() and not self.failed:
            self.rt.handle([], self.producer, complete=True)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        self.rt.give_up(partitions)

    def close(self) -> None:
        try:
            if self.rt.in_flight() and not self.failed:
                self.rt.handle([], self.producer, complete=True)
        finally:
            self.rt.give_up()
            self.producer.close()

    def abandon(self) -> None:
        super().abandon()
        self.rt.give_up()
