"""The App in-process: settings, codecs, retries and dead letters, stopping points, metrics,
fencing."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pytest

from assured import App, Message, Output, TopicPartition, open_log
from assured.errors import ConfigError, ProducerFencedError, UnknownTopicError
from assured.log import Log
from assured.runtime import HandlerFailedError
from assured.runtime._settings import AppSettings
from assured.testing._net import free_ports


@pytest.fixture
def log(tmp_path: Path) -> Log:
    opened = open_log(f"embedded://{tmp_path}/log.db")
    with opened.admin() as admin:
        admin.create_topic("in", 2)
        admin.create_topic("out", 2)
    return opened


def fill(log: Log, values: list[bytes], topic: str = "in") -> None:
    with log.producer() as producer:
        for i, v in enumerate(values):
            producer.send(topic, v, key=f"k{i % 3}".encode())
        producer.flush()


def read(log: Log, topic: str) -> list[bytes | None]:
    with log.consumer() as consumer:
        n = 2 if topic in ("in", "out") else 1
        consumer.assign([TopicPartition(topic, p) for p in range(n)])
        out = []
        while batch := consumer.poll(timeout=0.3):
            out += [r.value for r in batch]
        return out


def test_settings_come_from_arguments_then_environment_then_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "assured.toml"
    file.write_text('group = "from-file"\ncommit_every = 7\nguarantee = "at-most-once"\n')
    monkeypatch.setenv("ASSURED_GUARANTEE", "exactly_once")
    s = AppSettings(config_file=str(file), commit_interval_ms=5)
    assert (s.group, s.commit_every, s.guarantee, s.commit_interval_ms) == (
        "from-file",
        7,
        "exactly-once",
        5,
    )
    with pytest.raises(ConfigError, match="guarantee"):
        App(log="embedded:///tmp/x.db", guarantee="twice")  # type: ignore[arg-type]


def test_json_codec_and_output(log: Log) -> None:
    fill(log, [json.dumps({"cents": c}).encode() for c in (100, 250)])
    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", output="out", value_codec="json")
    def double(msg: Message, out: Output) -> None:
        out.send({"cents": msg.value["cents"] * 2}, key=msg.key)

    stats = app.run(until_idle=0.5)
    assert stats.processed == 2
    assert sorted(json.loads(v or b"")["cents"] for v in read(log, "out")) == [200, 500]


def test_failing_handler_is_retried_then_dead_lettered_with_the_error(log: Log) -> None:
    fill(log, [b"ok-1", b"poison", b"ok-2"])
    app = App(log=log, group="g", guarantee="at-least-once")
    calls: dict[bytes, int] = {}

    @app.handler("in", output="out", retries=2, backoff_ms=1)
    def handle(msg: Message, out: Output) -> None:
        calls[msg.value] = calls.get(msg.value, 0) + 1
        if msg.value == b"poison":
            raise ValueError("cannot charge a poison card")
        out.send(msg.value)

    app.run(until_idle=0.5)
    assert calls[b"poison"] == 3
    assert sorted(v or b"" for v in read(log, "out")) == [b"ok-1", b"ok-2"]
    with log.consumer() as consumer:
        consumer.assign([TopicPartition("in.dlq", 0)])
        (dead,) = consumer.poll(timeout=1)
    assert dead.value == b"poison"
    assert dead.header("assured.error.type") == b"ValueError"
    assert b"cannot charge a poison card" in (dead.header("assured.error.message") or b"")
    assert dead.header("assured.attempts") == b"3"
    assert (
        app.metrics.registry.get_sample_value(
            "assured_dead_lettered_total", {"guarantee": "at-least-once", "topic": "in"}
        )
        == 1.0
    )
    with log.admin() as admin:
        assert sum(lag.lag for lag in admin.lag("g", ["in"])) == 0, "the partition moved on"


@pytest.mark.parametrize("is_async", [False, True])
def test_a_conflict_with_another_transaction_keeps_the_records_retries(
    log: Log, monkeypatch: pytest.MonkeyPatch, is_async: bool
) -> None:
    """A statement the database failed for a conflict with another transaction (a deadlock,
    a serialization failure: SQLSTATE 40P01, 40001) is no fault of the record's: it is done
    again without spending a retry, up to CONFLICT_RETRIES times; beyond them, conflicts
    count as failures (retried, then dead-lettered) so that no record conflicts for ever.
    (Real deadlocks between records: tests/sinks/test_side_by_side_connections.py.)"""
    import psycopg

    from assured.runtime import _concurrent, _handling

    monkeypatch.setattr(_handling, "CONFLICT_RETRIES", 4)
    monkeypatch.setattr(_concurrent, "CONFLICT_RETRIES", 4)
    fill(log, [b"busy", b"stuck", b"plain"])
    app = App(log=log, group="g", guarantee="at-least-once")
    calls: dict[bytes, int] = {}

    def work(msg: Message, out: Output) -> None:
        calls[msg.value] = n = calls.get(msg.value, 0) + 1
        if msg.value == b"busy" and n <= 4:  # four conflicts, then through
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        if msg.value == b"stuck":  # conflicts every time
            raise psycopg.errors.SerializationFailure("could not serialize access")
        out.send(msg.value)

    async def work_async(msg: Message, out: Output) -> None:
        work(msg, out)

    app.handler("in", output="out", retries=1, backoff_ms=1, concurrency=2 if is_async else 1)(
        work_async if is_async else work
    )
    app.run(until_idle=0.5)
    assert calls == {b"busy": 5, b"stuck": 4 + 2, b"plain": 1}
    assert sorted(v or b"" for v in read(log, "out")) == [b"busy", b"plain"]
    with log.consumer() as consumer:
        consumer.assign([TopicPartition("in.dlq", 0)])
        (dead,) = consumer.poll(timeout=1)
    assert dead.value == b"stuck"
    assert dead.header("assured.error.type") == b"SerializationFailure"
    assert dead.header("assured.attempts") == b"6"


def test_without_a_dead_letter_topic_the_app_stops_and_commits_nothing_past_it(log: Log) -> None:
    fill(log, [b"poison"])
    app = App(log=log, group="g", guarantee="at-least-once")

    @app.handler("in", retries=0, dead_letter=False)
    def handle(msg: Message) -> None:
        raise RuntimeError("boom")

    with pytest.raises(HandlerFailedError, match="handled again on restart"):
        app.run(until_idle=0.5)
    with log.admin() as admin:
        assert sum(lag.lag for lag in admin.lag("g", ["in"])) == 1


def test_max_messages_handles_exactly_that_many(log: Log) -> None:
    fill(log, [f"{i}".encode() for i in range(50)])
    app = App(log=log, group="g", guarantee="at-least-once", max_poll_records=500)
    seen: list[bytes] = []

    @app.handler("in")
    def handle(msg: Message) -> None:
        seen.append(msg.value)

    assert app.run(max_messages=20).processed == 20
    assert len(seen) == 20
    assert app.run(until_idle=0.5).processed == 30
    assert sorted(seen, key=int) == [f"{i}".encode() for i in range(50)]


def test_unknown_topic_and_missing_handler_are_clear(log: Log) -> None:
    app = App(log=log, group="g")
    with pytest.raises(ConfigError, match="no handlers"):
        app.run()

    @app.handler("nope")
    def handle(msg: Message) -> None: ...

    with pytest.raises(UnknownTopicError, match="assured topic create nope"):
        app.run(until_idle=0.1)


def test_metrics_are_served(log: Log) -> None:
    fill(log, [b"a", b"b"])
    (port,) = free_ports(1)
    app = App(log=log, group="g", guarantee="at-least-once", metrics_port=port)

    @app.handler("in")
    def handle(msg: Message) -> None: ...

    app.run(until_idle=0.3)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'assured_processed_total{guarantee="at-least-once",topic="in"} 2.0' in text
    assert "assured_commit_seconds_bucket" in text


def test_a_fenced_instance_stops(log: Log) -> None:
    fill(log, [f"{i}".encode() for i in range(10)])
    started = threading.Event()
    release = threading.Event()

    zombie = App(log=log, group="g", guarantee="exactly-once", transactional_id="pay-0",
                 commit_interval_ms=60_000, commit_every=10_000)  # fmt: skip

    @zombie.handler("in", output="out")
    def slow(msg: Message, out: Output) -> None:
        out.send(msg.value)
        started.set()
        release.wait(10)

    failure: list[BaseException] = []

    def run_zombie() -> None:
        try:
            zombie.run(until_idle=1)
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=run_zombie)
    thread.start()
    assert started.wait(10)
    # A newer instance with the same transactional id fences the zombie's producer.
    log.producer(transactional_id="pay-0").init_transactions()
    release.set()
    thread.join(30)
    assert failure
    assert isinstance(failure[0], ProducerFencedError)
    assert read(log, "out") == [], "nothing the zombie wrote became visible"


def test_a_stop_asked_before_the_run_is_not_lost(log: Log) -> None:
    """From a review: run() cleared the stop as it began, so a stop() asked while it started
    (a signal, asyncio.to_thread(app.run) cancelled at once) was erased, and the App ran on
    until a second one. A stop asked before the run now ends it at once; the next run goes."""
    fill(log, [b"a", b"b", b"c"])
    app = App(log=log, group="g", guarantee="at-least-once")
    seen: list[bytes] = []

    @app.handler("in")
    def handle(msg: Message) -> None:
        seen.append(msg.value)

    app.stop()
    stats = app.run(until_idle=30)
    assert stats.stopped_by == "stop"
    assert seen == []
    assert app.run(until_idle=0.3).processed == 3  # the stop was taken back with its run
    assert sorted(seen) == [b"a", b"b", b"c"]
