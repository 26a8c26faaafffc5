"""Review 13's holes in typed messages, dead letters, the idle rule and ``App.configure``. Each
test failed on the code before its fix (the docstring says what that code did)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from assured import App, DecodeError, Message, Record, TopicPartition, open_log
from assured.errors import RetriableError, UsageError
from assured.log import Admin, Consumer, Log, Producer
from assured.log._models import GroupDescription, Isolation, TopicDescription, Watermarks
from assured.runtime import HandlerFailedError
from assured.runtime._settings import Guarantee

GUARANTEES: list[Guarantee] = ["at-most-once", "at-least-once", "exactly-once"]
REDO_GUARANTEES: list[Guarantee] = ["at-least-once", "exactly-once"]


@pytest.fixture
def log(tmp_path: Path) -> Log:
    opened = open_log(f"embedded://{tmp_path}/log.db")
    with opened.admin() as admin:
        admin.create_topic("in", 1)
    return opened


def fill(log: Log, values: Iterable[bytes], topic: str = "in", partitions: int = 1) -> None:
    with log.producer() as producer:
        for i, v in enumerate(values):
            producer.send(topic, v, partition=i % partitions)
        producer.flush()


def read(log: Log, topic: str) -> list[Record]:
    """Every committed record of partition 0 of ``topic``."""
    tp = TopicPartition(topic, 0)
    out: list[Record] = []
    with log.consumer(isolation="read_committed") as consumer, log.admin() as admin:
        consumer.assign([tp])
        deadline = time.monotonic() + 20
        while consumer.position(tp) < admin.watermarks(tp).lso and time.monotonic() < deadline:
            out += consumer.poll(timeout=0.2)
    return out


def committed(log: Log, group: str = "g") -> int:
    with log.admin() as admin:
        return sum(admin.committed_offsets(group, ["in"]).values())


# -- H1: an error whose str() or repr() raises ----------------------------------------------------


class PaymentError(Exception):
    """A user's error that forgets ``super().__init__`` and prints a missing attribute."""

    def __init__(self, code: int):
        self.code = code

    def __str__(self) -> str:
        return f"payment failed: {self.detail}"  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"PaymentError({self.detail})"  # type: ignore[attr-defined]


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_an_error_that_cannot_be_printed_is_still_dead_lettered(
    log: Log, guarantee: Guarantee, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the dead-letter log line called str(error) before the dead letter was sent; the
    run raised AttributeError, and at most once 'c' was committed unhandled, 'b' lost."""
    fill(log, [b"a", b"b", b"c"])
    app = App(log=log, group="g", guarantee=guarantee)
    seen: list[bytes] = []

    @app.handler("in", retries=1, backoff_ms=1)
    def handle(msg: Message) -> None:
        seen.append(msg.value)
        if msg.value == b"b":
            raise PaymentError(42)

    with caplog.at_level(logging.WARNING, logger="assured.runtime"):
        app.run(until_idle=0.2)

    assert seen == [b"a", b"b", b"b", b"c"]
    (dead,) = read(log, "in.dlq")
    assert (dead.value, dead.header("assured.error.type")) == (b"b", b"PaymentError")
    assert dead.header("assured.attempts") == b"2"
    assert committed(log) == 3
    (line,) = [r for r in caplog.records if r.getMessage().startswith("dead letter:")]
    assert "PaymentError" in line.getMessage()
    assert getattr(line, "error", "").startswith("PaymentError")


def test_without_a_dead_letter_topic_an_unprintable_error_stops_the_app_as_any_other(
    log: Log,
) -> None:
    """Before: the stop's message used repr(error), so a raising __repr__ replaced the
    HandlerFailedError with the user's AttributeError."""
    fill(log, [b"a"])
    app = App(log=log, group="g")

    @app.handler("in", retries=0, dead_letter=False)
    def handle(msg: Message) -> None:
        raise PaymentError(7)

    with pytest.raises(HandlerFailedError, match="failed 1 time") as raised:
        app.run(until_idle=0.2)
    assert "PaymentError" in str(raised.value)
    assert isinstance(raised.value.__cause__, PaymentError)
    assert committed(log) == 0


class GarbledError(ValueError):
    def __str__(self) -> str:
        raise RuntimeError("no text for this one")


class GarblingCodec:
    def encode(self, value: Any) -> bytes:
        return bytes(value)

    def decode(self, data: bytes) -> Any:
        raise GarbledError()


def test_a_decode_failure_that_cannot_be_printed_is_still_dead_lettered(log: Log) -> None:
    """Before: decode_failed formatted the codec's error eagerly: the run raised RuntimeError."""
    fill(log, [b"x"])
    app = App(log=log, group="g")

    @app.handler("in", value_codec=GarblingCodec())
    def handle(msg: Message) -> None:
        raise AssertionError("never called: nothing decodes")

    app.run(until_idle=0.2)
    (dead,) = read(log, "in.dlq")
    assert dead.header("assured.error.type") == b"DecodeError"
    assert b"GarbledError" in (dead.header("assured.error.message") or b"")
    assert committed(log) == 1


# -- H2: what a codec raises that is not a decode failure ----------------------------------------


class FlakyRegistryCodec:
    """Decodes UTF-8 after a schema-registry lookup that fails the first ``failures`` times."""

    def __init__(self, error: type[Exception], failures: int = 1):
        self.error = error
        self.failures = failures
        self.calls = 0

    def encode(self, value: Any) -> bytes:
        return str(value).encode()

    def decode(self, data: bytes) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error("schema registry unreachable")
        return data.decode()


@pytest.mark.parametrize("guarantee", REDO_GUARANTEES)
@pytest.mark.parametrize("error", [ConnectionError, RetriableError])
def test_a_codec_failing_for_a_moment_is_retried_not_dead_lettered(
    log: Log, guarantee: Guarantee, error: type[Exception]
) -> None:
    """Before: every error of a codec became a DecodeError, dead-lettered at once. Now a
    ConnectionError is retried as a handler's error would be, and the log's own RetriableError
    goes to the protocol, which redoes the batch."""
    fill(log, [b"a", b"b"])
    app = App(log=log, group="g", guarantee=guarantee)
    seen: list[str] = []

    @app.handler("in", value_codec=FlakyRegistryCodec(error), retries=3, backoff_ms=1)
    def handle(msg: Message) -> None:
        seen.append(msg.value)

    app.run(until_idle=0.2)
    assert seen == ["a", "b"]
    assert read(log, "in.dlq") == []
    assert committed(log) == 2


def test_a_codec_that_stays_unreachable_is_retried_then_dead_lettered_as_what_it_raised(
    log: Log,
) -> None:
    fill(log, [b"a"])
    app = App(log=log, group="g")

    @app.handler("in", value_codec=FlakyRegistryCodec(ConnectionError, 99), retries=2, backoff_ms=1)
    def handle(msg: Message) -> None:
        raise AssertionError("never called: the codec never answers")

    app.run(until_idle=0.2)
    (dead,) = read(log, "in.dlq")
    assert dead.header("assured.error.type") == b"ConnectionError"
    assert dead.header("assured.attempts") == b"3"


class RefusingCodec:
    """A codec that says itself that a record is not what it expects."""

    def encode(self, value: Any) -> bytes:
        return bytes(value)

    def decode(self, data: bytes) -> Any:
        raise DecodeError("not a frame of version 2", None)  # type: ignore[arg-type]


def test_a_codec_raising_decode_error_itself_is_dead_lettered_at_once(log: Log) -> None:
    fill(log, [b"a"])
    app = App(log=log, group="g")

    @app.handler("in", value_codec=RefusingCodec(), retries=3, backoff_ms=1)
    def handle(msg: Message) -> None:
        raise AssertionError("never called")

    app.run(until_idle=0.2)
    (dead,) = read(log, "in.dlq")
    assert (dead.header("assured.error.type"), dead.header("assured.attempts")) == (
        b"DecodeError",
        b"1",
    )
    assert b"not a frame of version 2" in (dead.header("assured.error.message") or b"")


# -- H3: a DecodeError raised by the handler -----------------------------------------------------


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_decode_error_raised_by_the_handler_is_retried(log: Log, guarantee: Guarantee) -> None:
    """Before: any DecodeError skipped the retries, though the input decoded fine and only the
    handler's own parsing (of something it fetched) failed, once."""
    fill(log, [b'{"x": 1}'])
    app = App(log=log, group="g", guarantee=guarantee)
    calls: list[int] = []

    @app.handler("in", value_codec="json", retries=3, backoff_ms=1)
    def handle(msg: Message) -> None:
        calls.append(msg.value["x"])
        if len(calls) == 1:
            raise DecodeError("the enrichment payload is not ready", msg.record)

    app.run(until_idle=0.2)
    assert calls == [1, 1]
    assert read(log, "in.dlq") == []


def test_a_handler_decode_error_that_persists_is_dead_lettered_after_its_retries(
    log: Log,
) -> None:
    fill(log, [b"1"])
    app = App(log=log, group="g")

    @app.handler("in", value_codec="json", retries=2, backoff_ms=1)
    def handle(msg: Message) -> None:
        raise DecodeError("the enrichment payload is never ready", msg.record)

    app.run(until_idle=0.2)
    (dead,) = read(log, "in.dlq")
    assert (dead.header("assured.error.type"), dead.header("assured.attempts")) == (
        b"DecodeError",
        b"3",
    )


# -- H4: inputs in decode failures ---------------------------------------------------------------


class Login(BaseModel):
    model_config = ConfigDict(hide_input_in_errors=True)
    user: str
    api_key: SecretStr = Field(min_length=32)


def test_a_decode_failure_names_the_field_and_never_shows_its_input(
    log: Log, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: '(got 'sk-live-...')' in a WARNING line and in the dead letter's headers, though
    the model hides inputs in its errors and the field is a SecretStr."""
    fill(log, [b'{"user": "ann", "api_key": "sk-live-HUNTER2-short"}'])
    app = App(log=log, group="g")

    @app.handler("in", value_codec=Login)
    def handle(msg: Message[Login]) -> None:
        raise AssertionError("never called")

    with caplog.at_level(logging.DEBUG):
        app.run(until_idle=0.2)
    (dead,) = read(log, "in.dlq")
    message = (dead.header("assured.error.message") or b"").decode()
    assert "does not validate as Login: api_key: Value should have at least 32" in message
    assert "HUNTER2" not in message
    assert "HUNTER2" not in caplog.text
    assert all("HUNTER2" not in str(vars(r)) for r in caplog.records)


# -- H5: the idle check while records flow -------------------------------------------------------


class CountingAdmin(Admin):
    """A real admin that counts the questions about where partitions end."""

    def __init__(self, inner: Admin, asked: list[list[TopicPartition]]):
        self.inner = inner
        self.asked = asked

    def watermarks(self, tp: TopicPartition) -> Watermarks:
        self.asked.append([tp])
        return self.inner.watermarks(tp)

    def end_offsets(
        self, partitions: Sequence[TopicPartition], isolation: Isolation = "read_committed"
    ) -> dict[TopicPartition, int]:
        self.asked.append(list(partitions))
        return self.inner.end_offsets(partitions, isolation)

    def create_topic(
        self, name: str, partitions: int = 1, config: Mapping[str, str] | None = None
    ) -> None:
        self.inner.create_topic(name, partitions, config)

    def delete_topic(self, name: str) -> None:
        self.inner.delete_topic(name)

    def list_topics(self) -> list[str]:
        return self.inner.list_topics()

    def describe_topic(self, name: str) -> TopicDescription:
        return self.inner.describe_topic(name)

    def list_groups(self) -> list[str]:
        return self.inner.list_groups()

    def describe_group(self, group_id: str) -> GroupDescription:
        return self.inner.describe_group(group_id)

    def committed_offsets(
        self, group_id: str, topics: Iterable[str] | None = None, *, stable: bool = False
    ) -> dict[TopicPartition, int]:
        return self.inner.committed_offsets(group_id, topics, stable=stable)

    def close(self) -> None:
        self.inner.close()


class CountingLog(Log):
    """The embedded log, its admins counting."""

    def __init__(self, inner: Log):
        self.inner = inner
        self.url = inner.url
        self.asked: list[list[TopicPartition]] = []

    def admin(self) -> Admin:
        return CountingAdmin(self.inner.admin(), self.asked)

    def producer(self, **options: Any) -> Producer:
        return self.inner.producer(**options)

    def consumer(self, **options: Any) -> Consumer:
        return self.inner.consumer(**options)

    def close(self) -> None:
        self.inner.close()


def test_while_full_batches_flow_the_idle_check_asks_the_log_nothing(tmp_path: Path) -> None:
    """Before: ``until_idle`` asked for every assigned partition's end, one request each,
    after every batch at most 0.5 s apart, even right after a full poll (on Kafka, 7.0 s of a
    7.4 s run with 256 partitions). Now a full batch means records are waiting: no question;
    once a poll comes back short, one question covers every partition."""
    inner = open_log(f"embedded://{tmp_path}/log.db")
    with inner.admin() as admin:
        admin.create_topic("in", 4)
    n, batch = 400, 20
    fill(inner, [b"%d" % i for i in range(n)], partitions=4)
    log = CountingLog(inner)
    app = App(log=log, group="g", max_poll_records=batch)
    asked_before: list[int] = []

    @app.handler("in")
    def handle(msg: Message) -> None:
        asked_before.append(len(log.asked))

    stats = app.run(until_idle=0.1)
    assert (stats.processed, stats.stopped_by) == (n, "idle")
    assert asked_before[-1] == 0, "no end asked while full batches came"
    assert log.asked, "idle was decided by asking where the partitions end"
    assert all(len(tps) == 4 for tps in log.asked), "every partition in one question"


# -- H6: configure() while running; a Log object -------------------------------------------------


def test_configure_is_refused_while_running_and_takes_a_log_object(
    log: Log, tmp_path: Path
) -> None:
    """Before: configure() during run() was accepted (the loop kept the old settings while
    app.guarantee and app.metrics told of new ones), and configure(log=<Log>) was refused."""
    fill(log, [b"a"])
    app = App(log=log, group="g", guarantee="exactly-once")
    refused: list[Exception] = []

    @app.handler("in")
    def handle(msg: Message) -> None:
        try:
            app.configure(guarantee="at-most-once", group="other")
        except UsageError as e:
            refused.append(e)

    metrics = app.metrics
    app.run(until_idle=0.2)
    (refusal,) = refused
    assert "while run() is going" in str(refusal)
    assert (app.guarantee, app.settings.group, app.metrics) == ("exactly-once", "g", metrics)

    other = open_log(f"embedded://{tmp_path}/other.db")
    with other.admin() as admin:
        admin.create_topic("in", 1)
    fill(other, [b"x", b"y"])
    app.configure(log=other, group="h")  # not running: accepted, a Log object as App() takes
    assert app.run(until_idle=0.2).processed == 2
    assert committed(other, "h") == 2
