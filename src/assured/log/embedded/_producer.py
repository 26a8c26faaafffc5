"""The embedded engine's producer: batches, idempotence, transactions.

``send`` queues a record; a batch is written when it reaches ``batch_size``, when ``linger_ms``
passes (a background thread sees to it; not inside a transaction), or on
``flush``/``commit_transaction``. One batch per
partition is written at a time, with that partition's next sequence number, so a batch that is
written again after a lost acknowledgement is recognised by the engine and not appended twice.
Delivery callbacks run in the caller's thread, inside ``poll`` or ``flush``, as in Kafka.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from assured.errors import (
    AbortableError,
    AssuredError,
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


@dataclass
class _Batch:
    tp: TopicPartition
    part: int
    rows: list[tuple[int, bytes | None, bytes | None, bytes | None]] = field(default_factory=list)
    callbacks: list[OnDelivery | None] = field(default_factory=list)
    bytes: int = 0


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
        self._last_retention = now_ms()
        self._lock = threading.RLock()
        self._pending: dict[int, _Batch] = {}
        self._pending_count = 0
        self._oldest: float | None = None
        self._reports: deque[tuple[OnDelivery, DeliveryReport]] = deque()
        self._sticky: dict[str, int] = {}
        self._topics: dict[str, tuple[TopicInfo, int]] = {}
        self._seq: dict[int, int] = {}
        self._pid: int | None = None
        self._epoch = 0
        self._txn: int | None = None  # the engine's transaction id, once the first write lands
        self._in_txn = False
        self._failed: AssuredError | None = None  # a fatal error: every later call raises it
        self._txn_error: AssuredError | None = None  # an abortable error in the open transaction
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
        with self._lock:
            if self._pending_count:
                self._write()
            remaining = self._pending_count
        self._serve_reports()
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

    def _write(self) -> None:
        """Write every pending batch in one engine transaction. Under the lock."""
        batches = list(self._pending.values())
        self._pending.clear()
        self._pending_count = 0
        self._oldest = None
        if not batches:
            return
        deadline = time.monotonic() + self._delivery_timeout
        while True:
            try:
                offsets = self._write_once(batches)
                break
            except RetriableError as e:
                if time.monotonic() >= deadline:
                    self._fail_batches(batches, e)
                    return
                time.sleep(0.01)  # the same batches, same sequences: a resend is deduplicated
            except AssuredError as e:
                self._fail_batches(batches, e)
                self._note(e)
                if self._in_txn and not e.fatal:
                    self._txn_error = e
                return
        for batch, base in zip(batches, offsets, strict=True):
            self._seq[batch.part] = self._seq.get(batch.part, 0) + len(batch.rows)
            for i, cb in enumerate(batch.callbacks):
                if cb is not None:
                    report = DeliveryReport(
                        batch.tp.topic, batch.tp.partition, base + i, batch.rows[i][0]
                    )
                    self._reports.append((cb, report))
        if self._retention_every >= 0 and now_ms() - self._last_retention > self._retention_every:
            self._last_retention = now_ms()
            with contextlib.suppress(LogError):
                self._engine.enforce_retention()

    def _write_once(self, batches: list[_Batch]) -> list[int]:
        offsets = []
        engine = self._engine
        txn = None
        with engine.write():
            if self._in_txn:
                assert self._pid is not None
                txn = engine.txn_begin_or_check(self._pid, self._epoch, self._txn)
            for b in batches:
                producer = None
                if self._pid is not None:
                    producer = (self._pid, self._epoch, self._seq.get(b.part, 0))
                base, _dup = engine.append(b.part, b.rows, producer, txn, b.bytes)
                if txn is not None:
                    engine.txn_add_part(txn, b.part, base)
                offsets.append(base)
        self._txn = txn  # only once the engine has it for sure
        if self.lose_next_ack:
            self.lose_next_ack = False
            raise LostAcknowledgementError("injected: the write landed but its ack was lost")
        return offsets

    def _fail_batches(self, batches: list[_Batch], error: Exception, quiet: bool = False) -> None:
        unreported = 0
        for b in batches:
            for i, cb in enumerate(b.callbacks):
                if cb is None:
                    unreported += 1
                else:
                    report = DeliveryReport(b.tp.topic, b.tp.partition, -1, b.rows[i][0], error)
                    self._reports.append((cb, report))
        if unreported and not quiet:
            log.error(
                "%d record(s) with no delivery callback were not written: %s", unreported, error
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
            self._seq.clear()

    def begin_transaction(self) -> None:
        with self._lock:
            self._need_transactional()
            if self._pid is None:
                raise UsageError("call init_transactions() once before begin_transaction()")
            if self._in_txn:
                raise UsageError("a transaction is already open; commit or abort it first")
            self._in_txn, self._txn, self._txn_error = True, None, None

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group: GroupMetadata, timeout: float = 30.0
    ) -> None:
        with self._lock:
            self._need_open_txn()
            assert self._pid is not None
            try:
                with self._engine.write():
                    txn = self._engine.txn_begin_or_check(self._pid, self._epoch, self._txn)
                    self._engine.txn_add_offsets(
                        txn, group.group_id, group.generation, group.member_id, offsets
                    )
                self._txn = txn
            except AssuredError as e:
                self._note(e)
                raise

    def commit_transaction(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._need_open_txn()
            assert self._pid is not None
            try:
                if self._pending_count:
                    self._write()
                if self._failed is not None:  # e.g. fenced while writing the last batch
                    raise self._failed
                if self._txn_error is not None:
                    raise AbortableError(
                        f"the transaction cannot commit: {self._txn_error}. Abort it, rewind "
                        "to the committed positions and try again"
                    ) from self._txn_error
                if self._txn is not None:
                    self._engine.commit_txn(self._pid, self._epoch, self._txn)
            except AssuredError as e:
                self._note(e)
                raise
            self._in_txn, self._txn = False, None
        self._serve_reports()

    def abort_transaction(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._need_transactional()
            if not self._in_txn:
                raise UsageError("abort_transaction() with no transaction open")
            assert self._pid is not None
            dropped = list(self._pending.values())
            self._pending.clear()
            self._pending_count = 0
            self._oldest = None
            self._fail_batches(dropped, AbortableError("the transaction was aborted"), quiet=True)
            try:
                if self._txn is not None:
                    self._engine.abort_txn(self._pid, self._epoch, self._txn)
            except AssuredError as e:
                self._note(e)
                raise
            finally:
                self._in_txn, self._txn, self._txn_error = False, None, None
        self._serve_reports()

    def _need_open_txn(self) -> None:
        self._need_transactional()
        if not self._in_txn:
            raise UsageError("no transaction is open; call begin_transaction() first")

    def _note(self, e: AssuredError) -> None:
        if e.fatal:
            self._failed = e
        elif e.abortable:
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
