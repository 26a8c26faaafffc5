"""Exactly once, log to log: outputs and positions commit in one transaction.

A transaction spans at most ``commit_interval_ms`` (100 ms by default) of batches, and with
``commit_mode="adaptive"`` (the default) ends as soon as a poll finds less than a full batch
waiting, so a trickle of input is not held for the interval: begin, handle
(outputs go into the transaction), send the positions to the transaction with the consumer's
group metadata (so a zombie of an older generation is refused), commit. If the transaction
aborts, nothing it wrote is visible and the positions never moved, so we seek back to the first
record it covered and handle those records again.

Every way out of a transaction is one of three, and only the first commits:
- ``commit()`` succeeded: outputs and positions are visible together.
- anything failed while it was open (a handler's send, a delivery, the commit itself, an error
  on its way out of ``run()``): it is aborted, never committed later by ``on_revoke`` or
  ``close``, and the consumer goes back to where it began.
- the producer itself broke (fatal, but not fenced by another instance): a new producer with
  the same transactional id is made, whose
  ``init_transactions`` finishes the old transaction; we then ask the group where it stands,
  since a commit that timed out after it was sent may still have landed.

A commit keeps within half of ``max_poll_interval_ms`` (and ``retry_deadline_ms`` and the
transaction timeout; at least 2 s), so a coordinator that does not answer costs an abort, not
the member's partitions. A producer whose commits time out twice in a row while its aborts go
through is replaced: its coordinator connection is stuck (seen under heavy load: requests queued
in librdkafka and never sent), and a new producer, with new connections, is not.

A failure that may be one record's fault (a record over the size limit, refused by the broker)
aborts the whole transaction; its records are then redone one per transaction, so the record
at fault is found, retried and dead-lettered alone.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar

from assured._retry import Backoff
from assured.errors import (
    AssuredError,
    DeliveryError,
    LogError,
    RetriableError,
    TransactionTimedOutError,
)
from assured.log import Producer, Record, TopicPartition
from assured.runtime._handling import (
    SendFailedError,
    dead_letter,
    owed_to_record,
    producer_dead_letters,
)
from assured.runtime.crashpoints import crash_point
from assured.runtime.protocols._base import (
    CommitProtocol,
    isolated,
    log_commit,
)

__all__ = ["ExactlyOnce"]

log = logging.getLogger("assured.runtime")
T = TypeVar("T")

# Commits that time out in a row, each followed by an abort that went through, before the
# producer is replaced (a broker paused for a while costs one; a stuck client every one).
STALLS_BEFORE_REPLACING = 2
COMMIT_FLOOR_S = 2.0  # the least time a commit is given (within the retry deadline)

_Key = tuple[TopicPartition, int]


def maybe_a_records_fault(e: AssuredError) -> bool:
    """Could ``e`` be one record's fault (an output the broker refused), rather than the log's
    (a timeout, a rebalance, a fencing)? Then the records are redone one per transaction."""
    if isinstance(e, DeliveryError):
        return not e.retriable and not any(
            x.fenced or x.fatal or isinstance(x, TransactionTimedOutError) for x in e.errors
        )
    return (
        e.abortable
        and not (e.fenced or e.retriable or e.fatal)
        and not isinstance(e, TransactionTimedOutError)
    )


class ExactlyOnce(CommitProtocol):
    guarantee = "exactly-once"

    def start(self) -> None:
        s = self.rt.settings
        self.txn_id = s.transactional_id or f"{s.group}-{uuid.uuid4().hex[:12]}"
        # Labels must be unique across processes: a restarted instance keeps its transactional
        # id but counts from 1 again.
        self.token = uuid.uuid4().hex[:8]
        self.seq = 0
        self.open = False
        self.began = 0.0
        self.count = 0
        self.pending: dict[TopicPartition, int] = {}
        self.rewind: dict[TopicPartition, int] = {}  # first offset each partition had in the txn
        self.alone: set[_Key] = set()  # records to redo in a transaction of their own
        self.isolate: dict[TopicPartition, int] = {}  # below these offsets: one per transaction
        self.strikes: dict[_Key, int] = {}  # failed transactions owed to one record
        self.troubles = 0  # failed commits in a row, for backing off
        self.stalls = 0  # commits in a row that timed out while aborts went through
        self.producer: Producer = self._new_producer()

    # -- the producer --------------------------------------------------------------------------

    def _deadline(self) -> float:
        return self.rt.settings.retry_deadline_ms / 1000

    def _commit_deadline(self) -> float:
        """A commit's time: the retry deadline, but at most half of max.poll.interval.ms (so
        the member still holds its partitions when the commit gives up and aborts), and at most
        the transaction timeout (past it, the broker aborts the transaction anyway); never under
        COMMIT_FLOOR_S, so that tiny timeouts do not abort every healthy but slowish commit."""
        s = self.rt.settings
        bound = min(s.max_poll_interval_ms / 2000, s.transaction_timeout_ms / 1000)
        return min(self._deadline(), max(COMMIT_FLOOR_S, bound))

    def _resumable(self, fn: Callable[[float], T], backoff: Backoff | None = None) -> T:
        """``fn(timeout)``, called again while it times out (librdkafka wants a timed-out
        transactional call resumed by calling it again), within the retry deadline (or the
        ``backoff`` given, shared by several calls)."""
        backoff = backoff or Backoff(self._deadline())
        while True:
            try:
                return fn(backoff.left())
            except RetriableError:
                if not backoff.pause():
                    raise

    def _new_producer(self) -> Producer:
        s = self.rt.settings
        producer = self.rt.log.producer(
            transactional_id=self.txn_id, transaction_timeout_ms=s.transaction_timeout_ms
        )
        try:
            self._resumable(producer.init_transactions)
        except BaseException:
            with contextlib.suppress(Exception):
                producer.close()
            raise
        return producer

    def _replace_producer(self, why: AssuredError) -> None:
        """The producer cannot go on: a new one with the same transactional id takes over. Its
        ``init_transactions`` completes or aborts whatever the old one left open."""
        log.warning("the transactional producer cannot go on (%s); starting a new one", why)
        with contextlib.suppress(Exception):
            self.producer.close()
        self.rt.drop_outputs(self.producer)
        self.producer = self._new_producer()

    # -- processing ----------------------------------------------------------------------------

    def process(self, records: list[Record]) -> None:
        try:
            if not (self.alone or self.isolate):
                self._handle(records, records)
                return
            start = 0
            for i, r in enumerate(records):
                alone = (TopicPartition(r.topic, r.partition), r.offset) in self.alone
                if not (isolated(self.isolate, r) or alone):
                    continue
                # Everything before it handled and committed first (records side by side
                # included): the transaction that redoes it holds it alone.
                if not self._handle(records[start:i], records[start:], complete=True):
                    return
                if not (self.commit(records[i:]) and self._redo_alone(r, records[i + 1 :])):
                    return
                start = i + 1
            self._handle(records[start:], records[start:])
        except BaseException:
            self.abandon()
            raise

    def _begin(self) -> None:
        if not self.open:
            self.producer.begin_transaction()
            self.open, self.began, self.count = True, time.monotonic(), 0
            self.seq += 1
            self.rt.transaction = f"{self.txn_id}:{self.token}:{self.seq}"

    def _handle(
        self, records: Sequence[Record], unhandled: Sequence[Record], complete: bool = False
    ) -> bool:
        """``records`` into the open transaction (and the records side by side still running
        from earlier batches, whose outputs go into it once their positions do). False if it
        had to be aborted (the consumer is then back at the start of the transaction, of every
        record still in flight, and of every unhandled record)."""
        if not records and not self._worth_a_transaction(complete, unhandled):
            return True  # nothing came, nothing finished (or it was undone): no transaction
        self._begin()
        for tp, offset in self.rt.heads().items():  # in flight since an earlier transaction
            self.rewind.setdefault(tp, offset)
        for r in records:  # first offsets of every partition in the batch
            self.rewind.setdefault(TopicPartition(r.topic, r.partition), r.offset)
        try:
            done = self.rt.handle(records, self.producer, transactional=True, complete=complete)
        except SendFailedError as e:
            # Part of the record's outputs is in the transaction: abort, redo the record alone.
            r = e.record
            self.alone.add((TopicPartition(r.topic, r.partition), r.offset))
            log.warning("%s; aborting the transaction to redo that record alone", e)
            self.abort(unhandled)
            return False
        except AssuredError as e:
            if owed_to_record(e) or e.fatal:
                raise  # the record's, or the end of this instance (abandon() aborts)
            # The log's, not the record's (the transaction timed out, the group moved on):
            # commit nothing of it; abort and redo.
            self._failed_commit(e, unhandled)
            return False
        crash_point("inside-transaction")
        self.pending.update(done)
        self.count += len(records)
        return True

    def _worth_a_transaction(self, complete: bool, unhandled: Sequence[Record]) -> bool:
        """With no new record: are records side by side there to finish (``complete``), or
        ready to leave the window? Lets them run a moment to see. An error one of them raises
        that is the log's is undone as inside a transaction: abort (nothing open), rewind."""
        if not self.rt.in_flight():
            return False
        if complete:
            return True
        try:
            return self.rt.let_run() > 0
        except AssuredError as e:
            if owed_to_record(e) or e.fatal:
                raise
            self._failed_commit(e, unhandled)
            return False

    def _redo_alone(self, record: Record, unhandled: Sequence[Record]) -> bool:  # noqa: PLR0911
        """``record`` in a transaction of its own; one that fails for a reason of its own is
        struck, and after its handler's retries it is dead-lettered (in a transaction too)."""
        tp = TopicPartition(record.topic, record.partition)
        key = (tp, record.offset)
        error: Exception | None = None
        self._begin()
        for head, offset in self.rt.heads().items():
            self.rewind.setdefault(head, offset)
        self.rewind.setdefault(tp, record.offset)
        try:
            # Its position only as the handling says: past it once it is handled (and, side by
            # side, its outputs are in the transaction), never forced.
            done = self.rt.handle([record], self.producer, transactional=True, complete=True)
            self.pending.update(done)
            self.count += 1
        except SendFailedError as e:
            if e.record is not record:  # another record's, still in flight: redo as _handle does
                other = e.record
                self.alone.add((TopicPartition(other.topic, other.partition), other.offset))
                self.abort([record, *unhandled], e)
                return False
            error = e
        except AssuredError as e:
            if owed_to_record(e) or e.fatal:
                raise  # the record's, or the end of this instance (abandon() aborts)
            self._failed_commit(e, unhandled)
            return False
        if error is None:
            failure = self._try_commit()
            if failure is None:
                self.alone.discard(key)
                self.strikes.pop(key, None)
                return True
            if not maybe_a_records_fault(failure):
                self._failed_commit(failure, unhandled, committing=True)
                return False
            error = failure
        # The record's own fault: abort (the consumer stays where it is: we carry on from
        # here, by a retry of this record or its dead letter), and strike it.
        self.abort(seek=False)
        strikes = self.strikes[key] = self.strikes.get(key, 0) + 1
        spec = self.rt.specs[record.topic]
        # At least two failures alone before a dead letter: the transaction after one that a
        # refused record broke can fail once for that reason (librdkafka's sequence reset).
        if strikes <= max(spec.retries, 1):
            time.sleep(min(2.0, spec.backoff_s * 2 ** (strikes - 1)))
            self.rt.seek_back({tp: record.offset}, unhandled)
            return False
        # Out of retries: its dead letter and its position, in one transaction.
        self._begin()
        labels = (self.guarantee, record.topic)
        dlq = producer_dead_letters(self.producer, self.guarantee)
        dead_letter(spec, record, error, strikes, dlq, self.rt.metrics, labels)
        self.rewind.setdefault(tp, record.offset)
        self.pending[tp] = record.offset + 1
        if self.commit(unhandled):
            self.alone.discard(key)
            self.strikes.pop(key, None)
            return True
        return False

    # -- committing ----------------------------------------------------------------------------

    def tick(self, caught_up: bool = False) -> None:
        """Commit when the interval is up or ``commit_every`` records are in, and, with
        ``commit_mode="adaptive"``, as soon as the consumer has caught up: a trickle of input is
        then visible to read_committed readers a commit's round trip after it arrives, while
        under load (full polls) transactions still grow to the interval."""
        s = self.rt.settings
        if self.open and (
            time.monotonic() - self.began >= s.commit_interval_ms / 1000
            or self.count >= s.commit_every
            or (caught_up and s.commit_mode == "adaptive")
        ):
            try:
                self.commit()
            except BaseException:
                self.abandon()
                raise

    def _try_commit(self) -> AssuredError | None:
        """Flush, send the positions, commit; the error if any of it failed (nothing undone)."""
        budget = Backoff(self._commit_deadline())
        try:
            with self.rt.metrics.commit_latency.labels(self.guarantee).time():
                # Failed deliveries first: they tell whether a record was at fault.
                self._resumable(self.producer.flush, budget)
                if self.pending:
                    meta = self.rt.consumer.group_metadata()
                    self._resumable(
                        lambda t: self.producer.send_offsets_to_transaction(self.pending, meta, t),
                        budget,
                    )
                crash_point("after-handle-before-commit")
                self._resumable(self.producer.commit_transaction, budget)
        except DeliveryError as e:
            # A delivery that failed because the producer is fenced or broken is that error.
            return next((x for x in e.errors if x.fatal), e)
        except AssuredError as e:
            return e
        self.rt.metrics.committed.labels(self.guarantee).inc()
        log_commit("commit", f"committed transaction {self.rt.transaction}", self.pending)
        self.troubles = self.stalls = 0
        self.open = False  # before anything else can fail: a committed one is never aborted
        self.pending.clear()
        self.rewind.clear()
        self._tell("committed")
        return None

    def commit(self, unhandled: Sequence[Record] = ()) -> bool:
        """Commit the open transaction. False if it could not, and was aborted instead (the
        consumer is then back at its start, and at the first of ``unhandled``)."""
        if not self.open:
            return True
        if self.failed or self.fenced:
            self._quietly_abort()
            return False
        failure = self._try_commit()
        if failure is None:
            return True
        self._failed_commit(failure, unhandled, committing=True)
        return False

    def _failed_commit(
        self, e: AssuredError, unhandled: Sequence[Record], committing: bool = False
    ) -> None:
        """Abort after ``e`` and go back; ``committing``: ``e`` came from the commit's own calls
        (flush, offsets, commit), where a stuck producer shows."""
        if e.fenced and e.fatal:
            self.fenced = True
            raise e  # another instance owns our transactional id: stop, commit nothing
        if isinstance(e, TransactionTimedOutError):
            log.warning(
                "a transaction stayed open %.1f s, past transaction_timeout_ms=%d: the log "
                "aborted it; redoing its records. A handler is slower than the transaction "
                "timeout: raise transaction_timeout_ms, or lower max_poll_records.",
                time.monotonic() - self.began, self.rt.settings.transaction_timeout_ms,
            )  # fmt: skip
        elif maybe_a_records_fault(e):
            # Some record's output may have been refused: redo these records one per
            # transaction (those still in a window too), so that record alone is struck.
            log.warning("%s; redoing the transaction's records one at a time", e)
            for tp, end in [*self.pending.items(), *self.rt.ends().items()]:
                self.isolate[tp] = max(end, self.isolate.get(tp, 0))
        else:
            log.warning("the transaction could not commit (%s): aborting and rewinding", e)
        producer = self.producer
        self.abort(unhandled, e)
        self.troubles += 1
        if not e.retriable:
            self.stalls = 0
            return
        # The commit timed out, yet the abort went through (the same producer is still here):
        # once is a busy or paused broker; again and again, a client stuck on its coordinator.
        stalled = committing and self.producer is producer
        self.stalls = self.stalls + 1 if stalled else 0
        if self.stalls >= STALLS_BEFORE_REPLACING:
            self.stalls = 0
            self._replace_producer(
                RetriableError(
                    f"{STALLS_BEFORE_REPLACING} commits in a row timed out while their aborts "
                    f"went through, the last with: {e}"
                )
            )
        else:  # the log is away or busy: give it time rather than spin
            time.sleep(min(2.0, 0.05 * 2 ** min(self.troubles, 6)))

    def abort(
        self,
        unhandled: Sequence[Record] = (),
        cause: AssuredError | None = None,
        seek: bool = True,
    ) -> None:
        """Abort the open transaction; Kafka does not rewind the consumer, so we do (unless
        ``seek`` is False: the caller goes on from where the consumer is)."""
        rewind = dict(self.rewind)
        if self.open:
            outcome_known = False
            broken = cause if cause is not None and cause.fatal else None
            if broken is None:
                try:
                    self._resumable(self.producer.abort_transaction)
                    outcome_known = True
                except AssuredError as e:
                    if e.fenced and e.fatal:
                        self.fenced = True
                        self.open = False
                        raise
                    broken = e
            if broken is not None:
                self._replace_producer(broken)
                # A commit sent before the break may have landed: the group knows.
                rewind, outcome = self._where_the_group_stands(rewind)
                log_commit("abort", f"transaction {self.rt.transaction}: {outcome}", rewind)
                self._tell(outcome)
            elif outcome_known:
                log_commit("abort", f"aborted transaction {self.rt.transaction}", {})
                self._tell("aborted")
            self.rt.metrics.aborts.labels(self.guarantee).inc()
        self.open = False
        self.pending.clear()
        self.rewind.clear()
        if seek:
            self.rt.seek_back(rewind, unhandled)

    def _where_the_group_stands(
        self, rewind: dict[TopicPartition, int]
    ) -> tuple[dict[TopicPartition, int], str]:
        """The committed positions of the transaction's partitions that we still hold, and what
        they show of the transaction: "committed", "aborted", or "unknown" when none of its
        partitions is ours any more (another owner's commits would say nothing of ours)."""
        assigned = set(self.rt.consumer.assignment())
        held = [tp for tp in rewind if tp in assigned]
        if not held:
            return rewind, "unknown"
        committed = self.rt.consumer.committed(held)
        landed = any(
            (c := committed.get(tp)) is not None and c >= self.pending.get(tp, rewind[tp] + 1)
            for tp in held
        )
        positions = {tp: c if c is not None else rewind[tp] for tp, c in committed.items()}
        return positions, "committed" if landed else "aborted"

    def _tell(self, outcome: str) -> None:
        if self.rt.on_transaction is not None and self.rt.transaction is not None:
            self.rt.on_transaction(self.rt.transaction, outcome)
        self.rt.transaction = None

    # -- rebalances and the end ----------------------------------------------------------------

    def _drain(self) -> bool:
        """Records side by side still running finish, into the open transaction, before a
        final commit. False if that transaction had to be aborted."""
        if not self.rt.in_flight():
            return True
        return self._handle([], [], complete=True)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        # Before the partitions move, while our generation still counts; a transaction that
        # met an error is aborted instead, never committed here.
        if self.failed or self.fenced:
            self._quietly_abort()
        elif self._drain():
            self.commit()
        self._forget(partitions)

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        self.rt.give_up(partitions)
        if self.open:
            self.abort()
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        """What we kept about records of partitions that leave (one-at-a-time bounds, records
        to redo alone, strikes): their next owner starts afresh."""
        gone = set(partitions)
        for tp in gone:
            self.isolate.pop(tp, None)
        self.alone = {key for key in self.alone if key[0] not in gone}
        self.strikes = {key: n for key, n in self.strikes.items() if key[0] not in gone}

    def close(self) -> None:
        if self.failed or self.fenced:
            self._quietly_abort()
            self.producer.close()
            return
        committed = self._drain() and self.commit()
        self.rt.give_up()  # nothing left in flight for on_revoke to drain after this
        self.producer.close()
        if not committed:
            raise LogError(
                "the last transaction could not commit at close and was aborted: its records "
                "will be handled again by the next owner or after a restart"
            )

    def abandon(self) -> None:
        super().abandon()
        self.rt.give_up()
        self._quietly_abort()

    def _quietly_abort(self) -> None:
        if not self.open or self.fenced:
            self.open = False
            return
        try:
            self._resumable(self.producer.abort_transaction)
            log_commit("abort", f"aborted transaction {self.rt.transaction}", {})
            self._tell("aborted")
        except Exception as e:  # the log aborts it at its timeout in any case
            log.warning("could not abort the open transaction (%s); the log will at its timeout", e)
        self.open = False
        self.pending.clear()
        self.rewind.clear()
