"""At-least-once side by side: each commit names, in its offset metadata, the records handled
above the committed position, and the next owner skips them (issue 14). On both logs."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from assured import App, Message, Output
from assured.log import Log, TopicPartition, open_log
from assured.runtime._completed import MOST, _b36, decode, encode

STUCK = 3  # the record that never finishes in the first run
N = 30


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Log]:
    if request.param == "kafka":
        from tests.conftest import known_topics

        bootstrap = request.getfixturevalue("kafka_bootstrap")
        opened = open_log(f"kafka://{bootstrap}")
        topics = known_topics(opened, bootstrap, 2)
    else:
        opened = open_log(f"embedded://{tmp_path}/log.db")
        topics = ("in", "out")
        with opened.admin() as admin:
            for name in topics:
                admin.create_topic(name, 1)
    opened.topics = topics  # type: ignore[attr-defined]
    with opened.producer() as producer:
        for i in range(N):
            producer.send(topics[0], b"m%02d" % i, key=b"k%d" % i, partition=0)
        producer.flush()
    yield opened
    opened.close()


def first_run(log: Log, group: str, remember: bool) -> list[int]:
    """Record STUCK never finishes; the others do; then a stop gives STUCK up."""
    source, sink = log.topics  # type: ignore[attr-defined]
    app = App(log=log, group=group, guarantee="at-least-once", drain_timeout_ms=300,
              remember_handled=remember)  # fmt: skip
    handled: list[int] = []
    stuck = threading.Event()

    @app.handler(source, output=sink, concurrency=8, ordering="unordered")
    async def copy(msg: Message, out: Output) -> None:
        if msg.offset == STUCK:
            stuck.set()
            await asyncio.sleep(120)
        out.send(msg.value)
        handled.append(msg.offset)

    def stop_when_the_rest_is_done() -> None:
        stuck.wait(30)
        deadline = time.monotonic() + 30
        while len(handled) < N - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a commit interval or more goes by
        app.stop()

    threading.Thread(target=stop_when_the_rest_is_done, daemon=True).start()
    app.run(until_idle=60)
    return handled


def second_run(log: Log, group: str) -> list[int]:
    source, sink = log.topics  # type: ignore[attr-defined]
    app = App(log=log, group=group, guarantee="at-least-once")
    handled: list[int] = []

    @app.handler(source, output=sink, concurrency=8, ordering="unordered")
    async def copy(msg: Message, out: Output) -> None:
        out.send(msg.value)
        handled.append(msg.offset)

    app.run(until_idle=1.0)
    return handled


def outputs(log: Log) -> list[bytes]:
    sink = log.topics[1]  # type: ignore[attr-defined]
    with log.consumer(isolation="read_committed") as consumer:
        consumer.assign([TopicPartition(sink, 0)])
        out: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(out) < N and time.monotonic() < deadline:
            out += [r.value or b"" for r in consumer.poll(timeout=0.3)]
        out += [r.value or b"" for r in consumer.poll(timeout=0.5)]
        return out


def test_records_handled_above_the_committed_position_are_not_handled_again(log: Log) -> None:
    source = log.topics[0]  # type: ignore[attr-defined]
    tp = TopicPartition(source, 0)
    assert sorted(first_run(log, "g", remember=True)) == [o for o in range(N) if o != STUCK]
    with log.consumer(group_id="g") as consumer:
        ((offset, text),) = consumer.committed_metadata([tp]).values()
    assert offset == STUCK  # nothing past the record given up
    assert decode(text, offset) == set(range(STUCK + 1, N))
    assert second_run(log, "g") == [STUCK]  # the 26 above it are skipped
    assert sorted(outputs(log)) == [b"m%02d" % i for i in range(N)]  # each once, none lost


def test_without_it_every_record_above_the_position_is_handled_again(log: Log) -> None:
    first_run(log, "g2", remember=False)
    assert sorted(second_run(log, "g2")) == list(range(STUCK, N))
    assert len(outputs(log)) == N + (N - STUCK - 1)  # the repeats it saves, above


def test_the_metadata_names_exactly_the_offsets_it_was_given_or_the_lowest_that_fit() -> None:
    rng = random.Random(14)
    for _ in range(200):
        position = rng.randrange(0, 10**12)
        handled = {position + rng.randrange(1, 3000) for _ in range(rng.randrange(1, 400))}
        text = encode(position, handled | {position - 1, position})  # at or below: never named
        assert decode(text, position) == handled
        assert decode(text, position + 1) == set()  # written with another position: ignored
    every_other = set(range(101, 10_000, 2))
    text = encode(100, every_other, limit=200)
    kept = decode(text, 100)
    assert len(text) <= 200
    assert kept
    assert kept == set(sorted(every_other)[: len(kept)])  # a prefix of them: the rest runs again
    assert encode(100, []) == encode(100, [99, 100]) == ""
    for foreign in ("", "hello", "a1:100", "a1:100:zz", "a1:100:0.1", "a1:x:1.1", "a1:100:1.5"):
        assert decode(foreign, 100) == set()
    # From a review: a slip that still parses, or a text naming more than a window ever held,
    # must not have records skipped that nobody handled.
    text = encode(100, {101, 102, 103, 110})
    assert decode(text, 100) == {101, 102, 103, 110}
    slipped = text.replace("1.3", "1.4", 1)
    assert slipped != text
    assert decode(slipped, 100) == set()
    body = f"a1:100:1.{_b36(MOST + 1)}"
    assert decode(f"{body}:{_b36(zlib.crc32(body.encode()))}", 100) == set()


def ten_records_and_a_dead_letter_topic(tmp_path: Path) -> Log:
    """An embedded log with "in" (one partition, ten records) and "in.dlq"."""
    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        admin.create_topic("in", 1)
        admin.create_topic("in.dlq", 1)
    with log.producer() as producer:
        for i in range(10):
            producer.send("in", b"v%d" % i, partition=0)
        producer.flush()
    return log


def test_a_dead_letter_whose_delivery_failed_is_sent_again_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a review: at-least-once into a database side by side, a record dead-lettered above a
    slow head counts as done once the step's database commit lands; when the flush before the
    offset commit then reports its dead letter undelivered, the rewind must handle it again (it
    was taken for committed to the database, skipped, and lost). The delivery failure is
    injected: the embedded producer drops the first dead letter and its flush says so."""
    from assured import SqliteSink
    from assured.errors import DeliveryError, RetriableError
    from assured.log.embedded._producer import EmbeddedProducer

    log = ten_records_and_a_dead_letter_topic(tmp_path)
    dropped: list[bool] = []
    send, flush = EmbeddedProducer.send, EmbeddedProducer.flush

    def dropping_send(self: EmbeddedProducer, topic: str, *args: object, **kw: object) -> None:
        if topic == "in.dlq" and not dropped:
            dropped.append(False)  # never written; the next flush reports it
            return
        send(self, topic, *args, **kw)  # type: ignore[arg-type]

    def reporting_flush(self: EmbeddedProducer, timeout: float | None = None) -> int:
        n = flush(self, timeout)
        if dropped and not dropped[-1]:
            dropped[-1] = True
            raise DeliveryError(
                "1 record to 'in.dlq' was not written", 1, (RetriableError("timed out"),)
            )
        return n

    monkeypatch.setattr(EmbeddedProducer, "send", dropping_send)
    monkeypatch.setattr(EmbeddedProducer, "flush", reporting_flush)
    app = App(log=log, group="g", guarantee="at-least-once")
    sink = SqliteSink(tmp_path / "fx.db", schema="CREATE TABLE IF NOT EXISTS t (o INTEGER)")

    @app.handler("in", sink=sink, concurrency=4, ordering="unordered", retries=0)
    async def handle(msg: Message, db: object) -> None:
        if msg.offset == 0:
            await asyncio.sleep(0.5)  # the others finish above it
        if msg.offset == STUCK:
            raise ValueError("a record the handler refuses")
        await db.execute("INSERT INTO t VALUES (?)", (msg.offset,))  # type: ignore[attr-defined]

    app.run(until_idle=1.0)
    monkeypatch.undo()
    assert dropped == [True]  # the failure was injected and reported
    with log.consumer() as consumer:
        consumer.assign([TopicPartition("in.dlq", 0)])
        letters = [r.offset for r in consumer.poll(timeout=1.0)]
    with log.consumer(group_id="g") as consumer:
        assert consumer.committed([TopicPartition("in", 0)]) == {TopicPartition("in", 0): 10}
    assert len(letters) == 1  # sent again after the rewind


@pytest.mark.parametrize("failing", ["a later commit", "its own commit"])
def test_at_most_once_never_handles_a_dead_lettered_record_again_after_a_rewind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """From a review of the test above's fix: a record above a slow head, dead-lettered and
    committed by a group commit, stays done under at-most-once when a later group commit fails
    and the window is rewound (the fix had it handled, and dead-lettered, twice). The failure
    is injected: one group commit after the letter raises the database's retriable error.
    When that commit is the letter's own (the audit at concurrency 200 with db-restart), the
    record is handled again, its effects having rolled back, and its letter goes out once:
    letters wait for their record's commit under at-most-once."""
    from assured import SqliteSink
    from assured.errors import RetriableError
    from assured.runtime._shared_db import SharedTransaction

    log = ten_records_and_a_dead_letter_topic(tmp_path)
    lettered: list[int] = []  # group commits since the letter went out
    failed: list[bool] = []
    commit = SharedTransaction.commit

    async def failing_once(self: SharedTransaction, *args: object, **kw: object) -> None:
        if lettered and lettered[0] >= (1 if failing == "a later commit" else 0) and not failed:
            failed.append(True)
            raise RetriableError("the database went away at a group commit")
        await commit(self, *args, **kw)  # type: ignore[arg-type]
        if lettered:
            lettered[0] += 1

    monkeypatch.setattr(SharedTransaction, "commit", failing_once)
    attempts: Counter[int] = Counter()
    app = App(log=log, group="g", guarantee="at-most-once")
    sink = SqliteSink(tmp_path / "fx.db", schema="CREATE TABLE IF NOT EXISTS t (o INTEGER)")

    @app.handler("in", sink=sink, concurrency=4, ordering="unordered", retries=0)
    async def handle(msg: Message, db: object) -> None:
        attempts[msg.offset] += 1
        if msg.offset == 0 and attempts[0] == 1:
            await asyncio.sleep(1.0)  # the others finish above it
        if msg.offset == STUCK:
            lettered[:] = lettered or [0]
            raise ValueError("a record the handler refuses")
        await db.execute("INSERT INTO t VALUES (?)", (msg.offset,))  # type: ignore[attr-defined]

    app.run(until_idle=1.5)
    monkeypatch.undo()
    assert failed == [True]
    with log.consumer() as consumer:
        consumer.assign([TopicPartition("in.dlq", 0)])
        assert len(consumer.poll(timeout=1.0)) == 1
    assert attempts[STUCK] == (1 if failing == "a later commit" else 2)
