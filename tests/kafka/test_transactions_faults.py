"""Transactions on Kafka when things go wrong (issue 18, items 12, 14 and 15).

- Fencing by a second instance with the same transactional id is fatal and fenced, even when
  the first producer learns it from ``send()`` (librdkafka's bare ``_FATAL``).
- A transaction held open past its timeout is reported as ``TransactionTimedOutError``
  (abortable), and the same producer carries on after ``abort_transaction()``.
- With the broker paused (SIGSTOP), every transactional call keeps to its timeout as a total
  deadline, and calling the same method again resumes it.

Real broker throughout.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from assured.errors import (
    AbortableError,
    AssuredError,
    ProducerFencedError,
    RetriableError,
    TransactionTimedOutError,
    UsageError,
)
from assured.log import Consumer, DeliveryReport, Log, Producer, TopicPartition, open_log
from assured.testing.kafka import KafkaCluster
from tests.conftest import create_topic
from tests.kafka.test_delivery import paused, read

pytestmark = pytest.mark.kafka


@pytest.fixture
def log(kafka_bootstrap: str) -> Iterator[Log]:
    opened = open_log(f"kafka://{kafka_bootstrap}")
    yield opened
    opened.close()


def txn_id() -> str:
    return f"tx-{uuid.uuid4().hex[:10]}"


def raises_within(
    seconds: float, kind: type[AssuredError], fn: Callable[[], object]
) -> AssuredError:
    """``fn()`` raises ``kind``, within ``seconds``."""
    started = time.monotonic()
    try:
        fn()
    except kind as e:
        took = time.monotonic() - started
        assert took < seconds, f"{fn} took {took:.1f}s, over its {seconds}s"
        return e
    pytest.fail(f"{fn} returned after {time.monotonic() - started:.1f}s, raising nothing")


# -- fencing ----------------------------------------------------------------------------------


def test_a_second_instance_fences_the_first_even_through_send(
    log: Log, kafka_bootstrap: str
) -> None:
    topic = create_topic(kafka_bootstrap)
    same = txn_id()
    zombie = log.producer(transactional_id=same)
    zombie.init_transactions()
    zombie.begin_transaction()
    zombie.send(topic, b"zombie", partition=0)
    assert zombie.flush(30) == 0
    successor = log.producer(transactional_id=same)
    successor.init_transactions(30)  # bumps the epoch: the zombie is fenced

    # The zombie's next record fails in the background and librdkafka turns fatal; send()
    # then hears only "_FATAL". Without poll() in between, send() is where it surfaces.
    def send_until_refused() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            zombie.send(topic, b"zombie-more", partition=0)
            time.sleep(0.05)

    with pytest.raises(AssuredError) as raised:
        send_until_refused()
    error = raised.value
    assert isinstance(error, ProducerFencedError), repr(error)
    assert error.fatal
    assert error.fenced
    for later in (
        zombie.commit_transaction,
        zombie.abort_transaction,
        zombie.begin_transaction,
        lambda: zombie.send(topic, b"again"),
        zombie.flush,
    ):
        with pytest.raises(ProducerFencedError):
            later()
    successor.begin_transaction()
    successor.send(topic, b"successor", partition=0)
    successor.commit_transaction(30)
    successor.close()
    zombie.close()
    assert read(log, topic, 1) == [b"successor"]


# -- transaction timeout ----------------------------------------------------------------------


@pytest.mark.parametrize("found_by", ["commit", "send"])
def test_a_transaction_past_its_timeout_is_timed_out_not_fenced(
    log: Log, kafka_bootstrap: str, found_by: str
) -> None:
    """What librdkafka says (seen on Kafka 4.1, librdkafka 2.16): the broker aborts the
    transaction and bumps the epoch; EndTxn or Produce then get INVALID_PRODUCER_EPOCH, which
    librdkafka reports as fatal ``_FENCED`` "This instance has been fenced by a newer
    instance", exactly as for a real second instance (``txn_requires_abort()`` false in both).
    Only the transaction's age tells them apart, and that is what the backend goes by."""
    topic = create_topic(kafka_bootstrap)
    producer = log.producer(transactional_id=txn_id(), transaction_timeout_ms=2000)
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.send(topic, b"too-slow", partition=0)
    assert producer.flush(30) == 0
    time.sleep(5)  # the broker aborts it after 2 s (its cleanup runs every second)

    def carry_on() -> None:
        if found_by == "commit":
            producer.commit_transaction(30)
        else:
            producer.send(topic, b"later", partition=0)
            producer.flush(30)

    with pytest.raises(TransactionTimedOutError) as raised:
        carry_on()
    error = raised.value
    assert error.abortable
    assert not error.fatal
    assert not error.fenced
    assert "longer than its timeout" in str(error)
    with pytest.raises(TransactionTimedOutError):  # until it is aborted
        producer.commit_transaction(30)
    producer.abort_transaction(30)  # a fresh librdkafka producer under the same id
    producer.begin_transaction()
    producer.send(topic, b"in-time", partition=0)
    producer.commit_transaction(30)
    producer.close()
    assert read(log, topic, 1) == [b"in-time"]


def test_fenced_within_the_timeout_is_fenced(log: Log, kafka_bootstrap: str) -> None:
    topic = create_topic(kafka_bootstrap)
    same = txn_id()
    zombie = log.producer(transactional_id=same, transaction_timeout_ms=60_000)
    zombie.init_transactions(30)
    zombie.begin_transaction()
    zombie.send(topic, b"zombie", partition=0)
    assert zombie.flush(30) == 0
    successor = log.producer(transactional_id=same)
    successor.init_transactions(30)
    with pytest.raises(ProducerFencedError):
        zombie.commit_transaction(30)
    successor.close()
    zombie.close()


# -- deadlines with the broker paused ---------------------------------------------------------


@pytest.fixture
def member(log: Log, kafka_bootstrap: str) -> Iterator[tuple[Consumer, str]]:
    """A consumer group member owning the single partition of a fresh input topic."""
    source = create_topic(kafka_bootstrap)
    consumer = log.consumer(group_id=f"g-{uuid.uuid4().hex[:10]}")
    consumer.subscribe([source])
    deadline = time.monotonic() + 30
    while not consumer.assignment():
        assert time.monotonic() < deadline, "no assignment"
        consumer.poll(timeout=0.2)
    yield consumer, source
    consumer.close()


def open_transaction(log: Log, topic: str, value: bytes) -> Producer:
    """A producer whose transaction holds ``value``, written: its partition is in the
    transaction, so committing or aborting it needs the broker."""
    producer = log.producer(transactional_id=txn_id())
    producer.init_transactions(30)
    producer.begin_transaction()
    reports: list[DeliveryReport] = []
    producer.send(topic, value, partition=0, on_delivery=reports.append)
    assert producer.flush(30) == 0
    assert len(reports) == 1
    assert reports[0].error is None, reports[0].error
    assert reports[0].offset >= 0
    return producer


def test_send_offsets_keeps_its_deadline_and_is_waited_for_when_called_again(
    log: Log, kafka_bootstrap: str, kafka_broker: KafkaCluster, member: tuple[Consumer, str]
) -> None:
    consumer, source = member
    out = create_topic(kafka_bootstrap)
    producer = open_transaction(log, out, b"out")
    offsets = {TopicPartition(source, 0): 7}
    with paused(kafka_broker):
        error = raises_within(
            3.5,
            RetriableError,
            lambda: producer.send_offsets_to_transaction(offsets, consumer.group_metadata(), 2),
        )
        assert "call send_offsets_to_transaction() again" in str(error)
        with pytest.raises(RetriableError):  # an unfinished request blocks other calls...
            producer.commit_transaction(0.5)  # ...which wait for it within their own timeout
    producer.send_offsets_to_transaction(offsets, consumer.group_metadata(), 60)
    producer.commit_transaction(30)
    producer.close()
    assert read(log, out, 1) == [b"out"]
    assert consumer.committed([TopicPartition(source, 0)]) == {TopicPartition(source, 0): 7}


def test_commit_keeps_its_deadline_and_resumes_when_called_again(
    log: Log, kafka_bootstrap: str, kafka_broker: KafkaCluster
) -> None:
    out = create_topic(kafka_bootstrap)
    producer = open_transaction(log, out, b"committed-late")
    with paused(kafka_broker):
        error = raises_within(3.5, RetriableError, lambda: producer.commit_transaction(2))
        assert "call commit_transaction() again" in str(error)
        # The commit may be decided already: it cannot turn into an abort, nor be left behind.
        with pytest.raises(UsageError, match="cannot be aborted"):
            producer.abort_transaction(2)
        with pytest.raises(UsageError):
            producer.send(out, b"more", partition=0)
        raises_within(3.5, RetriableError, lambda: producer.commit_transaction(2))
    producer.commit_transaction(60)  # resumed: the one commit goes through
    producer.begin_transaction()
    producer.send(out, b"next", partition=0)
    producer.commit_transaction(30)
    producer.close()
    assert read(log, out, 2) == [b"committed-late", b"next"]


def test_abort_keeps_its_deadline_and_resumes_when_called_again(
    log: Log, kafka_bootstrap: str, kafka_broker: KafkaCluster
) -> None:
    out = create_topic(kafka_bootstrap)
    producer = open_transaction(log, out, b"aborted")
    with paused(kafka_broker):
        raises_within(3.5, RetriableError, lambda: producer.abort_transaction(2))
        with pytest.raises(UsageError, match="call abort_transaction"):
            producer.begin_transaction()
        raises_within(3.5, RetriableError, lambda: producer.abort_transaction(2))
    producer.abort_transaction(60)  # the same abort, resumed
    producer.begin_transaction()
    producer.send(out, b"kept", partition=0)
    producer.commit_transaction(30)
    producer.close()
    assert read(log, out, 1) == [b"kept"]


def test_an_abortable_error_needs_an_abort_before_anything_else(
    log: Log, kafka_bootstrap: str, member: tuple[Consumer, str]
) -> None:
    """A stale group generation makes the transaction abortable; only abort clears it."""
    consumer, source = member
    out = create_topic(kafka_bootstrap)
    producer = open_transaction(log, out, b"stale")
    stale = consumer.group_metadata()
    rival = log.consumer(group_id=stale.group_id)
    rival.subscribe([source])
    deadline = time.monotonic() + 30
    while consumer.group_metadata().generation == stale.generation:
        assert time.monotonic() < deadline, "the group did not rebalance"
        consumer.poll(timeout=0.1)
        rival.poll(timeout=0.1)
    with pytest.raises(AbortableError):
        producer.send_offsets_to_transaction({TopicPartition(source, 0): 1}, stale, 30)
    with pytest.raises(AbortableError):
        producer.commit_transaction(30)
    producer.abort_transaction(30)
    producer.close()
    rival.close()
    assert read(log, out, 0) == []
