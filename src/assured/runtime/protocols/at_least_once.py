"""At least once: handle, make the outputs durable, then commit the positions.

A crash after the handling and before the commit hands those records to the next owner, which
handles them again: duplicates, never loss. Commits are batched (every ``commit_every`` records
or ``commit_interval_ms``) and made synchronously when partitions are revoked and at close.

No position is committed past a record whose output or dead letter was not acknowledged: when
the flush before a commit reports a failed delivery, nothing is committed and the consumer goes
back to the last committed positions. A failure that may be one record's fault (a record the
broker refused) has those records redone one at a time, each flushed before its commit, so the
record at fault is retried and dead-lettered alone; a failure of the log (a timeout) is retried
until ``retry_deadline_ms`` has passed without a commit, then the App stops.

Records side by side (``concurrency`` > 1) commit each partition's contiguous handled prefix,
and with ``remember_handled`` the commit's offset metadata names the records handled above it
(see :mod:`assured.runtime._completed`): the next owner skips those.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from assured.errors import AssuredError, DeliveryError, LogError, StaleGenerationError
from assured.log import Producer, Record, TopicPartition
from assured.runtime._completed import decode, encode
from assured.runtime._handling import dead_letter, producer_dead_letters
from assured.runtime.crashpoints import crash_point
from assured.runtime.protocols._base import (
    CommitProtocol,
    Trouble,
    isolated,
    log_commit,
)

__all__ = ["AtLeastOnce"]

log = logging.getLogger("assured.runtime")

_Key = tuple[TopicPartition, int]


class AtLeastOnce(CommitProtocol):
    guarantee = "at-least-once"

    def start(self) -> None:
        self.producer: Producer = self.rt.log.producer()
        self.pending: dict[TopicPartition, int] = {}
        self.rewind: dict[TopicPartition, int] = {}  # first uncommitted offset per partition
        self.uncommitted = 0
        self.last_commit = time.monotonic()
        self.isolate: dict[TopicPartition, int] = {}  # below these offsets: one at a time
        self.strikes: dict[_Key, int] = {}
        self.trouble = Trouble()  # failed flushes or database transactions in a row
        # Records side by side: the handled-above metadata last committed per partition.
        self.noted: dict[TopicPartition, str] = {}
        self.remember = self.rt.settings.remember_handled and any(
            spec.windowed for spec in self.rt.specs.values()
        )

    def process(self, records: list[Record]) -> None:
        try:
            if not self.isolate:
                self._handle(records, records)
                return
            for i, r in enumerate(records):
                if not isolated(self.isolate, r):
                    # one at a time, each over before the next (records side by side too), so
                    # the commit before a record redone alone holds all before it
                    if not self._handle([r], records[i:], complete=True):
                        return
                elif not (self.commit(True, records[i:]) and self._one_alone(r, records[i + 1 :])):
                    return
        except BaseException:
            self.abandon()
            raise

    def _handle(
        self, records: Sequence[Record], unhandled: Sequence[Record], complete: bool = False
    ) -> bool:
        for tp, offset in self.rt.heads().items():  # still in flight from earlier batches
            self.rewind.setdefault(tp, offset)
        for r in records:
            self.rewind.setdefault(TopicPartition(r.topic, r.partition), r.offset)
        sink = self.rt.sink
        try:
            if sink is not None and not self.rt.sink_side_by_side:
                with sink.transaction(
                    group=self.rt.settings.group, incarnations=self.rt.incarnations
                ) as tx:
                    done = self.rt.handle(records, self.producer, tx, complete=complete)
                crash_point("after-effect-before-offset")
            else:
                done = self.rt.handle(records, self.producer, complete=complete)
        except LogError as e:
            if not e.retriable:
                raise
            # The database (or the log) is away: its transaction rolled back. Redo from here.
            log.warning("%s; handling these records again shortly", e)
            self.rt.seek_back({}, unhandled)
            self._trouble(e)
            return False
        self.pending.update(done)
        self.uncommitted += len(records)
        return True

    def _one_alone(self, record: Record, unhandled: Sequence[Record]) -> bool:
        """``record`` alone, its outputs flushed before its position is committed; a record
        whose outputs keep being refused is dead-lettered after its handler's retries."""
        tp = TopicPartition(record.topic, record.partition)
        key = (tp, record.offset)
        if not self._handle([record], [record, *unhandled], complete=True):
            return False
        try:
            self.producer.flush()
        except DeliveryError as e:
            if e.retriable:
                self._undo(e, unhandled)
                return False
            self.pending.pop(tp, None)
            strikes = self.strikes[key] = self.strikes.get(key, 0) + 1
            spec = self.rt.specs[record.topic]
            if strikes <= spec.retries:
                time.sleep(min(2.0, spec.backoff_s * 2 ** (strikes - 1)))
                self.rt.seek_back({tp: record.offset}, unhandled)
                self.rewind.pop(tp, None)
                return False
            labels = (self.guarantee, record.topic)
            dlq = producer_dead_letters(self.producer, self.guarantee)
            dead_letter(spec, record, e, strikes, dlq, self.rt.metrics, labels)
            self.pending[tp] = record.offset + 1
        self.strikes.pop(key, None)
        return self.commit(True, unhandled)

    def tick(self, caught_up: bool = False) -> None:
        s = self.rt.settings
        due = time.monotonic() - self.last_commit >= s.commit_interval_ms / 1000
        if due and not self.pending:
            # Nothing new below the heads; a commit only if the records above them changed.
            above = self._handled_above()
            if not self._changed(above):
                if above:  # a head that is slow: look again an interval later, not every pass
                    self.last_commit = time.monotonic()
                return
        if due or (self.pending and self.uncommitted >= s.commit_every):
            try:
                self.commit(synchronous=False)
            except BaseException:
                self.abandon()
                raise

    def commit(self, synchronous: bool, unhandled: Sequence[Record] = ()) -> bool:
        """Flush, then commit what is processed. False if a delivery failed: nothing was
        committed, and the consumer is back at the last committed positions."""
        # Taken before the flush: the outputs of the records it names are among those the
        # flush makes durable.
        above = self._handled_above()
        changed = self._changed(above)
        if not self.pending and not changed:
            return True
        try:
            self.producer.flush()  # outputs are durable before the offsets that cover them
        except DeliveryError as e:
            self._undo(e, unhandled)
            return False
        crash_point("after-handle-before-commit")
        offsets = dict(self.pending)
        metadata: dict[TopicPartition, str] = {}
        for tp, (head, text) in above.items():
            # A partition's first record still in the window: every record before it is
            # handled (taken out as the prefix), so it is a position to commit as it stands.
            if (tp in offsets or tp in changed) and offsets.setdefault(tp, head) == head:
                metadata[tp] = text
        try:
            with self.rt.metrics.commit_latency.labels(self.guarantee).time():
                self.rt.consumer.commit(
                    offsets, asynchronous=not synchronous, metadata=metadata or None
                )
            self.rt.metrics.committed.labels(self.guarantee).inc()
            log_commit("commit", "committed", offsets)
            self.noted.update({tp: metadata.get(tp, "") for tp in offsets})
        except StaleGenerationError as e:
            # The group moved on; the next owners will handle these again (at least once).
            log.warning("commit refused, records will be handled again: %s", e)
        self._committed()
        self.trouble.over()
        return True

    def _handled_above(self) -> dict[TopicPartition, tuple[int, str]]:
        """Per partition with records handled above its first one still in the window: that
        record's offset (its position to commit) and the metadata naming them."""
        if not self.remember:
            return {}
        limit = self.rt.consumer.offset_metadata_limit  # the broker's may be lower
        return {
            tp: (head, encode(head, handled, limit))
            for tp, (head, handled) in self.rt.handled_above().items()
        }

    def _changed(self, above: dict[TopicPartition, tuple[int, str]]) -> set[TopicPartition]:
        """Partitions whose metadata is not the one last committed."""
        return {tp for tp, (_, text) in above.items() if text != self.noted.get(tp, "")}

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        """Records handled above the committed positions, named by their commits' metadata,
        are skipped when polled."""
        if not self.remember:
            return
        for tp in partitions:
            self.rt.skips.pop(tp, None)
            self.noted.pop(tp, None)
        side_by_side = [
            tp for tp in partitions if (spec := self.rt.specs.get(tp.topic)) and spec.windowed
        ]
        if not side_by_side:
            return
        for tp, (offset, text) in self.rt.consumer.committed_metadata(side_by_side).items():
            skips = decode(text, offset)
            if skips:
                self.rt.skips[tp] = skips
                self.noted[tp] = text
                log.info(
                    "%s: %d record(s) above offset %d were handled already", tp, len(skips), offset
                )

    def _committed(self) -> None:
        self.pending.clear()
        self.rewind.clear()
        self.uncommitted = 0
        self.last_commit = time.monotonic()

    def _undo(self, e: DeliveryError, unhandled: Sequence[Record]) -> None:
        """A delivery failed: commit nothing, go back to the last committed positions."""
        if not e.retriable:
            log.warning("%s; redoing the uncommitted records one at a time", e)
            for tp, end in [*self.pending.items(), *self.rt.ends().items()]:
                self.isolate[tp] = max(end, self.isolate.get(tp, 0))
        else:
            log.warning("%s; handling the uncommitted records again", e)
        self.rt.seek_back(self.rewind, unhandled)
        self._committed()
        if e.retriable:
            self._trouble(e)

    def _trouble(self, e: AssuredError) -> None:
        """Back off after a failure of the log or the database; stop once it has lasted
        ``retry_deadline_ms`` with no commit in between."""
        elapsed = self.trouble.seconds()
        if elapsed * 1000 > self.rt.settings.retry_deadline_ms:
            raise LogError(
                f"nothing could be committed for {elapsed:.0f} s (last: {e}); stopping. No "
                "position was committed past an unwritten output: the records are handled "
                "again after a restart."
            ) from e
        self.trouble.pause()

    def _drain(self) -> None:
        """Records side by side still running finish, and count, before a final commit."""
        if self.rt.in_flight():
            self._handle([], [], complete=True)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        if not (self.failed or self.fenced):
            self._drain()
            self.commit(synchronous=True)
        self._forget(partitions)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        self.rt.give_up(partitions)
        for tp in partitions:
            self.pending.pop(tp, None)
            self.rewind.pop(tp, None)
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        """One-at-a-time bounds and strikes of partitions that leave: their next owner starts
        afresh."""
        gone = set(partitions)
        for tp in gone:
            self.isolate.pop(tp, None)
            self.noted.pop(tp, None)
        self.strikes = {key: n for key, n in self.strikes.items() if key[0] not in gone}

    def close(self) -> None:
        try:
            if not (self.failed or self.fenced):
                self._drain()
                self.commit(synchronous=True)
        finally:
            self.rt.give_up()  # nothing left in flight for on_revoke to drain after this
            self.producer.close()

    def abandon(self) -> None:
        super().abandon()
        self.rt.give_up()
        self.pending.clear()
