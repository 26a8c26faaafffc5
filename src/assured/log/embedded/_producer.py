"""The embedded engine's producer: batches, idempotence, transactions.

``send`` queues a record; a batch is written when it reaches ``batch_size``, when ``linger_ms``
passes (a background thread sees to it; not inside a transaction), or on
``flush``/``commit_transaction``. One batch per
partition is written at a time, with that partition's next sequence number, so a batch that is
written again after a lost acknowledgement is recognised by the engine and not appended twice.
Delivery callbacks run in the caller's thread, inside ``poll`` or ``flush``, as in Kafka.

No write is dropped silently. While the engine file is locked by another writer, a write is
tried again until ``delivery.timeout.ms``; then its records fail: a record's callback hears it,
``flush`` raises :class:`DeliveryError` for the records that had no callback, and an open
transaction can no longer commit. A caller's own timeout (``flush``, ``commit_transaction``)
only cuts its wait short: the records stay queued, unchanged, for the next write.

A write can land and still fail: its acknowledgement is lost, the resends find the file locked,
and the delivery timeout passes. Its records are failed as of unknown outcome (they may be in
the log), and their sequence numbers are not taken for granted either way: the next write to
that partition asks the engine which sequence it holds last from this producer and goes on from
there, so a new batch is never mistaken for a resend of the failed one (and dropped), nor
refused for a gap. The periodic retention check never waits for the write lock: if it is held,
the check is tried again at a later write.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from assured.errors import (
    AbortableError,
    AssuredError,
    DeliveryError,
    LogError,
    RecordTooLargeError,
    RetriableError,
    UnknownTopicError,
    UsageError,
)
from assured.log._models import DeliveryReport, GroupMetadata, Header, TopicPartition
from assured.log._protocol import OnDelivery, Producer
from assured.log.embedded._engine import Engine, TopicInfo, encode_headers, now_ms
from assured.log.partitioner import murmur2, partition_for_key

__all__ = ["EmbeddedProducer"]

log = logging.getLogger("assured.log.embedded")

T = TypeVar("T")
_KEPT_ERRORS = 10  # distinct errors a DeliveryError carries, at most
_RETENTION_RETRY_MS = 1000  # how soon a retention check that found the file locked runs again


@dataclass
class _Batch:
    tp: TopicPartition
    part: int
    rows: list[tuple[int, bytes | None, bytes | None, bytes | None]] = field(default_factory=list)
    callbacks: list[OnDelivery | None] = field(default_factory=list)
    bytes: int = 0
    maybe_written: bool = False  # a write of it may have landed: its acknowledgement was lost


class LostAcknowledgementError(RetriableError):
    """Injected by a fault test: the write landed, its acknowledgement did not."""


class EmbeddedProducer(Producer):
    def __init__(
        self,
        engine: Engine,
        *,
        transactional_id: str | None,
        idempotent: bool,
        transaction_timeout_ms: int,
        linger_ms: float,
        batch_size: int,
        max_request_size: int,
        delivery_timeout_ms: int,
        auto_create: int | None,
        retention_check_interval_ms: int,
    ):
        self._engine = engine
        self._transactional_id = transactional_id
        self._idempotent = idempotent or transactional_id is not None
        self._txn_timeout_ms = transaction_timeout_ms
        self._linger = linger_ms / 1000
        self._batch_size = max(1, batch_size)
        self._max_request_size = max_request_size
        self._delivery_timeout = delivery_timeout_ms / 1000
        self._auto_create = auto_create
        self._retention_every = retention_check_interval_ms
        self._retention_due = now_ms() + retention_check_interval_ms
        self._lock = threading.RLock()
        self._pending: dict[int, _Batch] = {}
        self._pending_count = 0  # records not written yet: in _pending and in _unsent
        self._oldest: float | None = None
        # Batches whose write a caller's timeout cut short: written first next time, exactly as
        # they were (same records, same sequence), so the engine can tell a resend.
        self._unsent: list[_Batch] = []
        self._write_began: float | None = None  # when the first write of _unsent was tried
        self._in_flight = 0  # records being written now
        # Records sent without a callback that failed since the last flush(): flush() raises.
        self._undelivered = 0
        self._undelivered_unknown = 0  # of them, records that may have been written nonetheless
        self._undelivered_topics: dict[str, None] = {}
        self._undelivered_errors: dict[tuple[type, str], AssuredError] = {}
        self._reports: deque[tuple[OnDelivery, DeliveryReport]] = deque()
        self._sticky: dict[str, int] = {}
        self._topics: dict[str, tuple[TopicInfo, int]] = {}
        self._seq: dict[int, int] = {}
        # Partitions whose last batch failed without a sure outcome: the next write takes the
        # next sequence from the engine, which knows whether that batch landed.
        self._seq_unknown: set[int] = set()
        self._pid: int | None = None
        self._epoch = 0
        self._txn: int | None = None  # the engine's transaction id, once the first write lands
        self._in_txn = False
        self._failed: AssuredError | None = None  # a fatal error: every later call raises it
        self._txn_error: AssuredError | None = None  # an abortable error in the open transaction
        # Offsets whose send_offsets_to_transaction timed out: no commit until they are added.
        self._offsets_unsent: dict[TopicPartition, AssuredError] = {}
        self._closed = False
        self.lose_next_ack = False  # fault injection for tests and the audit
        if self._idempotent and transactional_id is None:
            self._pid = engine.new_producer()
        self._wake = threading.Condition(self._lock)
        self._linger_thread = threading.Thread(
            target=self._linger_loop, name="assured-producer-linger", daemon=True
        )
        self._linger_thread.start()

    # -- sending -------------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[Header] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        on_delivery: OnDelivery | None = None,
    ) -> None:
        with self._lock:
            if self._closed or self._failed is not None:
                self._check_usable()
            if self._transactional_id is not None and not self._in_txn:
                raise UsageError(
                    "send() on a transactional producer needs an open transaction: "
                    "call begin_transaction() first"
                )
            known = self._topics.get(topic)
            info, limit = known if known is not None else self._learn(topic)
            blob = encode_headers(headers) if headers else None
            size = (len(key) if key else 0) + (len(value) if value else 0)
            if blob:
                size += len(blob)
            if size > limit:
                raise RecordTooLargeError(
                    f"record of {size} bytes for topic {topic!r} is over the limit of {limit} "
                    "bytes (topic max.message.bytes / producer message.max.bytes); it was not "
                    "written. Split the value, or raise both limits."
                )
            if partition is None and key is not None:  # Java's choice, inline: the hot case
                partition = (murmur2(key) & 0x7FFFFFFF) % info.partitions
            elif partition is None or not 0 <= partition < info.partitions:
                info, partition = self._partition(topic, info, key, partition)
            part = info.part_ids[partition]
            batch = self._pending.get(part)
            if batch is None:
                batch = self._pending[part] = _Batch(TopicPartition(topic, partition), part)
            ts = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
            batch.rows.append((ts, key, value, blob))
            batch.callbacks.append(on_delivery)
            batch.bytes += size
            self._pending_count += 1
            if self._oldest is None:
                self._oldest = time.monotonic()
                self._wake.notify()
            if len(batch.rows) >= self._batch_size:
                self._sticky.pop(topic, None)  # a full batch moves keyless records on
                self._write()

    def _partition(
        self, topic: str, info: TopicInfo, key: bytes | None, partition: int | None
    ) -> tuple[TopicInfo, int]:
        """Java's choice for a keyed record; a sticky random one for a keyless record; or a
        check, with fresh metadata, of a partition given explicitly."""
        if partition is None:
            if key is not None:
                return info, partition_for_key(key, info.partitions)
            sticky = self._sticky.get(topic)
            if sticky is None:
                sticky = self._sticky[topic] = random.randrange(info.partitions)
            return info, sticky
        info, _ = self._learn(topic)
        if not 0 <= partition < info.partitions:
            raise UnknownTopicError(
                f"topic {topic!r} has partitions 0..{info.partitions - 1}; "
                f"there is no partition {partition}"
            )
        return info, partition

    def max_record_bytes(self, topic: str) -> int | None:
        known = self._topics.get(topic)
        if known is not None:
            return known[1]
        with self._lock:
            try:  # looked up, never created: a check must not make a topic
                info = self._engine.topic(topic)
            except AssuredError:  # a closed engine, say: send says what is wrong
                return None
            if info is None:
                return None  # not there (yet): send creates it, or says so
            limit = min(self._max_request_size, int(info.config["max.message.bytes"]))
            self._topics[topic] = (info, limit)
            return limit

    def _learn(self, topic: str) -> tuple[TopicInfo, int]:
        """The topic's metadata and record size limit, looked up once and kept."""
        info = self._topic(topic, refresh=topic in self._topics)
        limit = min(self._max_request_size, int(info.config["max.message.bytes"]))
        self._topics[topic] = (info, limit)
        return info, limit

    def _topic(self, name: str, refresh: bool = False) -> TopicInfo:
        info = self._engine.topic(name, refresh)
        if info is None and self._auto_create is not None:
            with contextlib.suppress(AssuredError):  # another client may have just made it
                self._engine.create_topic(name, self._auto_create, None)
            info = self._engine.topic(name, refresh=True)
        if info is None:
            raise UnknownTopicError(
                f"topic {name!r} does not exist; create it first "
                "(or open the log with ?auto_create_topics=true)"
            )
        return info

    def poll(self, timeout: float = 0.0) -> int:
        with self._lock:
            if self._oldest is not None and time.monotonic() - self._oldest >= self._linger:
                self._write()
        return self._serve_reports()

    def flush(self, timeout: float | None = None) -> int:
        """Write what is queued, waiting at most ``timeout`` seconds; serve delivery reports;
        return how many records are still queued. Raises :class:`DeliveryError` if records sent
        without a callback since the last ``flush`` were not written."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            # The linger thread is writing: those records are not written yet.
            self._serve_reports()
            return self._pending_count + self._in_flight
        try:
            if self._pending_count:
                self._write(deadline)
            remaining = self._pending_count
            undelivered = self._take_undelivered()
        finally:
            self._lock.release()
        self._serve_reports()
        if undelivered is not None:
            raise undelivered
        return remaining

    def _serve_reports(self) -> int:
        served = 0
        while True:
            try:
                callback, report = self._reports.popleft()
            except IndexError:
                return served
            callback(report)
            served += 1

    def _linger_loop(self) -> None:
        with self._lock:
            while not self._closed:
                # Inside a transaction nothing lingers: its records are invisible to
                # read_committed readers until the commit anyway, so they are written when a
                # batch fills or at commit, in few large engine transactions, not many small.
                if self._oldest is None or self._in_txn:
                    self._wake.wait()
                    continue
                due = self._oldest + self._linger - time.monotonic()
                if due > 0:
                    self._wake.wait(due)
                    continue
                with contextlib.suppress(Exception):  # errors reach callers as reports
                    self._write()

    def _write(self, deadline: float | None = None) -> None:
        """Write every queued batch in one engine transaction, trying again while the engine
        is busy: until the delivery timeout, when the batches fail, or until the caller's
        ``deadline`` (monotonic), when they stay queued as they are. Under the lock."""
        batches = list(self._pending.values())
        if self._unsent:
            batches[:0] = self._unsent
            self._unsent = []
        count, oldest = self._pending_count, self._oldest
        self._in_flight = count  # first: flush() may read both counts without the lock
        self._pending.clear()
        self._pending_count = 0
        self._oldest = None
        if not batches:
            return
        began = time.monotonic() if self._write_began is None else self._write_began
        self._write_began = None
        expires = began + self._delivery_timeout
        until = expires if deadline is None or deadline > expires else deadline
        try:
            while True:
                try:
                    offsets = self._write_once(batches, until - time.monotonic())
                    break
                except RetriableError as e:
                    now = time.monotonic()
                    if now >= expires:
                        self._lost(batches, e)
                        return
                    if now >= until:  # the caller's time is up, not the records'
                        self._unsent = batches
                        self._pending_count, self._oldest = count, oldest
                        self._write_began = began
                        return
                    time.sleep(0.01)  # the same batches, same sequences: a resend is deduplicated
                except AssuredError as e:
                    self._lost(batches, e)
                    return
                except Exception as e:  # e.g. a raw sqlite3 error: never let records vanish
                    self._lost(batches, LogError(f"writing to the engine failed: {e!r}"))
                    return
        finally:
            self._in_flight = 0
        for batch, base in zip(batches, offsets, strict=True):
            self._seq[batch.part] = self._seq.get(batch.part, 0) + len(batch.rows)
            for i, cb in enumerate(batch.callbacks):
                if cb is not None:
                    report = DeliveryReport(
                        batch.tp.topic, batch.tp.partition, base + i, batch.rows[i][0]
                    )
                    self._reports.append((cb, report))
        self._check_retention()

    def _check_retention(self) -> None:
        """Every ``retention_check_interval_ms``, after a write: the topics' retention. It runs
        under the producer's lock, so it never waits for the engine's write lock: held by
        another writer, the check stops and is tried again at a write a little later."""
        if self._retention_every < 0 or now_ms() < self._retention_due:
            return
        try:
            self._engine.enforce_retention(wait=0)
        except RetriableError:
            self._retention_due = now_ms() + min(self._retention_every, _RETENTION_RETRY_MS)
            return
        except LogError as e:
            log.warning("retention check failed: %s", e)
        self._retention_due = now_ms() + self._retention_every

    def _write_once(self, batches: list[_Batch], wait: float) -> list[int]:
        offsets = []
        engine = self._engine
        txn = None
        seqs: dict[int, int] = {}  # a partition may have an unsent batch and a newer one
        with engine.write(wait):
            if self._in_txn:
                assert self._pid is not None
                txn = engine.txn_begin_or_check(self._pid, self._epoch, self._txn)
            for b in batches:
                producer = None
                if self._pid is not None:
                    seq = seqs.get(b.part)
                    if seq is None:
                        if b.part in self._seq_unknown:
                            # Kept at once, whatever this write's fate: the engine's answer is
                            # the same until a batch at this sequence lands, and a resend of
                            # that batch must carry it again to be recognised.
                            self._seq[b.part] = engine.next_sequence(self._pid, self._epoch, b.part)
                            self._seq_unknown.discard(b.part)
                        seq = self._seq.get(b.part, 0)
                    seqs[b.part] = seq + len(b.rows)
                    producer = (self._pid, self._epoch, seq)
                base, _dup = engine.append(b.part, b.rows, producer, txn, b.bytes)
                if txn is not None:
                    engine.txn_add_part(txn, b.part, base)
                offsets.append(base)
        self._txn = txn  # only once the engine has it for sure
        if self.lose_next_ack:
            self.lose_next_ack = False
            for b in batches:  # they landed; failed from now on, their outcome is unknown
                b.maybe_written = True
            raise LostAcknowledgementError("injected: the write landed but its ack was lost")
        return offsets

    def _lost(self, batches: list[_Batch], error: AssuredError) -> None:
        """The batches will not be written (or, if a write of them may have landed, will not
        be confirmed): tell whoever can be told; a transaction that lost a write can no longer
        commit; their partitions' next sequences are asked of the engine."""
        self._forget_sequences(batches)
        unknown = any(b.maybe_written for b in batches)
        reported = _unknown_outcome(error) if unknown else error
        self._fail_batches(batches, reported)
        self._note(error)
        if self._in_txn and self._txn_error is None and not error.fatal:
            lost = sum(len(b.rows) for b in batches)
            what = "were not acknowledged" if unknown else "were not written"
            self._txn_error = AbortableError(f"{lost} of its record(s) {what}: {reported}")
            self._txn_error.__cause__ = reported

    def _forget_sequences(self, batches: list[_Batch]) -> None:
        """Dropped batches never to be resent: whether or not they landed, the next write to
        their partitions takes its sequence from the engine. Reusing theirs would have a new
        batch of the same size taken for a resend of one that landed, and dropped."""
        if self._pid is not None:
            self._seq_unknown.update(b.part for b in batches)

    def _fail_batches(
        self, batches: list[_Batch], error: AssuredError, quiet: bool = False
    ) -> None:
        """Report ``error`` to the callbacks of ``batches``; count the records that had none,
        for ``flush`` to raise (unless ``quiet``: an abort the caller asked for)."""
        unreported = 0
        for b in batches:
            missed = 0
            for i, cb in enumerate(b.callbacks):
                if cb is None:
                    missed += 1
                else:
                    report = DeliveryReport(b.tp.topic, b.tp.partition, -1, b.rows[i][0], error)
                    self._reports.append((cb, report))
            if missed and not quiet:
                unreported += missed
                self._undelivered_topics[b.tp.topic] = None
                if b.maybe_written:
                    self._undelivered_unknown += missed
        if unreported:
            self._undelivered += unreported
            errors = self._undelivered_errors
            if len(errors) < _KEPT_ERRORS:
                errors.setdefault((type(error), str(error)), error)
            log.error(
                "%d record(s) with no delivery callback were not written: %s", unreported, error
            )

    def _take_undelivered(self) -> DeliveryError | None:
        """The failures since the last call, as one error, and a fresh count."""
        if not self._undelivered:
            return None
        failed, topics = self._undelivered, ", ".join(map(repr, self._undelivered_topics))
        errors = tuple(self._undelivered_errors.values())
        unknown = self._undelivered_unknown
        self._undelivered = self._undelivered_unknown = 0
        self._undelivered_topics = {}
        self._undelivered_errors = {}
        others = f" (and {len(errors) - 1} other error(s))" if len(errors) > 1 else ""
        maybe = f" ({unknown} of them may have been: outcome unknown)" if unknown else ""
        return DeliveryError(
            f"{failed} record(s) sent without a delivery callback were not written{maybe}, to "
            f"{topics}: {errors[0]}{others}. Do not commit positions past them: send them "
            "again, or rewind to the last committed positions and process them again.",
            failed,
            errors,
        )

    # -- transactions --------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise UsageError("this producer is closed")
        if self._failed is not None:
            raise self._failed

    def _need_transactional(self) -> None:
        self._check_usable()
        if self._transactional_id is None:
            raise UsageError("transactions need a producer made with transactional_id=...")

    def init_transactions(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._need_transactional()
            assert self._transactional_id is not None
            self._pid, self._epoch = self._engine.init_transactions(
                self._transactional_id, self._txn_timeout_ms
            )
            self._seq.clear()  # a new epoch starts every partition at sequence 0
            self._seq_unknown.clear()

    def begin_transaction(self) -> None:
        with self._lock:
            self._need_transactional()
            if self._pid is None:
                raise UsageError("call init_transactions() once before begin_transaction()")
            if self._in_txn:
                raise UsageError("a transaction is already open; commit or abort it first")
            self._in_txn, self._txn, self._txn_error = True, None, None
            self._offsets_unsent.clear()

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group: GroupMetadata, timeout: float = 30.0
    ) -> None:
        deadline = time.monotonic() + timeout
        with self._locked(deadline, "send_offsets_to_transaction", timeout):
            self._need_open_txn()
            pid = self._pid
            assert pid is not None

            def add(wait: float) -> int:
                with self._engine.write(wait):
                    txn = self._engine.txn_begin_or_check(pid, self._epoch, self._txn)
                    self._engine.txn_add_offsets(
                        txn, group.group_id, group.generation, group.member_id, offsets
                    )
                return txn

            try:
                self._txn = self._until(deadline, add)
            except RetriableError as e:
                # Not added. A retry of this call may add them; until then, no commit.
                self._offsets_unsent.update(dict.fromkeys(offsets, e))
                raise RetriableError(
                    f"send_offsets_to_transaction timed out after {timeout:g}s: {e}. The "
                    "offsets were not added, and the transaction cannot commit until they are: "
                    "call send_offsets_to_transaction() again, or abort the transaction"
                ) from e
            except AssuredError as e:
                self._note(e)
                # Not added: whatever the error, no commit until they are (or an abort).
                self._offsets_unsent.update(dict.fromkeys(offsets, e))
                raise
            for tp in offsets:
                self._offsets_unsent.pop(tp, None)

    def commit_transaction(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._locked(deadline, "commit_transaction", timeout):
            self._need_open_txn()
            pid = self._pid
            assert pid is not None
            self._refuse_if_doomed()
            if self._pending_count:
                self._write(deadline)  # a failure is noted, not raised
                self._refuse_if_doomed()
                if self._pending_count:
                    raise RetriableError(
                        f"commit_transaction timed out after {timeout:g}s: another writer held "
                        f"the engine file; {self._pending_count} record(s) of the transaction "
                        "are still queued and nothing was committed. Call commit_transaction() "
                        "again, or abort the transaction"
                    )
            txn = self._txn
            if txn is not None:
                try:
                    self._until(
                        deadline, lambda wait: self._engine.commit_txn(pid, self._epoch, txn, wait)
                    )
                except RetriableError as e:
                    raise RetriableError(
                        f"commit_transaction timed out after {timeout:g}s: {e}; nothing was "
                        "committed. Call commit_transaction() again, or abort the transaction"
                    ) from e
                except AssuredError as e:
                    self._note(e)
                    raise
            self._in_txn, self._txn = False, None
        self._serve_reports()

    def _refuse_if_doomed(self) -> None:
        """Raise if the open transaction can no longer commit."""
        if self._failed is not None:  # e.g. fenced while writing the last batch
            raise self._failed
        cause = self._txn_error
        if cause is None and self._offsets_unsent:
            tps = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in self._offsets_unsent)
            cause = next(iter(self._offsets_unsent.values()))
            why = f"the consumer offsets for {tps} were never added to it ({cause})"
        else:
            why = str(cause)
        if cause is not None:
            raise AbortableError(
                f"the transaction cannot commit: {why}. Nothing it wrote becomes visible and "
                "no offsets were committed: abort it, rewind to the committed positions and "
                "try again"
            ) from cause

    def abort_transaction(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._locked(deadline, "abort_transaction", timeout):
            self._need_transactional()
            if not self._in_txn:
                raise UsageError("abort_transaction() with no transaction open")
            pid, txn = self._pid, self._txn
            assert pid is not None
            dropped = self._unsent + list(self._pending.values())
            self._pending.clear()
            self._unsent = []
            self._pending_count = 0
            self._oldest = self._write_began = None
            self._forget_sequences(dropped)  # an unsent one may have landed, its ack lost
            self._fail_batches(dropped, AbortableError("the transaction was aborted"), quiet=True)
            try:
                if txn is not None:
                    self._until(
                        deadline, lambda wait: self._engine.abort_txn(pid, self._epoch, txn, wait)
                    )
            except AssuredError as e:
                # Left open in the engine, it is aborted by the next begin or by its timeout.
                self._note(e)
                raise
            finally:
                self._in_txn, self._txn, self._txn_error = False, None, None
                self._offsets_unsent.clear()
        self._serve_reports()

    @contextlib.contextmanager
    def _locked(self, deadline: float, what: str, timeout: float) -> Iterator[None]:
        """The producer's lock, waited for until ``deadline``."""
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise RetriableError(
                f"{what} timed out after {timeout:g}s: another thread of this producer was "
                "writing; nothing was done. Call it again"
            )
        try:
            yield
        finally:
            self._lock.release()

    @staticmethod
    def _until(deadline: float, attempt: Callable[[float], T]) -> T:
        """``attempt(seconds left)``, again while the engine is busy, until ``deadline``."""
        while True:
            try:
                return attempt(deadline - time.monotonic())
            except RetriableError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _need_open_txn(self) -> None:
        self._need_transactional()
        if not self._in_txn:
            raise UsageError("no transaction is open; call begin_transaction() first")

    def _note(self, e: AssuredError) -> None:
        if e.fatal:
            self._failed = e
        elif e.abortable and self._txn_error is None:  # the first cause is the one to tell
            self._txn_error = e

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._pending_count and not self._in_txn:
                with contextlib.suppress(AssuredError):
                    self._write()
            self._closed = True
            self._wake.notify_all()
        self._linger_thread.join(timeout=5)
        self._serve_reports()
        self._engine.close()


def _unknown_outcome(error: AssuredError) -> AssuredError:
    """``error`` for records whose write may have landed: said so, since they may be in the
    log. A retriable cause stays retriable (sending them again may write them twice)."""
    if not error.retriable:
        return error  # fatal, or the topic is gone: that says more than "unknown"
    unknown = RetriableError(
        "outcome unknown: a write of these records may have landed (its acknowledgement was "
        f"lost) and could not be confirmed before the delivery timeout ({error}). They may be "
        "in the log or not; sending them again may write them twice"
    )
    unknown.__cause__ = error
    return unknown
