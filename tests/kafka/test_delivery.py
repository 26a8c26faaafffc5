"""A record the broker never wrote is never a silent success on Kafka (issue 18, item 2).

Records sent without a callback: ``flush()`` raises ``DeliveryError`` for those that failed
(over the topic's ``max.message.bytes``, timed out while the broker was paused) and for those
still queued when its timeout ran out. Records sent with a callback report only to it. Inside a
transaction a failed record makes the transaction abortable: it cannot commit, and nothing of it
becomes visible. Real broker; the broker is paused with SIGSTOP where a test needs it away.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

from assured.errors import AbortableError, DeliveryError, RecordTooLargeError, RetriableError
from assured.log import DeliveryReport, Log, TopicPartition, open_log
from assured.testing.kafka import KafkaCluster
from tests.conftest import create_topic

pytestmark = pytest.mark.kafka

SMALL = {"max.message.bytes": "1000"}
BIG = b"x" * 5000


@contextlib.contextmanager
def paused(cluster: KafkaCluster, resume_after: float | None = 60) -> Iterator[None]:
    """Every broker of ``cluster`` stopped (SIGSTOP) for the block, and seen stopped before it
    begins; resumed (SIGCONT) on the way out, or after ``resume_after`` seconds, a safety valve
    only: a test's calls that must fail while the broker is stopped would pass if a busy
    machine ran them after the broker came back."""
    procs = [p for p in (n.process() for n in cluster.members) if p is not None]
    assert procs, "no broker process to pause"
    lock = threading.Lock()
    running = False

    def resume() -> None:
        nonlocal running
        with lock:
            if not running:
                running = True
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        p.resume()

    for p in procs:
        p.suspend()
    deadline = time.monotonic() + 5
    while any(p.status() != psutil.STATUS_STOPPED for p in procs):
        assert time.monotonic() < deadline, "a broker did not stop on SIGSTOP"
        time.sleep(0.01)
    timer = threading.Timer(resume_after, resume) if resume_after is not None else None
    if timer is not None:
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
        resume()


def read(log: Log, topic: str, count: int, isolation: str = "read_committed") -> list[bytes]:
    """The values of partition 0 of ``topic`` a reader with ``isolation`` sees: once ``count``
    arrived (or 20 s passed), and a little longer, to catch extras."""
    with log.consumer(isolation=isolation) as reader:  # type: ignore[arg-type]
        reader.assign([TopicPartition(topic, 0)])
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(got) < count and time.monotonic() < deadline:
            got += [r.value or b"" for r in reader.poll(timeout=0.2)]
        got += [r.value or b"" for r in reader.poll(timeout=0.5)]
        return got


@pytest.fixture
def log(kafka_bootstrap: str) -> Iterator[Log]:
    opened = open_log(f"kafka://{kafka_bootstrap}")
    yield opened
    opened.close()


def test_flush_raises_for_a_record_over_the_topics_size_limit(
    log: Log, kafka_bootstrap: str
) -> None:
    topic = create_topic(kafka_bootstrap, config=SMALL)
    producer = log.producer()
    producer.send(topic, b"fits", partition=0)
    assert producer.flush(30) == 0  # (the broker refuses a batch as a whole)
    producer.send(topic, BIG, partition=0)  # librdkafka takes it: 5000 B < its 1 MB limit
    with pytest.raises(DeliveryError) as raised:
        producer.flush(30)
    error = raised.value
    assert error.failed == 1
    assert "1 record(s)" in str(error)
    assert repr(topic) in str(error)
    assert [type(e) for e in error.errors] == [RecordTooLargeError]
    assert not error.retriable  # sending it again would fail again
    assert producer.flush(30) == 0, "raised once, for the failures since the previous flush"
    producer.send(topic, b"after", partition=0)
    assert producer.flush(30) == 0
    producer.close()
    assert read(log, topic, 2) == [b"fits", b"after"]


def test_flush_raises_retriable_for_records_that_timed_out_and_close_too(
    log: Log, kafka_bootstrap: str, kafka_broker: KafkaCluster
) -> None:
    topic = create_topic(kafka_bootstrap)
    producer = log.producer(config={"message.timeout.ms": 1000})
    # Warmed up (connected, the partition's leader known) before the broker stops. On a busy
    # machine a new topic's first write once took longer than this producer's 1 s: tried again.
    for attempt in range(10):
        producer.send(topic, b"warm-up", partition=0)
        try:
            assert producer.flush(30) == 0
            break
        except DeliveryError:
            if attempt == 9:
                raise
    with paused(kafka_broker):
        for i in range(3):
            producer.send(topic, f"lost-{i}".encode(), partition=0)
        started = time.monotonic()
        with pytest.raises(DeliveryError) as raised:
            producer.flush(20)
        assert time.monotonic() - started < 10
        producer.send(topic, b"lost-at-close", partition=0)
        with pytest.raises(DeliveryError) as at_close:
            producer.close()
    error = raised.value
    assert error.failed == 3
    assert error.errors
    assert all(isinstance(e, RetriableError) for e in error.errors)
    assert error.retriable, "timeouts: the records may be sent again"
    assert at_close.value.failed == 1


def test_flush_raises_when_records_are_still_queued_at_its_timeout(
    log: Log, kafka_bootstrap: str, kafka_broker: KafkaCluster
) -> None:
    topic = create_topic(kafka_bootstrap)
    producer = log.producer()  # the default message timeout: minutes
    producer.send(topic, b"first", partition=0)
    assert producer.flush(30) == 0
    with paused(kafka_broker):
        producer.send(topic, b"late", partition=0)
        started = time.monotonic()
        with pytest.raises(DeliveryError) as raised:
            producer.flush(1)
        assert time.monotonic() - started < 3
    error = raised.value
    assert error.failed == 1
    assert "still queued" in str(error)
    assert error.retriable
    assert producer.flush(60) == 0, "the queued record lands once the broker is back"
    producer.close()
    assert read(log, topic, 2) == [b"first", b"late"]


def test_records_with_a_callback_report_only_to_it(log: Log, kafka_bootstrap: str) -> None:
    topic = create_topic(kafka_bootstrap, config=SMALL)
    producer = log.producer()
    reports: list[DeliveryReport] = []
    for i in range(50):  # without callbacks first: the producer reports failures only
        producer.send(topic, f"{i}".encode(), partition=0)
    for i in range(50, 100):  # then with: every record is reported, in order
        producer.send(topic, f"{i}".encode(), partition=0, on_delivery=reports.append)
    assert producer.flush(30) == 0
    producer.send(topic, BIG, partition=0, on_delivery=reports.append)
    assert producer.flush(30) == 0, "the failed record had a callback: it was told, not flush"
    producer.close()
    assert [r.offset for r in reports[:50]] == list(range(50, 100))
    assert all(r.error is None for r in reports[:50])
    assert isinstance(reports[50].error, RecordTooLargeError)
    assert read(log, topic, 100) == [f"{i}".encode() for i in range(100)]


def test_a_failed_record_makes_the_transaction_abortable_and_nothing_visible(
    log: Log, kafka_bootstrap: str
) -> None:
    topic = create_topic(kafka_bootstrap, config=SMALL)
    producer = log.producer(transactional_id=f"tx-{uuid.uuid4().hex[:8]}")
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(topic, b"doomed", partition=0)
    producer.send(topic, BIG, partition=0)
    assert producer.flush(30) == 0  # the broker refuses the batch: the commit is told, not flush
    with pytest.raises(AbortableError) as sending:
        producer.send(topic, b"more", partition=0)
    assert "MSG_SIZE_TOO_LARGE" in str(sending.value), "the cause, not a bare '_STATE'"
    with pytest.raises(AbortableError):
        producer.commit_transaction(30)
    producer.abort_transaction(30)
    # The same producer carries on. librdkafka fails the next transaction too, once, with
    # OUT_OF_ORDER_SEQUENCE_NUMBER (the refused records left a gap in the sequence, and the
    # epoch bump that closes it comes with the next abort): abortable, like any other.
    failures = []
    for attempt in range(3):
        producer.begin_transaction()
        producer.send(topic, f"kept-{attempt}".encode(), partition=0)
        try:
            producer.commit_transaction(30)
            break
        except AbortableError as e:
            failures.append(e)
            producer.abort_transaction(30)
    assert len(failures) <= 1, failures
    producer.close()
    assert read(log, topic, 1) == [f"kept-{len(failures)}".encode()]
    assert b"doomed" not in read(log, topic, 1, "read_uncommitted"), "refused with BIG"
