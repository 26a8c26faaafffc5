"""Exactly once, log to database: effects and positions commit in one database transaction.

On assignment we claim the partitions in the database (bumping an epoch that fences any older
owner) and start reading where the database says we stopped. Each batch is one database
transaction: the handlers' effects, then the positions, written only if our epoch still holds.
The group offset is committed afterwards too, only so lag tools show the truth; the database
is what counts: a partition the database has no position for, while the log has one, means the
database was replaced or emptied, and the App stops rather than guess (``missing_sink_offsets``).

A database that goes away is the sink's failure, not a handler's: the batch's transaction rolled
back, so we go back to the batch's first records, wait, reconnect and redo it. When the
connection broke during COMMIT, nobody knows whether it landed: the stored positions say.
"""

from __future__ import annotations

import contextlib
import logging
import time

from assured._retry import Backoff
from assured.errors import AssuredError, ConfigError, LogError
from assured.log import Header, Producer, Record, TopicPartition
from assured.runtime.crashpoints import crash_point
from assured.runtime.protocols._base import (
    CommitProtocol,
    Trouble,
    log_commit,
    next_offsets,
    seek_back,
)
from assured.sinks import DeadLetterRelay, Sink, SinkCommitUnknownError, SinkFencedError

__all__ = ["ExactlyOnceSink"]

log = logging.getLogger("assured.runtime")
_RELAY_EVERY_S = 5.0


class ExactlyOnceSink(CommitProtocol):
    guarantee = "exactly-once"

    def start(self) -> None:
        assert self.rt.sink is not None
        self.sink: Sink = self.rt.sink
        self.dead_letters: Producer = self.rt.log.producer()
        self.epochs: dict[TopicPartition, int] = self.rt.epochs  # the windows check them too
        self.trouble = Trouble()  # batches in a row the database did not take
        # Dead letters are rows in the database, committed with the effects and positions;
        # the relay publishes them to their topics afterwards, each exactly once.
        self.relay = DeadLetterRelay(self.sink, self.rt.log, self.rt.settings.group)
        self.relayed_at = time.monotonic()
        self._relay()

    def _relay(self) -> None:
        try:
            self.relay.drain()
        except AssuredError as e:  # the dead letters wait safely in the database
            if e.fatal and not e.fenced:
                raise
            log.warning("dead-letter relay: %s; trying again later", e)

    def on_assign(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        group = self.rt.settings.group
        claims = self.sink.claim(group, partitions, self.rt.incarnations)
        starts: dict[TopicPartition, int] = {}
        unknown = []
        for tp, (stored, epoch) in claims.items():
            self.epochs[tp] = epoch
            if stored is not None:
                starts[tp] = stored  # the database, not the group offset, says where we were
            else:
                unknown.append(tp)
        if unknown:
            starts.update(self._missing(unknown))
        if self.rt.sink_side_by_side:  # records handled side by side above those positions
            for tp in partitions:
                self.rt.skips.pop(tp, None)
            self.rt.skips.update(self.sink.done_above(group, partitions))
        return starts

    def _missing(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Partitions the database has no position for: new ones start where the log says; if
        the log has committed offsets for them, the database lost its positions."""
        committed = {
            tp: c for tp, c in self.rt.consumer.committed(partitions).items() if c is not None
        }
        if not committed:
            return {}
        choice = self.rt.settings.missing_sink_offsets
        shown = ", ".join(f"{tp} at {c}" for tp, c in sorted(committed.items()))
        if choice == "fail":
            raise ConfigError(
                f"the database holds no position for group {self.rt.settings.group!r} on "
                f"{shown}, but the log has committed offsets there: the database was replaced, "
                "emptied, or is not the one this group wrote to. Nothing was handled. Point the "
                "sink at the right database; or choose where to start with "
                "missing_sink_offsets='committed' (trust the log's offsets: effects before them "
                "are not redone) or 'earliest' (handle those partitions again from the start)."
            )
        log.warning("the database has no position for %s; starting per %s", shown, choice)
        if choice == "committed":
            return committed
        with self.rt.log.admin() as admin:
            return {tp: admin.watermarks(tp).low for tp in committed}

    def process(self, records: list[Record]) -> None:
        mine = [r for r in records if TopicPartition(r.topic, r.partition) in self.epochs]
        if self.rt.sink_side_by_side:
            self._side_by_side(mine)
            return
        if not mine:
            return
        offsets = next_offsets(mine)
        try:
            timer = self.rt.metrics.commit_latency.labels(self.guarantee).time()
            with (
                timer,
                self.sink.transaction(
                    group=self.rt.settings.group, incarnations=self.rt.incarnations
                ) as tx,
            ):

                def dead_letter(topic: str, record: Record, headers: list[Header]) -> None:
                    tx.dead_letter(record, topic=topic, headers=headers)

                self.rt.handle(mine, self.dead_letters, tx, dead_letter)
                crash_point("after-effect-before-offset")
                self.sink.store_offsets(tx, self.rt.settings.group, offsets, self.epochs)
        except SinkFencedError as e:
            log.warning("%s; dropping the partitions until the group reassigns them", e)
            for tp in offsets:
                self.epochs.pop(tp, None)
            return
        except LogError as e:
            if not (e.retriable or e.abortable) or e.fatal:
                self.abandon()
                raise
            self._redo(mine, e)
            return
        except BaseException:
            self.abandon()
            raise
        self.trouble.over()
        self.rt.metrics.committed.labels(self.guarantee).inc()
        log_commit("commit", "committed effects and positions in one database transaction", offsets)
        if tx.dead_letters:
            self._relay()
        try:
            self.rt.consumer.commit(offsets, asynchronous=True)
        except AssuredError as e:  # only for lag tools; the database already has the truth
            log.debug("group offset commit skipped: %s", e)

    def _side_by_side(self, records: list[Record]) -> None:
        """Records side by side: each step of their window ends with a group commit of their
        effects, marks, dead letters and positions (see runtime._shared_db); nothing is left
        to commit here but the group offsets, for lag tools."""
        try:
            offsets = self.rt.handle(records, self.dead_letters)
        except SinkFencedError as e:
            log.warning("%s; giving up the records in flight until the group reassigns", e)
            self._redo_side_by_side(e)
            return
        except LogError as e:
            if not (e.retriable or e.abortable) or e.fatal:
                self.abandon()
                raise
            if self.trouble.seconds() * 1000 > self.rt.settings.retry_deadline_ms:
                self.abandon()
                raise LogError(
                    f"nothing could be committed to the database for "
                    f"{self.trouble.seconds():.0f} s (last: {e}); stopping. Effects and "
                    "positions commit together: what was not committed is handled again "
                    "after a restart."
                ) from e
            log.warning("%s; redoing the records in flight once the database answers", e)
            self._redo_side_by_side(e)
            self.trouble.pause()
            return
        except BaseException:
            self.abandon()
            raise
        self.trouble.over()
        if any(w.db is not None and w.db.lettered for w in self.rt.windows.values()):
            for w in self.rt.windows.values():
                if w.db is not None:
                    w.db.lettered = False
            self._relay()
        if offsets:
            self.rt.metrics.committed.labels(self.guarantee).inc()
            with contextlib.suppress(AssuredError):  # only for lag tools
                self.rt.consumer.commit(offsets, asynchronous=True)

    def _redo_side_by_side(self, e: LogError) -> None:
        """Give up the records in flight and read again from where the database says each
        partition stands (where none is stored yet: from the first record given up), skipping
        the records it holds as handled above that. A fenced partition is dropped until the
        group assigns it again; the others go on."""
        heads = self.rt.heads()
        self.rt.give_up()
        if isinstance(e, SinkFencedError):
            stolen = getattr(e, "partition", None)
            for tp in [stolen] if stolen in self.epochs else list(self.epochs):
                self.epochs.pop(tp, None)  # the group reassigns it; the claim comes again
                self.rt.skips.pop(tp, None)
        try:
            stored = self._stored(must=True)
            done = self.sink.done_above(self.rt.settings.group, list(self.epochs))
        except LogError:
            self.abandon()
            raise
        self.rt.skips.clear()
        self.rt.skips.update(done)
        rewind = {
            tp: stored.get(tp, heads.get(tp))
            for tp in self.epochs
            if stored.get(tp, heads.get(tp)) is not None
        }
        seek_back(self.rt.consumer, rewind, ())  # type: ignore[arg-type]

    def _redo(self, batch: list[Record], e: LogError) -> None:
        """The batch's database transaction did not commit (or may not have): go back to where
        the database says each partition stands, wait a little, and let the next poll redo it."""
        elapsed = self.trouble.seconds()
        if elapsed * 1000 > self.rt.settings.retry_deadline_ms:
            raise LogError(
                f"nothing could be committed to the database for {elapsed:.0f} s (last: {e}); "
                "stopping. Effects and positions commit together: what was not committed is "
                "handled again after a restart."
            ) from e
        log.warning("%s; redoing the batch once the database answers (%.0f s so far)", e, elapsed)
        stored = self._stored(must=isinstance(e, SinkCommitUnknownError))
        rewind = {tp: off for tp, off in stored.items() if tp in self.epochs}
        seek_back(self.rt.consumer, rewind, batch)
        self.trouble.pause()

    def _stored(self, must: bool) -> dict[TopicPartition, int]:
        """The database's positions for the group. When a commit's outcome is unknown they are
        the only way to know what landed: wait for them (within the retry deadline, then stop,
        having committed nothing more). Otherwise the batch rolled back for sure, and its own
        first offsets are as good."""
        backoff = Backoff(self.rt.settings.retry_deadline_ms / 1000, first=0.1, most=2.0)
        while True:
            try:
                return self.sink.stored_offsets(self.rt.settings.group)
            except LogError:
                if not must:
                    return {}
                if not backoff.pause():
                    raise

    def tick(self, caught_up: bool = False) -> None:
        # Dead letters another relay left, or whose commit's outcome was unknown, or that met
        # a relay that had just been replaced: looked for now and then, not only after a commit.
        now = time.monotonic()
        if now - self.relayed_at >= _RELAY_EVERY_S:
            self.relayed_at = now
            try:
                if self.sink.pending_dead_letters(self.rt.settings.group):
                    self.relay.fenced = False
                    self._relay()
            except LogError as e:
                log.debug("dead-letter relay check skipped: %s", e)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        if self.rt.in_flight() and not self.failed:
            try:  # records in flight finish, and commit, before their partitions go
                self.rt.handle([], self.dead_letters, complete=True)
            except LogError as e:
                if e.fatal and not e.fenced:
                    raise
                log.warning("%s; the next owner redoes what did not commit", e)
                self._redo_side_by_side(e)
        self._forget(partitions)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        self.rt.give_up(partitions)
        for tp in partitions:
            self.epochs.pop(tp, None)
            self.rt.skips.pop(tp, None)

    def abandon(self) -> None:
        super().abandon()
        self.rt.give_up()

    def close(self) -> None:
        try:
            if self.rt.in_flight() and not self.failed:
                self.rt.handle([], self.dead_letters, complete=True)
        finally:
            self.rt.give_up()
        if not self.failed:
            self._relay()
        self.relay.close()
        self.dead_letters.close()
