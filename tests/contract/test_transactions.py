"""Transactions: atomic visibility, offsets committed with outputs, zombies fenced, and a dead
producer's transaction never blocking readers past its timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from assured.errors import AssuredError, ProducerFencedError, StaleGenerationError
from assured.log import Log, TopicPartition
from tests.contract.conftest import drain, poll_until, unique

ROOT = Path(__file__).resolve().parents[2]


def _read(log: Log, name: str, isolation: str, count: int) -> list[bytes | None]:
    with log.consumer(group_id=unique("r"), isolation=isolation) as reader:  # type: ignore[arg-type]
        reader.assign([TopicPartition(name, 0)])
        return [r.value for r in drain(reader, count, timeout=15)]


def test_abort_is_invisible_to_read_committed_and_commit_is_visible(
    log: Log, topic: Callable[..., str]
) -> None:
    name = topic()
    with log.producer(transactional_id=unique("tx")) as producer:
        producer.init_transactions()
        producer.begin_transaction()
        for i in range(10):
            producer.send(name, f"aborted-{i}".encode(), partition=0)
        producer.flush(30)
        producer.abort_transaction()
        producer.begin_transaction()
        for i in range(10):
            producer.send(name, f"committed-{i}".encode(), partition=0)
        producer.commit_transaction()
    committed = [f"committed-{i}".encode() for i in range(10)]
    aborted = [f"aborted-{i}".encode() for i in range(10)]
    assert _read(log, name, "read_committed", 10) == committed
    assert _read(log, name, "read_uncommitted", 20) == aborted + committed
    with log.admin() as admin:
        w = admin.watermarks(TopicPartition(name, 0))
    assert w.high == 22, "each transaction's marker takes an offset"
    assert w.lso == w.high


def test_open_transaction_holds_back_read_committed_at_the_lso(
    log: Log, topic: Callable[..., str]
) -> None:
    name = topic()
    with log.producer() as plain:
        plain.send(name, b"before", partition=0)
        plain.flush(30)
    producer = log.producer(transactional_id=unique("tx"))
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(name, b"pending", partition=0)
    producer.flush(30)
    with log.producer() as plain:
        plain.send(name, b"after", partition=0)
        plain.flush(30)
    with log.admin() as admin:
        w = admin.watermarks(TopicPartition(name, 0))
        assert (w.lso, w.high) == (1, 3)
    assert _read(log, name, "read_committed", 1) == [b"before"]
    assert _read(log, name, "read_uncommitted", 3) == [b"before", b"pending", b"after"]
    producer.commit_transaction()
    producer.close()
    assert _read(log, name, "read_committed", 3) == [b"before", b"pending", b"after"]


def test_offsets_sent_to_a_transaction_count_only_when_it_commits(
    log: Log, topic: Callable[..., str]
) -> None:
    source, sink = topic(), topic()
    group = unique("g")
    src = TopicPartition(source, 0)
    with log.producer() as plain:
        for i in range(6):
            plain.send(source, f"in-{i}".encode(), partition=0)
        plain.flush(30)
    consumer = log.consumer(group_id=group)
    consumer.subscribe([source])
    records = poll_until(consumer, lambda: bool(consumer.assignment()))
    records += drain(consumer, 6 - len(records))
    assert len(records) == 6
    with log.producer(transactional_id=unique("tx")) as producer:
        producer.init_transactions()
        producer.begin_transaction()
        producer.send(sink, b"out-a", partition=0)
        producer.send_offsets_to_transaction({src: 3}, consumer.group_metadata())
        producer.abort_transaction()
        with log.admin() as admin:
            assert admin.committed_offsets(group).get(src) is None
        producer.begin_transaction()
        producer.send(sink, b"out-b", partition=0)
        producer.send_offsets_to_transaction({src: 6}, consumer.group_metadata())
        producer.commit_transaction()
    with log.admin() as admin:
        # Kafka materializes transactional offsets just after the commit returns.
        deadline = time.monotonic() + 15
        while admin.committed_offsets(group, [source]).get(src) != 6:
            assert time.monotonic() < deadline, admin.committed_offsets(group, [source])
            time.sleep(0.1)
    assert _read(log, sink, "read_committed", 1) == [b"out-b"]
    consumer.close()


def test_zombie_fenced_by_transactional_id(log: Log, topic: Callable[..., str]) -> None:
    name = topic()
    txn_id = unique("tx")
    zombie = log.producer(transactional_id=txn_id)
    zombie.init_transactions()
    zombie.begin_transaction()
    zombie.send(name, b"zombie", partition=0)
    zombie.flush(30)
    successor = log.producer(transactional_id=txn_id)
    successor.init_transactions()  # fences the zombie and aborts its open transaction
    successor.begin_transaction()
    successor.send(name, b"successor", partition=0)
    successor.commit_transaction()

    def zombie_carries_on() -> None:
        zombie.send(name, b"more", partition=0)
        zombie.commit_transaction()

    with pytest.raises(AssuredError) as caught:
        zombie_carries_on()
    assert isinstance(caught.value, ProducerFencedError) or caught.value.fatal
    assert _read(log, name, "read_committed", 1) == [b"successor"]
    successor.close()
    zombie.close()


def _moved_on(log: Log, source: str) -> tuple[str, Any, Any, Any]:
    """A group whose first member's generation is stale: (group, that member, the newer
    member, the stale metadata)."""
    group = unique("g")
    old = log.consumer(group_id=group, session_timeout_ms=6000, heartbeat_interval_ms=500)
    old.subscribe([source])
    poll_until(old, lambda: len(old.assignment()) == 2)
    stale = old.group_metadata()
    newer = log.consumer(group_id=group, session_timeout_ms=6000, heartbeat_interval_ms=500)
    newer.subscribe([source])
    for _ in range(200):  # the group moves to the next generation
        old.poll(timeout=0.05)
        newer.poll(timeout=0.05)
        if newer.assignment() and old.group_metadata().generation != stale.generation:
            break
    return group, old, newer, stale


def test_zombie_fenced_by_group_generation(log: Log, topic: Callable[..., str]) -> None:
    source = topic(partitions=2)
    group, old, newer, stale = _moved_on(log, source)
    assert old.group_metadata().generation != stale.generation
    with log.producer(transactional_id=unique("tx")) as producer:
        producer.init_transactions()
        producer.begin_transaction()

        def commit_with_stale_generation() -> None:
            producer.send_offsets_to_transaction({TopicPartition(source, 0): 1}, stale)
            producer.commit_transaction()

        with pytest.raises(StaleGenerationError):
            commit_with_stale_generation()
        producer.abort_transaction()
    with log.admin() as admin:
        assert TopicPartition(source, 0) not in admin.committed_offsets(group)
    newer.close()
    old.close()


def test_offsets_refused_leave_a_transaction_that_cannot_commit(
    log: Log, topic: Callable[..., str]
) -> None:
    """A caller that ignores the failure of send_offsets_to_transaction and commits: the
    outputs must not become visible without their offsets (the embedded engine committed
    them; Kafka makes such a transaction abortable)."""
    source, out = topic(partitions=2), topic()
    _, old, newer, stale = _moved_on(log, source)
    with log.producer(transactional_id=unique("tx")) as producer:
        producer.init_transactions()
        producer.begin_transaction()
        producer.send(out, b"effect")
        with pytest.raises(AssuredError):
            producer.send_offsets_to_transaction({TopicPartition(source, 0): 1}, stale)
        with pytest.raises(AssuredError):
            producer.commit_transaction()  # the caller carried on regardless
        producer.abort_transaction()
    assert _read(log, out, "read_committed", 0) == []
    newer.close()
    old.close()


def test_dead_producers_transaction_stops_blocking_after_its_timeout(
    log: Log, topic: Callable[..., str]
) -> None:
    name = topic()
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.contract._open_txn", log.url, name, unique("tx"), "3000"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    with child:
        assert child.stdout is not None
        try:
            assert child.stdout.readline().strip() == "ready"
        finally:
            os.kill(child.pid, signal.SIGKILL)
    with log.producer() as plain:
        plain.send(name, b"after-the-crash", partition=0)
        plain.flush(30)
    started = time.monotonic()
    values = _read(log, name, "read_committed", 1)
    # Blocked while the dead transaction is open; readable once it times out and is aborted.
    deadline = time.monotonic() + 60
    while values != [b"after-the-crash"] and time.monotonic() < deadline:
        values = _read(log, name, "read_committed", 1)
    assert values == [b"after-the-crash"]
    assert time.monotonic() - started >= 1.0, "the open transaction did block readers at first"
    assert b"doomed-0" in _read(log, name, "read_uncommitted", 6)
