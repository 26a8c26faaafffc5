"""The embedded producer's sequence numbers after a write whose outcome is unknown, and its
periodic retention check under a held write lock.

A batch can land in the engine file and still be failed by the producer: its acknowledgement is
lost (the audit's ``lose_next_ack`` fault), the resends find the write lock held by another
process, and the delivery timeout passes. The engine recognises a resend by (producer id, epoch,
partition, base sequence), so a later batch that reused the failed batch's sequence numbers
would be taken for a resend of it and dropped, reported as written. These tests send such a
later batch and read it back. Real engine files throughout; another connection holds the write
lock (``BEGIN IMMEDIATE``) as another process would.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from assured.errors import AbortableError, DeliveryError, RetriableError
from assured.log import DeliveryReport, Log, Producer, TopicPartition, open_log
from assured.log.embedded._engine import now_ms
from assured.log.embedded._producer import EmbeddedProducer

TP = TopicPartition("out", 0)
SHORT_DELIVERY = {"delivery.timeout.ms": 300}


class WriteLock:
    """The engine file's write lock, held by a connection of its own until released."""

    def __init__(self, path: Path):
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("BEGIN IMMEDIATE")
        self.held = True

    def release(self) -> None:
        if self.held:
            self._conn.execute("ROLLBACK")
            self.held = False

    def close(self) -> None:
        self.release()
        self._conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "engine.db"


@pytest.fixture
def locks() -> Iterator[list[WriteLock]]:
    taken: list[WriteLock] = []
    yield taken
    for lock in taken:
        lock.close()


def open_with(db: Path) -> Log:
    # A short busy wait, so that the writes the test blocks fail fast.
    log = open_log(f"embedded://{db}?busy_timeout_ms=100")
    with log.admin() as admin:
        admin.create_topic("out", 1)
    return log


def lock_after_next_write(producer: Producer, db: Path, locks: list[WriteLock]) -> EmbeddedProducer:
    """Once the producer's next engine write has ended (landed, or raised after landing), the
    write lock is taken by another connection and kept until released by hand."""
    assert isinstance(producer, EmbeddedProducer)
    original = producer._write_once

    def write_then_lock(*args: object, **kwargs: object) -> list[int]:
        try:
            return original(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            if not locks:
                locks.append(WriteLock(db))

    producer._write_once = write_then_lock  # type: ignore[method-assign]
    return producer


def values(log: Log, isolation: str = "read_uncommitted") -> list[bytes | None]:
    with log.consumer(isolation=isolation) as reader:  # type: ignore[arg-type]
        reader.assign([TP])
        return [r.value for r in reader.poll(timeout=0.5)]


# -- a landed batch failed at the delivery timeout --------------------------------------------


@pytest.mark.parametrize("with_callback", [False, True])
def test_a_batch_after_a_landed_but_failed_one_is_written(
    db: Path, locks: list[WriteLock], with_callback: bool
) -> None:
    log = open_with(db)
    producer = lock_after_next_write(
        log.producer(config=SHORT_DELIVERY, linger_ms=60_000), db, locks
    )
    reports: list[DeliveryReport] = []
    callback = reports.append if with_callback else None
    producer.send("out", b"landed", partition=0, on_delivery=callback)
    producer.lose_next_ack = True  # the write lands; then the lock is held past the timeout
    if with_callback:
        assert producer.flush() == 0
        assert len(reports) == 1
        error = reports[0].error
        assert reports[0].offset == -1
        summary = ""
    else:
        with pytest.raises(DeliveryError) as raised:
            producer.flush()
        assert raised.value.failed == 1
        error, summary = raised.value.errors[0], str(raised.value)

    locks[0].release()
    producer.send("out", b"second", partition=0, on_delivery=callback)  # a batch of the same size
    assert producer.flush() == 0  # no error: it is said to be written, so it must be readable
    producer.send("out", b"third", partition=0, on_delivery=callback)
    assert producer.flush() == 0
    producer.close()
    assert values(log) == [b"landed", b"second", b"third"]
    if with_callback:
        assert [r.offset for r in reports[1:]] == [1, 2]
        assert all(r.error is None for r in reports[1:])
    else:
        assert "1 of them may have been" in summary
    # The first record failed, said to be of unknown outcome: it may be there (here it is).
    assert isinstance(error, RetriableError)
    assert "outcome unknown" in str(error)


def test_a_batch_after_a_failed_one_that_did_not_land_is_written_too(
    db: Path, locks: list[WriteLock]
) -> None:
    """The control: the failed batch never landed, so its sequence numbers are the next ones
    and the next batch takes them, with no gap the engine would refuse."""
    log = open_with(db)
    producer = log.producer(config=SHORT_DELIVERY, linger_ms=60_000)
    producer.send("out", b"first", partition=0)
    assert producer.flush() == 0
    locks.append(WriteLock(db))
    producer.send("out", b"lost", partition=0)
    with pytest.raises(DeliveryError) as raised:
        producer.flush()
    assert "unknown" not in str(raised.value)  # never written: it is known not to be there
    locks[0].release()
    producer.send("out", b"third", partition=0)
    assert producer.flush() == 0
    producer.close()
    assert values(log) == [b"first", b"third"]


def test_a_lost_ack_then_a_cut_short_flush_is_deduplicated_later(
    db: Path, locks: list[WriteLock]
) -> None:
    """The other way out of the same start: the caller's timeout, not the delivery timeout,
    ends the wait, so the batch stays queued as it was and its resend is recognised."""
    log = open_with(db)
    producer = lock_after_next_write(log.producer(linger_ms=60_000), db, locks)
    producer.send("out", b"landed", partition=0)
    producer.lose_next_ack = True
    assert producer.flush(0.3) == 1  # still queued, same sequence
    locks[0].release()
    producer.send("out", b"second", partition=0)
    assert producer.flush(10) == 0
    producer.close()
    assert values(log) == [b"landed", b"second"]


def test_a_transaction_after_one_with_a_landed_but_failed_batch_commits_its_records(
    db: Path, locks: list[WriteLock]
) -> None:
    log = open_with(db)
    producer = log.producer(transactional_id="tx", config=SHORT_DELIVERY)
    producer.init_transactions()
    producer = lock_after_next_write(producer, db, locks)
    producer.begin_transaction()
    producer.send("out", b"aborted", partition=0)
    producer.lose_next_ack = True
    with pytest.raises(DeliveryError) as raised:
        producer.flush()
    locks[0].release()
    with pytest.raises(AbortableError, match="cannot commit"):
        producer.commit_transaction()
    producer.abort_transaction()

    producer.begin_transaction()
    producer.send("out", b"committed", partition=0)  # the same size as the aborted one
    producer.commit_transaction()
    producer.close()
    assert values(log, "read_committed") == [b"committed"]
    assert "outcome unknown" in str(raised.value)


def test_a_transaction_aborted_with_a_landed_batch_still_queued(
    db: Path, locks: list[WriteLock]
) -> None:
    """A lost acknowledgement, a commit cut short by its timeout with the batch queued, then an
    abort that drops the queue: the next transaction's batch is not taken for that one."""
    log = open_with(db)
    producer = log.producer(transactional_id="tx")
    producer.init_transactions()
    producer = lock_after_next_write(producer, db, locks)
    producer.begin_transaction()
    producer.send("out", b"aborted", partition=0)
    producer.lose_next_ack = True
    with pytest.raises(RetriableError, match="timed out"):
        producer.commit_transaction(timeout=0.3)
    locks[0].release()
    producer.abort_transaction()

    producer.begin_transaction()
    producer.send("out", b"committed", partition=0)
    producer.commit_transaction()
    producer.close()
    assert values(log, "read_committed") == [b"committed"]


# -- the retention check never blocks a caller ------------------------------------------------


def test_flush_is_not_held_up_by_the_retention_check(db: Path, locks: list[WriteLock]) -> None:
    # A busy wait of 3 s, so that the code before the fix fails in seconds, not in 30.
    log = open_log(f"embedded://{db}?busy_timeout_ms=3000&retention_check_interval_ms=0")
    with log.admin() as admin:
        admin.create_topic("out", 1, {"retention.ms": "60000"})
    old = now_ms() - 120_000
    producer = log.producer(linger_ms=60_000)
    for _ in range(3):
        producer.send("out", b"old", partition=0, timestamp_ms=old)
    lock_after_next_write(producer, db, locks)
    began = time.monotonic()
    assert producer.flush(timeout=0.5) == 0  # written; the retention check finds the lock held
    assert time.monotonic() - began < 1.0
    with log.admin() as admin:
        assert admin.watermarks(TP).low == 0  # skipped, not done

    locks[0].release()
    producer.send("out", b"new", partition=0)
    assert producer.flush(timeout=5) == 0  # the check runs again, and now it can
    producer.close()
    with log.admin() as admin:
        assert admin.watermarks(TP).low == 3
    assert values(log) == [b"new"]


def test_sending_is_not_held_up_by_the_retention_check_in_the_background(
    db: Path, locks: list[WriteLock]
) -> None:
    """The linger thread's write runs the check too, under the producer's lock: a send that
    waits for that lock must not wait for the engine's busy timeout."""
    log = open_log(f"embedded://{db}?busy_timeout_ms=3000&retention_check_interval_ms=0")
    with log.admin() as admin:
        admin.create_topic("out", 1)
    producer = lock_after_next_write(log.producer(linger_ms=1), db, locks)
    producer.send("out", b"a", partition=0)
    # The linger thread writes it; the lock is taken; the retention check runs.
    deadline = time.monotonic() + 10
    while not locks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert locks
    time.sleep(0.05)
    began = time.monotonic()
    producer.send("out", b"b", partition=0)
    assert time.monotonic() - began < 1.0
    locks[0].release()
    assert producer.flush(timeout=5) == 0
    producer.close()
    assert values(log) == [b"a", b"b"]
