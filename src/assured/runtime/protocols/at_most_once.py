"""At most once: commit the positions, then handle.

A crash after the commit and before the handling loses those records; nothing is ever handled
twice, because the next owner starts after them."""

from __future__ import annotations

import logging

from assured.errors import StaleGenerationError
from assured.log import Producer, Record
from assured.runtime.crashpoints import crash_point
from assured.runtime.protocols._base import CommitProtocol, next_offsets

__all__ = ["AtMostOnce"]

log = logging.getLogger("assured.runtime")


class AtMostOnce(CommitProtocol):
    guarantee = "at-most-once"

    def start(self) -> None:
        self.producer: Producer = self.rt.log.producer()

    def process(self, records: list[Record]) -> None:
        try:
            with self.rt.metrics.commit_latency.labels(self.guarantee).time():
                self.rt.consumer.commit(next_offsets(records))  # the offset, before processing
        except StaleGenerationError as e:
            # Not ours any more: the new owner starts at the committed offset, so handling
            # these here could handle them twice. Skip them.
            log.warning("commit refused, skipping %d records: %s", len(records), e)
            return
        self.rt.metrics.committed.labels(self.guarantee).inc()
        crash_point("after-commit-before-handle")
        sink = self.rt.sink
        if sink is None:
            self.rt.handle(records, self.producer)
        else:
            for record in records:  # each effect its own database transaction
                if self.rt.specs[record.topic].sink is not None:
                    with sink.transaction() as tx:
                        self.rt.handle([record], self.producer, tx)
                else:
                    self.rt.handle([record], self.producer)
        # No flush per batch: losing an unflushed output in a crash is within this guarantee,
        # and waiting for acknowledgements would stall every batch. close() flushes.
        self.producer.poll(0)

    def close(self) -> None:
        self.producer.close()
