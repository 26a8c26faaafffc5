"""Issue 18's holes at the level of an App, on a real broker: what the log reports is met by the
runtime the way each guarantee promises (the backend's own behaviour is in test_delivery.py and
test_transactions_faults.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator

import pytest

from assured import App, Message, Output, TopicPartition, open_log
from assured.errors import ProducerFencedError
from assured.log import Log
from assured.runtime import crashpoints
from assured.runtime._settings import Guarantee
from tests.conftest import create_topic
from tests.kafka.test_delivery import read

pytestmark = pytest.mark.kafka


@pytest.fixture
def log(kafka_bootstrap: str) -> Iterator[Log]:
    opened = open_log(f"kafka://{kafka_bootstrap}")
    yield opened
    opened.close()


def fill(log: Log, topic: str, values: list[bytes]) -> None:
    with log.producer() as producer:
        for v in values:
            producer.send(topic, v, partition=0)
        producer.flush()


def committed(log: Log, group: str, topic: str) -> int | None:
    with log.admin() as admin:
        return admin.committed_offsets(group, [topic]).get(TopicPartition(topic, 0))


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_an_output_the_broker_refuses_is_dead_lettered_and_never_committed_over(
    log: Log, kafka_bootstrap: str, guarantee: Guarantee
) -> None:
    """The output topic takes records of at most 1,000 bytes; one handler call sends 5,000.
    The producer accepts it, the broker refuses it: before, the runtime set no delivery callback
    and committed the input offsets over it (at least once), or aborted and redid the whole
    transaction forever (exactly once). Now the record at fault is found by redoing the records
    one at a time, and dead-lettered; every other output is there (exactly once: once)."""
    src = create_topic(kafka_bootstrap)
    out = create_topic(kafka_bootstrap, config={"max.message.bytes": "1000"})
    values = [b"a", b"b", b"BIG", b"d", b"e"]
    fill(log, src, values)
    group = f"g-{src}"
    app = App(log=log, group=group, guarantee=guarantee, session_timeout_ms=6000)

    @app.handler(src, output=out, retries=1, backoff_ms=10)
    def copy(msg: Message, o: Output) -> None:
        o.send(b"x" * 5000 if msg.value == b"BIG" else msg.value)

    stats = app.run(until_idle=4)
    assert stats.stopped_by == "idle"
    outputs = read(log, out, 4)
    if guarantee == "exactly-once":
        assert sorted(outputs) == [b"a", b"b", b"d", b"e"]
    else:
        assert sorted(set(outputs)) == [b"a", b"b", b"d", b"e"]
    assert read(log, f"{src}.dlq", 1) == [b"BIG"]
    assert committed(log, group, src) == len(values)


def test_an_output_over_the_producers_limit_side_by_side_aborts_no_transaction(
    log: Log, kafka_bootstrap: str
) -> None:
    """An output over librdkafka's ``message.max.bytes`` (1,000,000 bytes) is refused at
    ``out.send``, inside the handler: the record's attempt fails, and after its retry it is
    dead-lettered. Before, it was refused only as the held outputs went into the
    transaction, which was aborted with every other record's work in it."""
    src, out = create_topic(kafka_bootstrap), create_topic(kafka_bootstrap)
    values = [b"m%02d" % i for i in range(30)]
    fill(log, src, values)
    group = f"g-{src}"
    app = App(log=log, group=group, guarantee="exactly-once", session_timeout_ms=6000,
              max_poll_records=10)  # fmt: skip
    outcomes: list[str] = []
    app.on_transaction = lambda _label, outcome: outcomes.append(outcome)
    big = {b"m07", b"m17"}

    @app.handler(src, output=out, concurrency=8, retries=1, backoff_ms=10)
    async def copy(msg: Message, o: Output) -> None:
        await asyncio.sleep(0.005)
        o.send(b"x" * 1_000_001 if msg.value in big else msg.value)

    assert app.run(until_idle=4).stopped_by == "idle"
    assert sorted(read(log, out, 28)) == sorted(v for v in values if v not in big)
    assert sorted(read(log, f"{src}.dlq", 2)) == sorted(big)
    assert "aborted" not in outcomes
    assert committed(log, group, src) == len(values)


def test_a_handler_slower_than_the_transaction_timeout_is_aborted_and_redone(
    log: Log, kafka_bootstrap: str
) -> None:
    """``transaction_timeout_ms=2000`` and one handler call of 3 s: before, librdkafka's
    report ("fenced by a newer instance") stopped the App, while no other instance existed.
    Now the timed-out transaction is aborted and its records redone, each output once."""
    src, out = create_topic(kafka_bootstrap), create_topic(kafka_bootstrap)
    fill(log, src, [b"m0", b"m1", b"m2", b"m3"])
    group = f"g-{src}"
    app = App(log=log, group=group, guarantee="exactly-once", transaction_timeout_ms=2000,
              session_timeout_ms=6000, max_poll_records=2)  # fmt: skip
    slept = threading.Event()

    @app.handler(src, output=out)
    def copy(msg: Message, o: Output) -> None:
        if msg.value == b"m1" and not slept.is_set():
            slept.set()
            time.sleep(3)
        o.send(msg.value)

    assert app.run(until_idle=4).stopped_by == "idle"
    assert slept.is_set()
    assert sorted(read(log, out, 4)) == [b"m0", b"m1", b"m2", b"m3"]
    assert committed(log, group, src) == 4


# at-least-once: make test-slow (exactly-once, the stricter, runs in make test)
@pytest.mark.parametrize(
    "guarantee", [pytest.param("at-least-once", marks=pytest.mark.slow), "exactly-once"]
)
def test_a_handler_slower_than_max_poll_interval_rejoins_and_goes_on(
    log: Log, kafka_bootstrap: str, guarantee: Guarantee
) -> None:
    """Before: ``_MAX_POLL_EXCEEDED`` came out of ``poll()`` as a LogError and crashed the App.
    Now the partitions are reported lost (nothing of the lost generation commits), the member
    rejoins, and every record is handled (exactly once: once)."""
    src, out = create_topic(kafka_bootstrap), create_topic(kafka_bootstrap)
    fill(log, src, [b"m0", b"m1", b"m2", b"m3"])
    group = f"g-{src}"
    app = App(log=log, group=group, guarantee=guarantee, session_timeout_ms=1000,
              heartbeat_interval_ms=200, max_poll_interval_ms=1500, max_poll_records=2)  # fmt: skip
    slept = threading.Event()

    @app.handler(src, output=out)
    def copy(msg: Message, o: Output) -> None:
        if msg.value == b"m1" and not slept.is_set():
            slept.set()
            time.sleep(2.5)
        o.send(msg.value)

    assert app.run(until_idle=6).stopped_by == "idle"
    outputs = read(log, out, 4)
    if guarantee == "exactly-once":
        assert sorted(outputs) == [b"m0", b"m1", b"m2", b"m3"]
    else:
        assert sorted(set(outputs)) == [b"m0", b"m1", b"m2", b"m3"]
    assert committed(log, group, src) == 4


def test_an_instance_fenced_through_send_stops_and_commits_nothing(
    log: Log, kafka_bootstrap: str
) -> None:
    """A second instance with the same transactional id: before, the fencing reached the
    runtime from ``produce()`` as a non-fatal error and took the commit-after-error path. Now
    it is fatal and fenced: the instance stops, and nothing it wrote becomes visible."""
    src, out = create_topic(kafka_bootstrap), create_topic(kafka_bootstrap)
    fill(log, src, [f"m{i}".encode() for i in range(20)])
    started, release = threading.Event(), threading.Event()
    txn_id = f"pay-{src}"
    app = App(log=log, group=f"g-{src}", guarantee="exactly-once", transactional_id=txn_id,
              commit_interval_ms=60_000, commit_every=10_000, max_poll_records=1)  # fmt: skip

    @app.handler(src, output=out)
    def copy(msg: Message, o: Output) -> None:
        o.send(msg.value)
        started.set()
        release.wait(10)

    failure: list[BaseException] = []

    def run() -> None:
        try:
            app.run(until_idle=3)
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(30)
    newer = log.producer(transactional_id=txn_id)
    newer.init_transactions()
    release.set()
    thread.join(60)
    newer.close()
    assert failure, "the fenced instance went on"
    assert isinstance(failure[0], ProducerFencedError), repr(failure[0])
    assert read(log, out, 0) == []


def test_a_producer_whose_coordinator_stops_answering_is_replaced(
    log: Log, kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Seen in a soak on an overloaded broker: after a replacement, a transactional producer's
    AddOffsetsToTxn requests stayed queued in librdkafka and were never sent ("TxnCoordinator:
    Timed out 0 in-flight, 0 retry-queued, 1 out-queue"), while aborts went through. Every
    commit timed out after retry_deadline_ms (30 s), past max_poll_interval_ms, so the member
    also lost its partitions each time: 41 aborts in a row, and no progress for half an hour.

    The stuck call is armed for this process's first producer (crashpoints.arm_stuck), from
    its second transaction on. Now a commit gives up within half of max_poll_interval_ms (the
    member keeps its partitions), and the second stall in a row whose abort went through
    replaces the producer; every record's output is there once."""
    src, out = create_topic(kafka_bootstrap), create_topic(kafka_bootstrap)
    values = [f"m{i:02}".encode() for i in range(30)]
    fill(log, src, values)
    group = f"g-{src}"
    app = App(log=log, group=group, guarantee="exactly-once", session_timeout_ms=3000,
              max_poll_interval_ms=4000, max_poll_records=5, commit_every=5)  # fmt: skip

    @app.handler(src, output=out)
    def copy(msg: Message, o: Output) -> None:
        o.send(msg.value)

    crashpoints.arm_stuck("send-offsets@2")
    stats: list[object] = []

    def run() -> None:
        try:
            stats.append(app.run(until_idle=4))
        except Exception as e:
            stats.append(e)

    runner = threading.Thread(target=run, daemon=True)
    with caplog.at_level(logging.INFO, logger="assured"):
        try:
            runner.start()
            runner.join(60)
            if runner.is_alive():
                app.stop()
                runner.join(40)
        finally:
            crashpoints.arm_stuck("")
    assert stats, "the App made no progress for 60 s"
    assert not isinstance(stats[0], Exception), repr(stats[0])
    said = caplog.text
    assert "starting a new one" in said, said[-2000:]
    assert "lost (the group moved on" not in said
    assert sorted(read(log, out, len(values))) == values
    assert committed(log, group, src) == len(values)
