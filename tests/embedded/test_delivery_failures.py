"""The embedded producer never drops a write silently (issue 18).

Another connection holds the engine file's write lock (``BEGIN IMMEDIATE``) for longer than the
producer may wait; then: ``flush()`` raises ``DeliveryError`` for records sent without a
callback, a transaction that lost a write cannot commit (nor can its consumer offsets), and the
timeouts of ``flush``, ``send_offsets_to_transaction`` and ``commit_transaction`` bound how long
they wait for the lock. Real engine files throughout.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from assured.errors import AbortableError, DeliveryError, RetriableError
from assured.log import DeliveryReport, GroupMetadata, Log, Producer, TopicPartition, open_log
from assured.log.embedded import Engine
from assured.log.embedded._engine import now_ms

SOURCE = TopicPartition("in", 0)
GROUP = GroupMetadata("g", -1, "")  # hand-assigned partitions: Kafka's generation -1
SHORT_DELIVERY = {"delivery.timeout.ms": 300}


class WriteLock:
    """The engine file's write lock, held by a connection of its own (as another process
    would), until released, by hand or by a timer."""

    def __init__(self, path: Path):
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("BEGIN IMMEDIATE")
        self._held = threading.Lock()
        self._timer: threading.Timer | None = None
        self.held = True

    def release_after(self, seconds: float) -> None:
        self._timer = threading.Timer(seconds, self.release)
        self._timer.start()

    def release(self) -> None:
        with self._held:
            if self.held:
                self._conn.execute("ROLLBACK")
                self.held = False

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.release()
        self._conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "engine.db"


@pytest.fixture
def log(db: Path) -> Log:
    # A short busy wait, so that the code before the fix also fails fast instead of hanging.
    log = open_log(f"embedded://{db}?busy_timeout_ms=100")
    with log.admin() as admin:
        admin.create_topic("in", 1)
        admin.create_topic("out", 1)
    return log


@pytest.fixture
def slow_log(db: Path) -> Log:
    """The default busy wait (30 s): only the calls' own timeouts can cut a wait short."""
    log = open_log(f"embedded://{db}")
    with log.admin() as admin:
        admin.create_topic("in", 1)
        admin.create_topic("out", 1)
    return log


@pytest.fixture
def locks(db: Path) -> Iterator[list[WriteLock]]:
    taken: list[WriteLock] = []
    yield taken
    for lock in taken:
        lock.close()


def hold(db: Path, locks: list[WriteLock]) -> WriteLock:
    lock = WriteLock(db)
    locks.append(lock)
    return lock


def committed_values(log: Log, topic: str = "out") -> list[bytes | None]:
    with log.consumer(isolation="read_committed") as reader:
        reader.assign([TopicPartition(topic, 0)])
        return [r.value for r in reader.poll(timeout=0.5)]


def committed_offset(log: Log) -> int | None:
    with log.consumer(group_id=GROUP.group_id) as consumer:
        return consumer.committed([SOURCE])[SOURCE]


def transactional(log: Log, config: Mapping[str, int] | None = None) -> Producer:
    producer = log.producer(transactional_id="tx", config=config)
    producer.init_transactions()
    return producer


# -- flush ------------------------------------------------------------------------------------


def test_flush_raises_for_records_without_a_callback_that_were_not_written(
    db: Path, log: Log, locks: list[WriteLock]
) -> None:
    producer = log.producer(config=SHORT_DELIVERY)
    lock = hold(db, locks)
    for i in range(3):
        producer.send("out", f"lost-{i}".encode(), partition=0)
    with pytest.raises(DeliveryError) as raised:
        producer.flush()
    error = raised.value
    assert error.failed == 3
    assert "3 record(s)" in str(error)
    assert "'out'" in str(error)
    assert error.errors
    assert all(isinstance(e, RetriableError) for e in error.errors)
    assert error.retriable  # every failure was a timeout: sending again may work

    lock.release()
    assert producer.flush() == 0  # raised once; the count starts again
    producer.send("out", b"kept", partition=0)
    assert producer.flush() == 0
    producer.close()
    assert committed_values(log) == [b"kept"]


def test_failures_in_the_background_are_raised_by_the_next_flush(
    db: Path, log: Log, locks: list[WriteLock]
) -> None:
    producer = log.producer(config=SHORT_DELIVERY, linger_ms=1)
    lock = hold(db, locks)
    producer.send("out", b"lost-0", partition=0)
    producer.send("in", b"lost-1", partition=0)
    time.sleep(1.0)  # the linger thread tries, and gives up after the delivery timeout
    lock.release()
    with pytest.raises(DeliveryError, match="2 record") as raised:
        producer.flush()
    assert raised.value.failed == 2
    assert "'in'" in str(raised.value)
    assert "'out'" in str(raised.value)
    producer.close()


def test_a_record_with_a_callback_reports_through_its_callback_only(
    db: Path, log: Log, locks: list[WriteLock]
) -> None:
    producer = log.producer(config=SHORT_DELIVERY)
    reports: list[DeliveryReport] = []
    lock = hold(db, locks)
    producer.send("out", b"reported", partition=0, on_delivery=reports.append)
    assert producer.flush() == 0  # no DeliveryError: the callback was told
    assert len(reports) == 1
    assert isinstance(reports[0].error, RetriableError)
    assert reports[0].offset == -1

    producer.send("out", b"reported", partition=0, on_delivery=reports.append)
    producer.send("out", b"unreported", partition=0)
    with pytest.raises(DeliveryError) as raised:
        producer.flush()
    assert raised.value.failed == 1  # only the record nobody else could tell
    assert len(reports) == 2
    assert reports[1].error is not None
    lock.release()
    producer.close()


def test_flush_returns_within_its_timeout_and_the_records_wait(
    db: Path, slow_log: Log, locks: list[WriteLock]
) -> None:
    producer = slow_log.producer()  # delivery timeout 120 s: the records are not given up
    lock = hold(db, locks)
    lock.release_after(3.0)
    for i in range(3):
        producer.send("out", f"m{i}".encode(), partition=0)
    began = time.monotonic()
    assert producer.flush(0.3) == 3
    assert time.monotonic() - began < 1.5
    lock.release()
    assert producer.flush(30) == 0
    producer.close()
    assert committed_values(slow_log) == [b"m0", b"m1", b"m2"]


def test_close_logs_the_records_it_could_not_write(
    db: Path, log: Log, locks: list[WriteLock], caplog: pytest.LogCaptureFixture
) -> None:
    producer = log.producer(config=SHORT_DELIVERY, linger_ms=60_000)
    lock = hold(db, locks)
    producer.send("out", b"a", partition=0)
    producer.send("out", b"b", partition=0)
    with caplog.at_level(logging.ERROR, logger="assured.log.embedded"):
        producer.close()
    assert "2 record(s)" in caplog.text
    lock.release()
    assert committed_values(log) == []


# -- transactions -----------------------------------------------------------------------------


@pytest.mark.parametrize("with_callback", [False, True])
def test_a_lost_write_makes_the_transaction_abortable(
    db: Path, log: Log, locks: list[WriteLock], with_callback: bool
) -> None:
    producer = transactional(log, SHORT_DELIVERY)
    reports: list[DeliveryReport] = []
    callback = reports.append if with_callback else None
    producer.begin_transaction()
    producer.send("out", b"m1", partition=0, on_delivery=callback)
    producer.flush()  # m1 is written, inside the transaction
    lock = hold(db, locks)
    producer.send("out", b"m2", partition=0, on_delivery=callback)
    producer.send("out", b"m3", partition=0, on_delivery=callback)
    if with_callback:
        producer.flush()
        assert [r.error is None for r in reports] == [True, False, False]
    else:
        with pytest.raises(DeliveryError) as raised:
            producer.flush()
        assert raised.value.failed == 2
    lock.release()
    producer.send_offsets_to_transaction({SOURCE: 3}, GROUP)
    with pytest.raises(AbortableError, match="cannot commit") as refused:
        producer.commit_transaction()
    assert "busy" in str(refused.value)  # the cause is named
    assert committed_values(log) == []
    assert committed_offset(log) is None

    producer.abort_transaction()
    producer.begin_transaction()
    for value in (b"m1", b"m2", b"m3"):
        producer.send("out", value, partition=0)
    producer.send_offsets_to_transaction({SOURCE: 3}, GROUP)
    producer.commit_transaction()
    producer.close()
    assert committed_values(log) == [b"m1", b"m2", b"m3"]
    assert committed_offset(log) == 3


def test_a_write_lost_inside_commit_transaction_aborts_it(
    db: Path, log: Log, locks: list[WriteLock]
) -> None:
    producer = transactional(log, SHORT_DELIVERY)
    producer.begin_transaction()
    producer.send("out", b"m1", partition=0)
    producer.send_offsets_to_transaction({SOURCE: 2}, GROUP)
    lock = hold(db, locks)
    producer.send("out", b"m2", partition=0)
    with pytest.raises(AbortableError):
        producer.commit_transaction()  # m1, m2 are written at commit: they time out
    lock.release()
    with pytest.raises(AbortableError):
        producer.commit_transaction()  # still poisoned: it never commits
    producer.abort_transaction()
    assert committed_values(log) == []
    assert committed_offset(log) is None
    producer.begin_transaction()
    producer.send("out", b"again", partition=0)
    producer.commit_transaction()
    producer.close()
    assert committed_values(log) == [b"again"]


def test_send_offsets_that_time_out_keep_the_transaction_from_committing(
    db: Path, slow_log: Log, locks: list[WriteLock]
) -> None:
    producer = transactional(slow_log)
    producer.begin_transaction()
    producer.send("out", b"m1", partition=0)
    producer.flush()
    lock = hold(db, locks)
    lock.release_after(3.0)
    began = time.monotonic()
    with pytest.raises(RetriableError):
        producer.send_offsets_to_transaction({SOURCE: 1}, GROUP, timeout=0.3)
    assert time.monotonic() - began < 1.5
    lock.release()
    with pytest.raises(AbortableError, match="offsets"):
        producer.commit_transaction()  # the offsets were never added: no commit without them
    producer.abort_transaction()
    assert committed_values(slow_log) == []
    assert committed_offset(slow_log) is None

    producer.begin_transaction()
    producer.send("out", b"m1", partition=0)
    lock = hold(db, locks)
    with pytest.raises(RetriableError):
        producer.send_offsets_to_transaction({SOURCE: 1}, GROUP, timeout=0.3)
    lock.release()
    producer.send_offsets_to_transaction({SOURCE: 1}, GROUP)  # retried: now it counts
    producer.commit_transaction()
    producer.close()
    assert committed_values(slow_log) == [b"m1"]
    assert committed_offset(slow_log) == 1


@pytest.mark.parametrize("written_before", [False, True])
def test_commit_transaction_times_out_retriably_and_a_retry_commits_once(
    db: Path, slow_log: Log, locks: list[WriteLock], written_before: bool
) -> None:
    producer = transactional(slow_log)
    producer.begin_transaction()
    producer.send("out", b"m1", partition=0)
    if written_before:  # the lock is wanted for the commit itself, not for the records
        producer.send_offsets_to_transaction({SOURCE: 1}, GROUP)
        producer.flush()
    lock = hold(db, locks)
    lock.release_after(3.0)
    began = time.monotonic()
    with pytest.raises(RetriableError) as raised:
        producer.commit_transaction(timeout=0.3)
    assert time.monotonic() - began < 1.5
    assert not raised.value.abortable
    assert "nothing was committed" in str(raised.value)
    lock.release()
    if not written_before:
        producer.send_offsets_to_transaction({SOURCE: 1}, GROUP)
    producer.commit_transaction()  # the same transaction, committed now
    producer.close()
    assert committed_values(slow_log) == [b"m1"]
    assert committed_offset(slow_log) == 1
    with slow_log.admin() as admin:
        marks = admin.watermarks(TopicPartition("out", 0))
    assert (marks.high, marks.lso) == (2, 2)  # m1 and one commit marker


def test_a_second_commit_of_a_committed_transaction_changes_nothing(db: Path, log: Log) -> None:
    engine = Engine(db)
    part = engine.part_id(TopicPartition("out", 0))
    pid, epoch = engine.init_transactions("tx", 60_000)
    with engine.write():
        txn = engine.txn_begin_or_check(pid, epoch, None)
        base, _ = engine.append(part, [(now_ms(), None, b"m1", None)], (pid, epoch, 0), txn)
        engine.txn_add_part(txn, part, base)
        engine.txn_add_offsets(txn, GROUP.group_id, GROUP.generation, GROUP.member_id, {SOURCE: 1})
    engine.commit_txn(pid, epoch, txn)
    engine.commit_txn(pid, epoch, txn)  # as after a commit whose answer was lost
    assert engine.watermarks(part) == (0, 2, 2)
    assert engine.committed(GROUP.group_id) == {SOURCE: 1}
    engine.close()
    assert committed_values(log) == [b"m1"]


def test_a_raw_database_error_while_writing_is_a_failed_delivery_not_a_vanished_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sqlite3 error the engine did not translate (a full disk during the insert) used to
    escape the producer's write: from the linger thread it was swallowed, and the records were
    gone with no callback and no DeliveryError."""
    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        admin.create_topic("t", 1)
    producer = log.producer()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Engine, "append", disk_full)
    producer.send("t", b"lost?")
    with pytest.raises(DeliveryError, match="disk is full") as failed:
        producer.flush()
    assert failed.value.failed == 1
    monkeypatch.undo()
    producer.close()
    log.close()
