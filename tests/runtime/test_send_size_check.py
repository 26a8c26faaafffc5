"""The size check at ``out.send``, at its edges (from two hostile reviews of it): it never
refuses what the log would take, never makes a topic, follows the producer when the producer
learns a topic again, and leaves headers whole. And a dead letter over its topic's limit,
which can be neither written nor skipped: the App stops, saying which record and which
limits to raise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from assured import App, Message, Output, SqliteSink, open_log
from assured.errors import RecordTooLargeError
from assured.log import Log, Record, TopicPartition
from assured.runtime._handling import HandlerFailedError
from assured.runtime._handling import Output as RawOutput
from assured.runtime._message import BYTES
from assured.runtime._settings import Guarantee
from tests.conftest import read_values as read

BIG = 2_000_000  # over the embedded engine's 1,000,000-byte record limit


@pytest.fixture
def log(tmp_path: Path) -> Log:
    opened = open_log(f"embedded://{tmp_path}/log.db")
    with opened.admin() as admin:
        for topic in ("in", "out", "dlq"):
            admin.create_topic(topic, 1)
    return opened


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_topic_made_after_a_first_send_to_it_is_checked_once_it_is_there(
    log: Log, guarantee: Guarantee
) -> None:
    """The first record sends to ``late`` before it exists (refused as the outputs go out);
    then ``late`` is made, and the second record sends a small output and an oversized one to
    it. A limit not known at the first send was kept as none for good: the oversized output
    went out with the attempt (at least once the small one stayed out; exactly once the
    transaction was aborted). Now it is refused at send: every attempt fails there, nothing of
    them goes out."""
    with log.producer() as producer:
        for value in (b"first", b"second"):
            producer.send("in", value)
        producer.flush()
    app = App(log=log, group="g", guarantee=guarantee, max_poll_records=1, commit_interval_ms=20)
    attempts: dict[bytes, int] = {}

    @app.handler("in", output="out", retries=2, backoff_ms=1, dead_letter="dlq")
    def body(msg: Message, out: Output) -> None:
        attempts[msg.value] = attempts.get(msg.value, 0) + 1
        if msg.value == b"first":
            out.send(b"x", topic="late")
            return
        with log.admin() as admin:
            if "late" not in admin.list_topics():
                admin.create_topic("late", 1)
        out.send(b"part-of-second")
        out.send(b"x" * BIG, topic="late")

    app.run(until_idle=0.5)
    assert attempts[b"second"] == 3
    assert read(log, "out") == []
    assert sorted(read(log, "dlq")) == [b"first", b"second"]


def test_the_check_never_makes_a_topic(tmp_path: Path) -> None:
    """With topics made on first use, a send whose attempt then fails (nothing goes out) made
    its topic, from the check, before anything was sent to it."""
    log = open_log(f"embedded://{tmp_path}/log.db?auto_create_topics=true")
    with log.admin() as admin:
        for topic in ("in", "out", "dlq"):
            admin.create_topic(topic, 1)
    with log.producer() as producer:
        producer.send("in", b"m")
        producer.flush()
    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", output="out", retries=0, dead_letter="dlq")
    def body(msg: Message, out: Output) -> None:
        out.send(b"x", topic="tenant-42")
        raise ValueError("invalid, found after the send: nothing of this attempt goes out")

    app.run(until_idle=0.5)
    with log.admin() as admin:
        assert "tenant-42" not in admin.list_topics()
    assert read(log, "dlq") == [b"m"]


def test_the_check_follows_the_producer_when_it_learns_a_topic_again(tmp_path: Path) -> None:
    """A topic made again, with a higher limit, while an Output had the old one: once its
    producer knows the new limit, the Output refuses no record the producer takes."""
    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        admin.create_topic("t", 1, {"max.message.bytes": "200"})
    producer = log.producer()
    out = RawOutput(producer, "t", BYTES, BYTES)
    with out._attempting():
        out.send(b"a")
        with pytest.raises(RecordTooLargeError, match="limit of 200 bytes"):
            out.send(b"x" * 500)
    out._discard()
    with log.admin() as admin:
        admin.delete_topic("t")
        admin.create_topic("t", 2, {"max.message.bytes": "10000"})
    producer.send("t", b"b", partition=1)  # the producer learns the topic again
    assert producer.max_record_bytes("t") == 10_000
    with out._attempting():
        out.send(b"x" * 500)  # taken, as the producer takes it
        with pytest.raises(RecordTooLargeError, match="limit of 10000 bytes"):
            out.send(b"x" * 20_000)
    producer.flush()
    producer.close()


def test_on_kafka_header_names_as_bytes_are_taken_and_the_limit_is_the_clients() -> None:
    """confluent-kafka takes header names as bytes: the check counted names with ``encode``,
    and every such send failed with an AttributeError. No broker is needed: nothing is sent
    beyond the client's queue."""
    log = open_log("kafka://127.0.0.1:1")
    producer = log.producer(idempotent=False, config={"socket.timeout.ms": 100})
    small = log.producer(idempotent=False, config={"message.max.bytes": "5000"})
    try:
        assert producer.max_record_bytes("t") == 1_000_000  # librdkafka's default
        assert small.max_record_bytes("t") == 5000
        out = RawOutput(small, "t", BYTES, BYTES)
        with out._attempting():
            out.send(b"value", headers=[(b"trace-id", b"abc")])  # type: ignore[list-item]
            with pytest.raises(RecordTooLargeError, match="limit of 5000 bytes"):
                out.send(b"x" * 4990, headers=[(b"trace-id", b"abc")])  # type: ignore[list-item]
        out._discard()
    finally:
        producer.close()
        small.close()


@pytest.mark.parametrize(
    ("guarantee", "concurrency"),
    [("at-least-once", 0), ("exactly-once", 0), ("exactly-once", 4), ("at-least-once", 4)],
)
def test_a_dead_letter_over_the_limit_stops_the_app_saying_what_to_raise(
    log: Log, guarantee: Guarantee, concurrency: int
) -> None:
    """An input just under the limit whose handler fails: its dead letter (the record and its
    error headers) is over the dead-letter topic's limit. It can be neither handled nor set
    aside: the App stops, naming the record and the limit to raise (before, the log's own
    words about 'a record of 1000111 bytes for topic dlq' were all it said), and nothing past
    the record is committed."""
    with log.producer() as producer:
        for value in (b"ok", b"v" * 999_950, b"ok2"):
            producer.send("in", value)
        producer.flush()
    app = App(log=log, group="g", guarantee=guarantee, max_poll_records=10)

    def body(msg: Message) -> None:
        if len(msg.value or b"") > 100:
            raise ValueError("no such account")

    async def body_async(msg: Message) -> None:
        body(msg)

    app.handler("in", retries=0, dead_letter="dlq", concurrency=max(1, concurrency))(
        body_async if concurrency else body
    )
    with pytest.raises(HandlerFailedError) as stopped:
        app.run(until_idle=0.5)
    said = str(stopped.value)
    assert "the dead letter of in[0]@1" in said, said
    assert "'dlq'" in said
    assert "max.message.bytes" in said
    assert read(log, "dlq") == []
    with log.admin() as admin:
        assert admin.committed_offsets("g", ["in"]).get(TopicPartition("in", 0), 0) <= 1


@pytest.mark.parametrize("concurrency", [1, 4])
def test_at_most_once_into_a_database_a_dead_letter_over_the_limit_says_so_too(
    tmp_path: Path, concurrency: int
) -> None:
    """From the second review: at most once into a database, dead letters go out once the
    record's commit landed, and that send still stopped the App with the log's bare words."""
    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        admin.create_topic("in", 1)
        admin.create_topic("dlq", 1, {"max.message.bytes": "300"})
    with log.producer() as producer:
        producer.send("in", b"F" + b"x" * 250)
        producer.flush()
    app = App(log=log, group="g", guarantee="at-most-once")

    @app.handler("in", sink=SqliteSink(str(tmp_path / "effects.db")), retries=0,
                 dead_letter="dlq", concurrency=concurrency)  # fmt: skip
    async def body(msg: Message, db: Any) -> None:
        raise ValueError("no such account")

    with pytest.raises(HandlerFailedError, match=r"the dead letter of in\[0\]@0") as stopped:
        app.run(until_idle=0.5)
    assert "it is lost" in str(stopped.value)


def test_headers_given_as_an_iterator_go_out_whole(log: Log) -> None:
    """From the second review: headers given as an iterator (``zip``, a generator) were used
    up by the size check, and the record went out without them."""
    producer = log.producer()
    out = RawOutput(producer, "out", BYTES, BYTES)
    with out._attempting():
        out.send(b"v", headers=zip(["trace"], [b"abc"], strict=True))  # type: ignore[arg-type]
    out._release(_record())
    producer.flush()
    producer.close()
    with log.consumer() as consumer:
        consumer.assign([TopicPartition("out", 0)])
        (record,) = consumer.poll(timeout=0.5)
    assert list(record.headers) == [("trace", b"abc")]


def _record() -> Record:
    return Record("in", 0, 0, 0, None, b"v")
