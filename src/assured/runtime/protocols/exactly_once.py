"""Exactly once, log to log: outputs and positions commit in one transaction.

Each transaction spans ``commit_interval_ms`` (100 ms by default) of batches: begin, handle
(outputs go into the transaction), send the positions to the transaction with the consumer's
group metadata (so a zombie of an older generation is refused), commit. If the transaction
aborts, nothing it wrote is visible and the positions never moved, so we seek back to the first
record it covered and handle those records again."""

from __future__ import annotations

import logging
import time
import uuid

from assured.errors import AssuredError
from assured.log import Producer, Record, TopicPartition
from assured.runtime.crashpoints import crash_point
from assured.runtime.protocols._base import CommitProtocol, first_offsets, next_offsets

__all__ = ["ExactlyOnce"]

log = logging.getLogger("assured.runtime")


class ExactlyOnce(CommitProtocol):
    guarantee = "exactly-once"

    def start(self) -> None:
        s = self.rt.settings
        txn_id = s.transactional_id or f"{s.group}-{uuid.uuid4().hex[:12]}"
        self.txn_id = txn_id
        self.seq = 0
        self.producer: Producer = self.rt.log.producer(
            transactional_id=txn_id, transaction_timeout_ms=s.transaction_timeout_ms
        )
        self.producer.init_transactions(s.retry_deadline_ms / 1000)
        self.open = False
        self.began = 0.0
        self.count = 0
        self.pending: dict[TopicPartition, int] = {}
        self.rewind: dict[TopicPartition, int] = {}  # first offset each partition had in the txn

    def process(self, records: list[Record]) -> None:
        if not self.open:
            self.producer.begin_transaction()
            self.open, self.began, self.count = True, time.monotonic(), 0
            self.seq += 1
            self.rt.transaction = f"{self.txn_id}:{self.seq}"
        for tp, first in first_offsets(records).items():
            self.rewind.setdefault(tp, first)
        try:
            self.rt.handle(records, self.producer)
        except AssuredError as e:
            if e.fatal:
                self.abort()  # the records are not committed: handled again after a restart
            raise
        crash_point("inside-transaction")
        self.pending.update(next_offsets(records))
        self.count += len(records)

    def tick(self) -> None:
        s = self.rt.settings
        if self.open and (
            time.monotonic() - self.began >= s.commit_interval_ms / 1000
            or self.count >= s.commit_every
        ):
            self.commit()

    def commit(self) -> None:
        if not self.open:
            return
        deadline = self.rt.settings.retry_deadline_ms / 1000
        try:
            with self.rt.metrics.commit_latency.labels(self.guarantee).time():
                if self.pending:
                    meta = self.rt.consumer.group_metadata()
                    self.producer.send_offsets_to_transaction(self.pending, meta, deadline)
                crash_point("after-handle-before-commit")
                self.producer.commit_transaction(deadline)
        except AssuredError as e:
            if e.fatal:
                self.fenced = e.fenced
                raise
            log.warning("transaction could not commit (%s): aborting and rewinding", e)
            self.abort()
            return
        self.rt.metrics.committed.labels(self.guarantee).inc()
        self._tell("committed")
        self.open = False
        self.pending.clear()
        self.rewind.clear()

    def abort(self, seek_back: bool = True) -> None:
        """Abort the open transaction; Kafka does not rewind the consumer, so we do."""
        if self.open:
            self._tell("aborted")  # before: if we die now, the log aborts it anyway
            self.producer.abort_transaction(self.rt.settings.retry_deadline_ms / 1000)
            self.rt.metrics.aborts.labels(self.guarantee).inc()
        if seek_back:
            assigned = set(self.rt.consumer.assignment())
            for tp, offset in self.rewind.items():
                if tp in assigned:
                    self.rt.consumer.seek(tp, offset)
        self.open = False
        self.pending.clear()
        self.rewind.clear()

    def _tell(self, outcome: str) -> None:
        if self.rt.on_transaction is not None and self.rt.transaction is not None:
            self.rt.on_transaction(self.rt.transaction, outcome)
        self.rt.transaction = None

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        if not self.fenced:
            self.commit()  # before the partitions move, while our generation still counts

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        if self.open:
            self.abort(seek_back=False)

    def close(self) -> None:
        if not self.fenced:
            self.commit()
        self.producer.close()
