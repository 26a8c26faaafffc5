"""At most once: commit the positions, then handle.

A crash after the commit and before the handling loses those records; nothing is ever handled
twice, because the next owner starts after them."""

from __future__ import annotations

import logging

from assured._retry import Backoff
from assured.errors import LogError, StaleGenerationError
from assured.log import Producer, Record, TopicPartition
from assured.runtime.crashpoints import crash_point
from assured.runtime.protocols._base import CommitProtocol, Trouble, log_commit, next_offsets
from assured.sinks import SinkCommitUnknownError

__all__ = ["AtMostOnce"]

log = logging.getLogger("assured.runtime")


class AtMostOnce(CommitProtocol):
    guarantee = "at-most-once"

    def start(self) -> None:
        self.producer: Producer = self.rt.log.producer()
        self.trouble = Trouble()
        # Positions committed so far: a batch polled again after a rewind never commits below
        # them (a crash would have the next owner handle again what was committed here).
        self.committed: dict[TopicPartition, int] = {}

    def process(self, records: list[Record]) -> None:
        if not records:  # records side by side still running: let them go on
            self._side_by_side([])
            return
        offsets = {
            tp: off for tp, off in next_offsets(records).items() if off > self.committed.get(tp, -1)
        }
        try:
            if offsets:
                with self.rt.metrics.commit_latency.labels(self.guarantee).time():
                    self.rt.consumer.commit(offsets)  # the offset, before processing
                self.committed.update(offsets)
        except StaleGenerationError as e:
            # Not ours any more: the new owner starts at the committed offset, so handling
            # these here could handle them twice. Skip them.
            log.warning("commit refused, skipping %d records: %s", len(records), e)
            return
        self.rt.metrics.committed.labels(self.guarantee).inc()
        log_commit("commit", "committed before handling", offsets)
        crash_point("after-commit-before-handle")
        sink = self.rt.sink
        if sink is None or self.rt.sink_side_by_side:
            self._side_by_side(records)
        else:
            for record in records:  # each effect its own database transaction
                if self.rt.specs[record.topic].sink is not None:
                    self._into_sink(record)
                else:
                    self.rt.handle([record], self.producer)
        # No flush per batch: losing an unflushed output in a crash is within this guarantee,
        # and waiting for acknowledgements would stall every batch. close() flushes.
        self.producer.poll(0)

    def _side_by_side(self, records: list[Record]) -> None:
        """Records (side by side, or without a sink) through their handlers. A database that
        is away when a window commits: the records of that commit rolled back, so they are
        handled again from the window's heads (not a repeat: nothing of them committed),
        within the retry deadline; a commit whose outcome is unknown is not redone (it may
        have landed): those records may be lost, as this guarantee allows, and said so."""
        try:
            self.rt.handle(records, self.producer)
        except LogError as e:
            if not e.retriable or e.fatal or self.rt.sink is None:
                raise
            if isinstance(e, SinkCommitUnknownError):
                log.error("%s; the records in flight are given up (at-most-once)", e)
                self.rt.give_up()
                return
            if self.trouble.seconds() * 1000 > self.rt.settings.retry_deadline_ms:
                raise
            log.warning("%s; handling the records in flight again shortly", e)
            self.rt.seek_back({}, records)
            self.trouble.pause()
            return
        self.trouble.over()

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
                if self.rt.past_drain() or not backoff.pause():  # a stop waits no longer
                    log.error(
                        "%s[%d]@%d lost: its offset was committed before handling "
                        "(at-most-once) and the database stayed unavailable: %s",
                        record.topic, record.partition, record.offset, e,
                    )  # fmt: skip
                    return

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:  # committed anew by whoever held them meanwhile
            self.committed.pop(tp, None)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        # Records side by side finish before their partitions go (committed already).
        if self.rt.in_flight() and not self.failed:
            self.rt.handle([], self.producer, complete=True)
        for tp in partitions:
            self.committed.pop(tp, None)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        self.rt.give_up(partitions)
        for tp in partitions:
            self.committed.pop(tp, None)

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
