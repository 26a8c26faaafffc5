"""Async handlers and records handled side by side (issue 14), on the embedded engine: each
guarantee keeps its meaning, lanes keep their order, in-flight work stays within its bound."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from assured import App, Message, Output, PostgresSink, SqliteSink, TopicPartition, open_log
from assured.errors import (
    ConfigError,
    FatalError,
    RecordTooLargeError,
    RetriableError,
    UsageError,
)
from assured.log import Log
from assured.runtime import _shared_db
from assured.runtime._handling import AwaitableIntoSinkError
from assured.runtime._settings import Guarantee
from assured.runtime._shared_db import HeldPastLimitError, NotAwaitedError
from tests.conftest import fill_keyed as fill
from tests.conftest import stop_when

GUARANTEES: list[Guarantee] = ["at-most-once", "at-least-once", "exactly-once"]


@pytest.fixture
def log(tmp_path: Path) -> Log:
    opened = open_log(f"embedded://{tmp_path}/log.db")
    with opened.admin() as admin:
        admin.create_topic("in", 2)
        admin.create_topic("out", 1)
    return opened


def read(log: Log, topic: str = "out") -> list[tuple[bytes | None, bytes | None]]:
    with log.consumer(isolation="read_committed") as consumer:
        consumer.assign([TopicPartition(topic, 0)])
        out: list[tuple[bytes | None, bytes | None]] = []
        while batch := consumer.poll(timeout=0.3):
            out += [(r.key, r.value) for r in batch]
        return out


def committed(log: Log, group: str = "g") -> dict[int, int]:
    with log.admin() as admin:
        found = admin.committed_offsets(group, ["in"])
    return {tp.partition: offset for tp, offset in found.items()}


class InFlight:
    """How many calls overlap, overall and per lane; and the order each lane saw."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now: Counter[Any] = Counter()
        self.most: Counter[Any] = Counter()
        self.seen: dict[Any, list[int]] = {}

    def enter(self, lane: Any, offset: int) -> None:
        with self.lock:
            for k in ("all", lane):
                self.now[k] += 1
                self.most[k] = max(self.most[k], self.now[k])
            self.seen.setdefault(lane, []).append(offset)

    def leave(self, lane: Any) -> None:
        with self.lock:
            self.now["all"] -= 1
            self.now[lane] -= 1


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_an_async_handler_is_awaited_under_every_guarantee(log: Log, guarantee: Guarantee) -> None:
    values = fill(log, 40)
    app = App(log=log, group="g", guarantee=guarantee)

    @app.handler("in", output="out")
    async def copy(msg: Message, out: Output) -> None:
        await asyncio.sleep(0.001)
        out.send(msg.value, key=msg.key)

    stats = app.run(until_idle=0.5)
    assert stats.processed == 40
    assert sorted(v or b"" for _, v in read(log)) == values
    assert committed(log) == {0: 20, 1: 20}


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_an_async_handler_into_a_database_awaits_its_db_at_concurrency_1(
    log: Log, tmp_path: Path, guarantee: Guarantee
) -> None:
    """One way to write an async def into a sink, whatever its concurrency: its db calls are
    awaited (they had been plain calls at concurrency 1, and ``await db.execute`` failed)."""
    fill(log, 30)
    sink = SqliteSink(str(tmp_path / "effects.db"))
    app = App(log=log, group="g", guarantee=guarantee)

    @app.handler("in", sink=sink)
    async def charge(msg: Message, db: Any) -> None:
        await asyncio.sleep(0.001)
        await db.execute("CREATE TABLE IF NOT EXISTS charges (v TEXT)")
        if await db.first_delivery(msg):
            await db.execute("INSERT INTO charges VALUES (?)", (msg.value.decode(),))

    assert app.run(until_idle=0.5).processed == 30
    with sqlite3.connect(tmp_path / "effects.db") as db:
        rows = [r[0] for r in db.execute("SELECT v FROM charges")]
    assert sorted(rows) == [f"m{i:04d}" for i in range(30)]
    assert committed(log) == {0: 15, 1: 15}


def test_an_async_handler_at_concurrency_1_that_forgets_await_stops_the_app(
    log: Log, tmp_path: Path
) -> None:
    fill(log, 4)
    sink = SqliteSink(str(tmp_path / "effects.db"))
    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", sink=sink)
    async def charge(msg: Message, db: Any) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS charges (v TEXT)")  # never runs: not awaited

    with pytest.raises(NotAwaitedError, match=r"await db\.execute"):
        app.run(until_idle=0.5)
    assert committed(log) == {}


def test_at_most_once_an_async_def_into_a_sink_commits_no_further_ahead_than_a_poll(
    log: Log, tmp_path: Path
) -> None:
    """At concurrency 1 an async def into a sink runs in a window of one. At-most-once commits
    what it polls before handling it, so a window that polled ahead up to its room (1,000
    records) lost that many at a crash, where the plain path loses a poll's worth."""
    with log.producer() as producer:
        for i in range(120):
            producer.send("in", b"%d" % i, partition=0)
        producer.flush()
    sink = SqliteSink(str(tmp_path / "effects.db"), schema="CREATE TABLE t (v TEXT)")
    app = App(log=log, group="g", guarantee="at-most-once", max_poll_records=5)
    ahead: list[int] = []

    @app.handler("in", sink=sink)
    async def charge(msg: Message, db: Any) -> None:
        ahead.append(committed(log).get(0, 0) - msg.offset)
        await asyncio.sleep(0.005)  # a call that waits: meanwhile the App polls on
        await db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))

    assert app.run(until_idle=0.5).processed == 120
    assert len(ahead) == 120
    assert max(ahead) <= 10, max(ahead)


@pytest.mark.parametrize(
    "use",
    [
        "db.execute(sql).fetchone()",
        "for row in db.execute(sql)",
        "db.savepoint()",
        "db.connection",
        "db.dead_letter",
        "if db.first_delivery(msg)",
    ],
)
def test_an_async_handler_that_uses_its_db_as_the_plain_transaction_stops_the_app(
    log: Log, tmp_path: Path, use: str
) -> None:
    """Written for the plain transaction (which an async def got at concurrency 1 before):
    each such use is a programming error that would fail every record. It stops the App,
    saying to await, instead of each record being retried and dead-lettered, its position
    committed past without its effects."""
    fill(log, 4)
    sink = SqliteSink(str(tmp_path / "effects.db"), schema="CREATE TABLE t (v TEXT)")
    app = App(log=log, group="g", guarantee="exactly-once")
    sql = "SELECT count(*) FROM t"

    @app.handler("in", sink=sink)
    async def charge(msg: Message, db: Any) -> None:
        if use == "db.execute(sql).fetchone()":
            db.execute(sql).fetchone()
        elif use == "for row in db.execute(sql)":
            for _ in db.execute(sql):
                pass
        elif use == "db.savepoint()":
            with db.savepoint():
                pass
        elif use == "db.connection":
            db.connection.execute(sql)
        elif use == "db.dead_letter":
            db.dead_letter(msg, topic="in.parked")
        elif db.first_delivery(msg):  # always true: a coroutine, never run
            await db.execute("INSERT INTO t VALUES ('effect')")

    with pytest.raises(NotAwaitedError, match=r"await db\.execute"):
        app.run(until_idle=0.5)
    assert committed(log) == {}
    assert read(log, "in.dlq") == []


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_records_run_side_by_side_and_one_key_never_overlaps_itself(
    log: Log, guarantee: Guarantee
) -> None:
    """concurrency=20, ordering by key: calls overlap (up to 20, never more), the records of one
    partition and key never do, and each such lane is handled and written in offset order."""
    fill(log, 200, keys=40)
    app = App(log=log, group="g", guarantee=guarantee, max_poll_records=200)
    flight = InFlight()

    @app.handler("in", output="out", concurrency=20)  # ordering="key" is the default then
    async def copy(msg: Message, out: Output) -> None:
        lane = (msg.partition, msg.key)
        flight.enter(lane, msg.offset)
        try:
            await asyncio.sleep(0.002 * (1 + msg.offset % 5))  # lanes finish out of step
            out.send(msg.value, key=msg.key)
        finally:
            flight.leave(lane)

    assert app.run(until_idle=0.5).processed == 200
    assert 1 < flight.most["all"] <= 20
    lanes = [k for k in flight.most if k != "all"]
    assert len(lanes) == 40
    assert all(flight.most[k] == 1 for k in lanes)
    assert all(seen == sorted(seen) for seen in flight.seen.values())
    written = read(log)
    assert len(written) == 200
    by_key: dict[bytes | None, list[int]] = {}
    for key, value in written:
        assert value is not None
        by_key.setdefault(key, []).append(int(value[1:]))
    assert all(vs == sorted(vs) for vs in by_key.values())  # a key's outputs in input order
    assert committed(log) == {0: 100, 1: 100}


def test_partition_ordering_runs_one_record_per_partition_and_unordered_any(log: Log) -> None:
    fill(log, 60)
    for group, ordering, most in (("p", "partition", 2), ("u", "unordered", 10)):
        app = App(log=log, group=group, guarantee="at-least-once")
        flight = InFlight()

        @app.handler("in", concurrency=10, ordering=ordering)  # type: ignore[arg-type]
        async def wait(msg: Message, flight: InFlight = flight) -> None:
            flight.enter(msg.partition, msg.offset)
            try:
                await asyncio.sleep(0.005)
            finally:
                flight.leave(msg.partition)

        assert app.run(until_idle=0.5).processed == 60
        assert flight.most["all"] <= most
        if ordering == "partition":
            assert flight.most[0] == flight.most[1] == 1
            assert all(seen == sorted(seen) for seen in flight.seen.values())
        else:
            assert flight.most[0] > 1  # records of one partition overlapped


def test_a_plain_def_with_concurrency_runs_in_threads(log: Log) -> None:
    fill(log, 40)
    app = App(log=log, group="g", guarantee="exactly-once")
    flight = InFlight()
    threads: set[str] = set()

    @app.handler("in", output="out", concurrency=8, ordering="unordered")
    def copy(msg: Message, out: Output) -> None:
        flight.enter("x", msg.offset)
        threads.add(threading.current_thread().name)
        time.sleep(0.01)  # blocking I/O, say
        out.send(msg.value)
        flight.leave("x")

    assert app.run(until_idle=0.5).processed == 40
    assert 1 < flight.most["all"] <= 8
    assert len(threads) > 1
    assert len(read(log)) == 40


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_retries_and_dead_letters_side_by_side(log: Log, guarantee: Guarantee) -> None:
    """A record that sends, then raises, and succeeds on a retry is written once (its failed
    attempt's outputs are dropped); one that always fails is dead-lettered once; the rest are
    not held back by either."""
    with log.admin() as admin:
        admin.create_topic("in.dlq", 1)
    values = fill(log, 50)
    attempts: Counter[bytes] = Counter()
    app = App(log=log, group="g", guarantee=guarantee)

    @app.handler("in", output="out", concurrency=10, retries=2, backoff_ms=1)
    async def copy(msg: Message, out: Output) -> None:
        attempts[msg.value] += 1
        out.send(msg.value)
        await asyncio.sleep(0.001)
        if msg.value == b"m0007" and attempts[msg.value] == 1:
            raise RuntimeError("a gateway timed out")
        if msg.value == b"m0011":
            raise ValueError("card declined")

    assert app.run(until_idle=0.5).processed == 50
    written = Counter(v for _, v in read(log))
    assert written == Counter(v for v in values if v != b"m0011")
    assert attempts[b"m0007"] == 2
    assert attempts[b"m0011"] == 3  # the first try and two retries
    assert [v for _, v in read(log, "in.dlq")] == [b"m0011"]
    assert committed(log) == {0: 25, 1: 25}


def test_concurrency_is_checked_when_registered(log: Log, tmp_path: Path) -> None:
    app = App(log=log, group="g")
    with pytest.raises(ConfigError, match="concurrency=0"):
        app.handler("in", concurrency=0)
    with pytest.raises(ConfigError, match="ordering='offset'"):
        app.handler("in", concurrency=4, ordering="offset")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be an async def"):
        app.handler("in", sink=SqliteSink(str(tmp_path / "s.db")), concurrency=4)(lambda m, db: 0)


def test_run_inside_an_event_loop_says_to_use_a_thread(log: Log) -> None:
    fill(log, 4)
    app = App(log=log, group="g")

    @app.handler("in", output="out")
    async def copy(msg: Message, out: Output) -> None:
        out.send(msg.value)

    async def main() -> int:
        with pytest.raises(UsageError, match="to_thread"):
            app.run(until_idle=0.3)
        stats = await asyncio.to_thread(app.run, until_idle=0.5)
        return stats.processed

    assert asyncio.run(main()) == 4
    assert len(read(log)) == 4


# -- from a hostile review ----------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_coroutine_returned_by_a_plain_wrapper_is_awaited_not_dropped(
    log: Log, concurrency: int
) -> None:
    """``functools.wraps`` around an ``async def`` hides it from ``iscoroutinefunction``: the
    wrapper is a plain function returning a coroutine. It was called, its coroutine dropped
    (never awaited) and every record committed with no output."""
    values = fill(log, 10)

    def traced(fn: Any) -> Any:
        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            return fn(*args)

        return call

    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", output="out", concurrency=concurrency)
    @traced
    async def copy(msg: Message, out: Output) -> None:
        await asyncio.sleep(0.001)
        out.send(msg.value)

    assert app.run(until_idle=0.5).processed == 10
    assert sorted(v or b"" for _, v in read(log)) == values


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_an_async_def_behind_a_plain_wrapper_into_a_sink_stops_the_app(
    log: Log, tmp_path: Path, guarantee: Guarantee
) -> None:
    """A plain wrapper around an ``async def`` into a sink at concurrency 1 gets the plain
    transaction, whose calls cannot be awaited: its statement ran, then ``await`` on the
    cursor failed, and every record was retried and dead-lettered. Now the App stops before
    anything of the record commits, saying what to change."""
    fill(log, 6)
    sink = SqliteSink(str(tmp_path / "effects.db"), schema="CREATE TABLE charges (v TEXT)")

    def traced(fn: Any) -> Any:
        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            return fn(*args)

        return call

    app = App(log=log, group="g", guarantee=guarantee)

    @app.handler("in", sink=sink, retries=1, backoff_ms=1)
    @traced
    async def charge(msg: Message, db: Any) -> None:
        await db.execute("INSERT INTO charges VALUES (?)", (msg.value.decode(),))

    with pytest.raises(AwaitableIntoSinkError, match="markcoroutinefunction") as raised:
        app.run(until_idle=0.5)
    assert raised.value.fatal
    with sqlite3.connect(tmp_path / "effects.db") as db:
        assert db.execute("SELECT count(*) FROM charges").fetchone() == (0,)
    assert read(log, "in.dlq") == []
    if guarantee != "at-most-once":
        assert committed(log) == {}


def test_what_a_handler_binds_to_the_loop_holds_across_runs(log: Log) -> None:
    """A lock (a client, a pool) a handler makes on its first call is bound to the loop it was
    made on; a new loop per run() made every record of the second run fail and be
    dead-lettered."""
    with log.admin() as admin:
        admin.create_topic("in.dlq", 1)
    fill(log, 10)
    made: list[asyncio.Lock] = []
    app = App(log=log, group="g", guarantee="at-least-once")

    @app.handler("in", output="out", concurrency=4)
    async def copy(msg: Message, out: Output) -> None:
        if not made:
            made.append(asyncio.Lock())
        async with made[0]:
            await asyncio.sleep(0.001)
        out.send(msg.value)

    assert app.run(until_idle=0.5).processed == 10
    fill(log, 10)
    assert app.run(until_idle=0.5).processed == 10
    assert len(read(log)) == 20
    assert read(log, "in.dlq") == []


def test_no_attempt_starts_after_the_batch_is_given_up(log: Log) -> None:
    """A record waiting to retry when another one stops the App (a fatal error) gets no
    further attempt: a payment call is not made again after the App decided to stop."""
    fill(log, 2, keys=2)  # m0000 on partition 0, m0001 on partition 1
    attempts: Counter[bytes] = Counter()
    app = App(log=log, group="g", guarantee="at-least-once")

    @app.handler("in", output="out", concurrency=2, retries=3, backoff_ms=300)
    async def charge(msg: Message, out: Output) -> None:
        attempts[msg.value] += 1
        if msg.value == b"m0000":
            raise RuntimeError("a gateway timed out")  # retried, after 300 ms
        await asyncio.sleep(0.05)
        raise FatalError("the gateway's credentials were revoked")

    with pytest.raises(FatalError, match="revoked"):
        app.run(until_idle=0.5)
    assert attempts == {b"m0000": 1, b"m0001": 1}
    assert committed(log) == {}


@pytest.mark.parametrize(("concurrency", "wrapped"), [(1, False), (3, False), (1, True)])
def test_a_cancelled_await_inside_a_handler_is_that_records_failure(
    log: Log, concurrency: int, wrapped: bool
) -> None:
    with log.admin() as admin:
        admin.create_topic("in.dlq", 1)
    fill(log, 6)
    app = App(log=log, group="g", guarantee="at-least-once")

    async def call(msg: Message, out: Output) -> None:
        if msg.value == b"m0002":
            await asyncio.wait_for(asyncio.sleep(1), timeout=0.001)  # the gateway is slow
        out.send(msg.value)

    if wrapped:  # a plain def returning the coroutine, as tracing decorators make

        @functools.wraps(call)
        def traced(msg: Message, out: Output) -> Any:
            return call(msg, out)

        app.handler("in", output="out", retries=1, backoff_ms=1)(traced)
    else:
        app.handler("in", output="out", concurrency=concurrency, retries=1, backoff_ms=1)(call)

    assert app.run(until_idle=0.5).processed == 6
    assert len(read(log)) == 5
    assert [v for _, v in read(log, "in.dlq")] == [b"m0002"]


def test_ordering_needs_concurrency(log: Log) -> None:
    app = App(log=log, group="g")
    with pytest.raises(ConfigError, match="with concurrency=1"):
        app.handler("in", ordering="unordered")


def test_a_slow_handler_gets_transactions_of_about_one_commit_interval(log: Log) -> None:
    """A 20 ms handler under exactly-once: batches of 500 made one transaction of 10 s (the
    first output visible after all of it). Polls are now sized to about one commit interval of
    handling, so outputs become visible while the rest is still being handled."""
    fill(log, 60)
    outcomes: list[str] = []
    seen_while_running: list[int] = []
    app = App(log=log, group="g", guarantee="exactly-once", commit_interval_ms=100)
    app.on_transaction = lambda label, outcome: outcomes.append(outcome)

    @app.handler("in", output="out")
    def slow(msg: Message, out: Output) -> None:
        time.sleep(0.02)
        if msg.offset == 25:
            seen_while_running.append(len(read(log)))
        out.send(msg.value)

    assert app.run(until_idle=0.5).processed == 60
    assert outcomes.count("committed") >= 6  # 60 records of 20 ms: about 12 intervals
    assert seen_while_running
    assert seen_while_running[0] > 0
    assert len(read(log)) == 60


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_slow_commit_does_not_shrink_the_polls(
    log: Log, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guarantee: Guarantee
) -> None:
    """Polls are sized by the handlers' own time: a database transaction slower than the commit
    interval around a fast handler took batches down to one record each (found in review)."""
    fill(log, 300)
    sink = SqliteSink(str(tmp_path / "ledger.db"))
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE ledger (v TEXT)")
    opened: list[int] = []
    real = SqliteSink.transaction

    def slow_transaction(self: SqliteSink, *args: Any, **kwargs: Any) -> Any:
        opened.append(1)
        time.sleep(0.12)  # a database far away
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SqliteSink, "transaction", slow_transaction)
    app = App(log=log, group="g", guarantee=guarantee, commit_interval_ms=100)

    @app.handler("in", sink=sink)
    def book(msg: Message, db: Any) -> None:
        db.execute("INSERT INTO ledger VALUES (?)", (msg.value.decode(),))

    assert app.run(until_idle=0.5).processed == 300
    assert len(opened) < 30


# -- a window, not a barrier (issue 14) ---------------------------------------------------------


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_slow_key_never_stalls_the_others_and_nothing_commits_past_it(
    log: Log, guarantee: Guarantee
) -> None:
    """One record of one key takes 1.5 s; the other keys' 300 records, in polls of 20, go on
    meanwhile (a batch barrier let 19 pass). While it runs, no position is committed past it,
    and under exactly-once no output of a record after it in its partition is visible yet."""
    with log.producer() as producer:
        producer.send("in", b"slow", key=b"slow", partition=0)
        for i in range(300):
            producer.send("in", f"m{i:04d}".encode(), key=f"k{i % 30}".encode(), partition=0)
        producer.flush()
    app = App(log=log, group="g", guarantee=guarantee, max_poll_records=20,
              commit_interval_ms=20)  # fmt: skip
    done_while_slow: list[int] = []
    seen_while_slow: dict[str, Any] = {}
    finished: list[bytes] = []

    @app.handler("in", output="out", concurrency=10)
    async def handle(msg: Message, out: Output) -> None:
        if msg.value == b"slow":
            await asyncio.sleep(1.5)
            done_while_slow.append(len(finished))
            seen_while_slow["committed"] = await asyncio.to_thread(committed, log)
            seen_while_slow["outputs"] = await asyncio.to_thread(read, log)
        else:
            await asyncio.sleep(0.002)
        finished.append(msg.value or b"")
        out.send(msg.value, key=msg.key)

    app.run(until_idle=0.5)
    assert done_while_slow[0] >= 250, done_while_slow  # the others went on
    assert seen_while_slow["committed"].get(0, 0) == 0  # nothing past the slow record, at 0
    if guarantee == "exactly-once":
        assert seen_while_slow["outputs"] == []  # held: their positions are not committed
    outputs = [v or b"" for _, v in read(log)]
    assert sorted(outputs) == sorted([b"slow", *(f"m{i:04d}".encode() for i in range(300))])
    assert committed(log) == {0: 301}


def refused_later(out: Output) -> None:
    """An output the log refuses only as the outputs go out (under exactly-once, into the
    open transaction, which is then aborted): one to a topic it lacks. (One over the size
    limit is refused by ``out.send`` itself.)"""
    out.send(b"x", topic="no-such-topic")


def _two_partitions(log: Log, *values: tuple[bytes, bytes, int]) -> None:
    with log.producer() as producer:
        for value, key, partition in values:
            producer.send("in", value, key=key, partition=partition)
        producer.flush()


def test_an_oversized_output_side_by_side_is_dead_lettered_and_the_run_ends(log: Log) -> None:
    """From a review: the record whose output the log refused was taken out of the window
    uncounted; the window then never emptied: until_idle never ended the run, and the stop
    committed on a closed producer. Now it is dead-lettered and the run ends cleanly."""
    with log.admin() as admin:
        admin.create_topic("dlq", 1)
    fill(log, 20)
    app = App(log=log, group="g", guarantee="exactly-once", max_poll_records=10,
              commit_interval_ms=20)  # fmt: skip

    @app.handler("in", output="out", concurrency=4, retries=0, dead_letter="dlq")
    async def handle(msg: Message, out: Output) -> None:
        await asyncio.sleep(0.002)
        out.send(b"x" * 1_100_000 if msg.value == b"m0005" else msg.value)

    stats = app.run(until_idle=0.5)
    assert stats.stopped_by == "idle"
    outputs = sorted(v or b"" for _, v in read(log))
    assert outputs == sorted(f"m{i:04d}".encode() for i in range(20) if i != 5)
    assert [v for _, v in read(log, "dlq")] == [b"m0005"]
    assert committed(log) == {0: 10, 1: 10}


@pytest.mark.parametrize("concurrency", [0, 1, 8])
def test_an_oversized_output_fails_its_own_attempt_and_aborts_no_transaction(
    log: Log, concurrency: int
) -> None:
    """An output over the log's size limit is refused at ``out.send``, inside the handler: its
    record's attempt fails (retried, then dead-lettered) and the handler may act on it. It
    used to be refused only as the outputs went into the transaction, which was then aborted:
    the work of every record in it was redone, and with one record in a hundred oversized,
    exactly-once ran about ten times slower."""
    with log.admin() as admin:
        admin.create_topic("dlq", 1)
    fill(log, 200)
    app = App(log=log, group="g", guarantee="exactly-once", max_poll_records=50,
              commit_interval_ms=20)  # fmt: skip
    outcomes: list[str] = []
    app.on_transaction = lambda _label, outcome: outcomes.append(outcome)
    refused: list[str] = []

    def send(msg: Message, out: Output) -> None:
        big = int((msg.value or b"m0")[1:]) % 20 == 7
        try:
            out.send(b"x" * 1_100_000 if big else msg.value, key=msg.key)
        except RecordTooLargeError as e:
            refused.append(str(e))
            raise

    async def handle(msg: Message, out: Output) -> None:
        await asyncio.sleep(0.001)
        send(msg, out)

    # concurrency 0: a plain def, one record at a time
    app.handler("in", output="out", concurrency=max(1, concurrency), retries=1, backoff_ms=1,
                dead_letter="dlq")(handle if concurrency else send)  # fmt: skip
    stats = app.run(until_idle=0.5)
    assert stats.stopped_by == "idle"
    big = {f"m{i:04d}".encode() for i in range(200) if i % 20 == 7}
    assert sorted(v or b"" for _, v in read(log)) == sorted(
        f"m{i:04d}".encode() for i in range(200) if f"m{i:04d}".encode() not in big
    )
    assert sorted(v or b"" for _, v in read(log, "dlq")) == sorted(big)
    assert "aborted" not in outcomes
    assert len(refused) == 2 * len(big)  # each attempt of each, at its send
    assert "over the limit of 1000000 bytes" in refused[0], refused[0]
    assert sum(committed(log).values()) == 200


def test_headers_count_toward_the_size_limit_send_checks(log: Log) -> None:
    """The check at ``out.send`` counts the headers' names and values too: a value under the
    limit with headers that take it over is refused there, and no transaction is aborted."""
    with log.admin() as admin:
        admin.create_topic("dlq", 1)
    fill(log, 4)
    app = App(log=log, group="g", guarantee="exactly-once", commit_interval_ms=20)
    outcomes: list[str] = []
    app.on_transaction = lambda _label, outcome: outcomes.append(outcome)

    @app.handler("in", output="out", concurrency=2, retries=0, dead_letter="dlq")
    async def handle(msg: Message, out: Output) -> None:
        headers = [("trace", b"t" * 40)] if msg.value == b"m0002" else None
        out.send(b"v" * 999_970, headers=headers)

    app.run(until_idle=0.5)
    assert [v for _, v in read(log, "dlq")] == [b"m0002"]
    assert len(read(log)) == 3
    assert "aborted" not in outcomes


def test_a_record_given_up_counts_for_nothing_even_if_its_handler_ends(log: Log) -> None:
    """From a review: a handler that swallows its cancellation (as a client may, or asyncio's
    wait_for race) ran on after its record was given up, and counted as handled: a later
    transaction could commit a position past a record whose output it did not hold. Given up
    is now given up; every output once, every position after its output."""
    with log.admin() as admin:
        admin.create_topic("dlq", 1)
    _two_partitions(log, (b"Q", b"q", 0), (b"R", b"r", 0), (b"S", b"s", 1))
    app = App(log=log, group="g", guarantee="exactly-once", max_poll_records=10,
              commit_interval_ms=20)  # fmt: skip
    swallowed: list[int] = []
    too_early: list[Any] = []

    @app.handler("in", output="out", concurrency=4, retries=0, dead_letter="dlq")
    async def handle(msg: Message, out: Output) -> None:
        if msg.value == b"S" and not swallowed:
            try:
                await asyncio.sleep(2)
            except asyncio.CancelledError:
                swallowed.append(1)  # and goes on, as if nothing happened
        elif msg.value == b"Q":
            await asyncio.sleep(0.3)
        if msg.value == b"R":
            refused_later(out)
        else:
            out.send(msg.value)

    def told(label: str, outcome: str) -> None:
        past_q = outcome == "committed" and committed(log).get(0, 0) >= 1
        if past_q and b"Q" not in [v for _, v in read(log)]:
            too_early.append(label)

    app.on_transaction = told
    app.run(until_idle=1.0)
    assert swallowed == [1]
    assert too_early == []
    assert sorted(v or b"" for _, v in read(log)) == [b"Q", b"S"]
    assert [v for _, v in read(log, "dlq")] == [b"R"]


def test_a_plain_def_given_up_is_waited_for_before_its_record_runs_again(log: Log) -> None:
    """From a review: giving up the window cancelled the wait for a plain ``def``'s thread, not
    the thread: after the rewind its record ran again beside the first call, one key twice at
    once. Now the rewind waits for the thread."""
    with log.admin() as admin:
        admin.create_topic("dlq", 1)
    _two_partitions(log, (b"A", b"a", 0), (b"B", b"b", 1))
    app = App(log=log, group="g", guarantee="exactly-once", max_poll_records=10,
              commit_interval_ms=20)  # fmt: skip
    flight = InFlight()

    @app.handler("in", output="out", concurrency=4, retries=0, dead_letter="dlq")
    def handle(msg: Message, out: Output) -> None:
        if msg.value == b"A":
            flight.enter("a", msg.offset)
            time.sleep(0.5)
            flight.leave("a")
            out.send(b"A")
        else:
            time.sleep(0.05)
            refused_later(out)  # the transaction aborts, the window rewinds

    app.run(until_idle=1.0)
    assert flight.most["a"] == 1
    assert [v for _, v in read(log)] == [b"A"]
    assert [v for _, v in read(log, "dlq")] == [b"B"]


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_the_logs_error_side_by_side_between_polls_is_undone_not_fatal(
    log: Log, guarantee: Guarantee
) -> None:
    """From a review: under exactly-once, a record side by side that met an error of the log's
    (retriable, not its own) while the App polled nothing new stopped the App, where inside a
    transaction it is aborted and redone. Now it is redone: every output once."""
    fill(log, 20)
    app = App(log=log, group="g", guarantee=guarantee, max_poll_records=50,
              commit_interval_ms=50)  # fmt: skip
    raised: list[int] = []

    @app.handler("in", output="out", concurrency=4, ordering="unordered", retries=0)
    def handle(msg: Message, out: Output) -> None:
        if msg.value == b"m0005" and not raised:
            time.sleep(0.4)  # the others are done: the App is polling nothing new
            raised.append(1)
            raise RetriableError("the database is away (for a moment)")
        out.send(msg.value)

    stats = app.run(until_idle=0.5)
    assert raised == [1]
    assert stats.stopped_by == "idle"
    outputs = [v or b"" for _, v in read(log)]
    if guarantee == "exactly-once":
        assert sorted(outputs) == sorted(f"m{i:04d}".encode() for i in range(20))
    else:
        assert set(outputs) == {f"m{i:04d}".encode() for i in range(20)}
    assert committed(log) == {0: 10, 1: 10}


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_stop_drains_within_drain_timeout_and_redoes_what_did_not_finish(
    log: Log, guarantee: Guarantee
) -> None:
    """SIGTERM (or stop()) lets records side by side finish for drain_timeout_ms at most; one
    still running then is given up, nothing past it is committed, and the next run handles it."""
    fill(log, 20)
    stuck = threading.Event()
    app = App(log=log, group="g", guarantee=guarantee, drain_timeout_ms=500)

    @app.handler("in", output="out", concurrency=4)
    async def copy(msg: Message, out: Output) -> None:
        if msg.partition == 0 and msg.offset == 5:
            stuck.set()
            await asyncio.sleep(120)  # a call that does not come back
        out.send(msg.value)

    stop_when(app, stuck, after_s=0.5)  # the others finish meanwhile
    began = time.monotonic()
    app.run(until_idle=30)
    assert time.monotonic() - began < 10  # not the handler's 120 s
    assert committed(log)[0] == 5  # nothing past the record given up
    assert committed(log)[1] == 10

    again = App(log=log, group="g", guarantee=guarantee)

    @again.handler("in", output="out", concurrency=4)
    async def copy_again(msg: Message, out: Output) -> None:
        out.send(msg.value)

    assert again.run(until_idle=0.5).processed == 5  # offsets 5..9 of partition 0
    values = [v for _, v in read(log)]
    assert set(values) == {f"m{i:04d}".encode() for i in range(20)}
    if guarantee == "exactly-once":
        assert len(values) == 20  # what was given up had committed nothing


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
@pytest.mark.parametrize("stuck_in", ["an await", "an await that answers its cancel", "retries"])
def test_a_stop_ends_within_drain_timeout_one_record_at_a_time(
    log: Log, guarantee: Guarantee, stuck_in: str
) -> None:
    """From a review: a handler at concurrency 1 (not side by side) stuck in an await, or a
    record whose retries back off for minutes, held the stop until it was over (120 s, 199 s):
    nothing looked at the stop there. Now the drain's end gives the record up: its batch
    commits nothing, the run returns as from any stop, and the next run handles the rest. A
    handler (a client) that answers the cancellation with an error of its own is given up
    too, not dead-lettered (a second review: it was, and its position committed)."""
    with log.admin() as admin:
        admin.create_topic("dlq", 1)
    fill(log, 10)
    stuck = threading.Event()
    app = App(log=log, group="g", guarantee=guarantee, drain_timeout_ms=500)

    if stuck_in.startswith("an await"):

        @app.handler("in", output="out", retries=0, dead_letter="dlq")
        async def copy(msg: Message, out: Output) -> None:
            if msg.value == b"m0003":
                stuck.set()
                try:
                    await asyncio.sleep(60)  # a call that does not come back
                except asyncio.CancelledError:
                    if stuck_in == "an await":
                        raise
                    raise ConnectionError("the request was aborted") from None
            out.send(msg.value)

    else:

        @app.handler("in", output="out", retries=100, backoff_ms=2000)
        def copy_plainly(msg: Message, out: Output) -> None:
            if msg.value == b"m0003":
                stuck.set()
                raise RuntimeError("the gateway is down")
            out.send(msg.value)

    stop_when(app, stuck)
    began = time.monotonic()
    stats = app.run(until_idle=60)
    assert time.monotonic() - began < 15  # not the 60 s await, nor 100 retries
    assert stats.stopped_by == "stop"
    assert b"m0003" not in {v for _, v in read(log)}
    assert read(log, "dlq") == []

    again = App(log=log, group="g", guarantee=guarantee)

    @again.handler("in", output="out")
    def copy_again(msg: Message, out: Output) -> None:
        out.send(msg.value)

    again.run(until_idle=0.5)
    values = [v or b"" for _, v in read(log)]
    assert set(values) == {f"m{i:04d}".encode() for i in range(10)}
    if guarantee == "exactly-once":
        assert len(values) == 10  # what was given up had committed nothing


def test_a_stop_ends_a_drain_that_began_before_it(log: Log) -> None:
    """A record whose output the log refused is redone in a transaction of its own, after
    every record before it has finished (a step that waits for all of them). One of those
    does not come back, and a stop is asked meanwhile: the stop's drain ends that step too
    (it waited out the stuck call before), and the next run handles what did not finish."""
    fill(log, 20)
    refused: list[int] = []
    stuck_again = threading.Event()
    app = App(log=log, group="g", guarantee="exactly-once", drain_timeout_ms=500)

    @app.handler("in", output="out", concurrency=4)
    async def copy(msg: Message, out: Output) -> None:
        if msg.value == b"m0005" and not refused:
            refused.append(1)
            refused_later(out)  # this record is redone alone
            return
        if msg.value == b"m0002" and refused:
            stuck_again.set()
            await asyncio.sleep(30)  # a call that does not come back
        out.send(msg.value)

    stop_when(app, stuck_again)
    began = time.monotonic()
    app.run(until_idle=30)
    assert refused == [1]
    assert time.monotonic() - began < 10  # not the stuck call's 30 s

    again = App(log=log, group="g", guarantee="exactly-once")

    @again.handler("in", output="out", concurrency=4)
    async def copy_again(msg: Message, out: Output) -> None:
        out.send(msg.value)

    again.run(until_idle=0.5)
    assert sorted(v or b"" for _, v in read(log)) == sorted(f"m{i:04d}".encode() for i in range(20))


def test_outputs_side_by_side_carry_the_label_of_the_transaction_they_went_into(log: Log) -> None:
    """Under exactly-once side by side, a record's outputs go into whichever transaction
    commits its position; with ``out.label_header`` they are stamped with that transaction's
    label at release (the audit's aborted-read check reads it)."""
    fill(log, 40)
    app = App(log=log, group="g", guarantee="exactly-once")
    told: dict[str, str] = {}

    def tell(label: str, outcome: str) -> None:
        told.setdefault(label, outcome)

    app.on_transaction = tell

    @app.handler("in", output="out", concurrency=8)
    async def copy(msg: Message, out: Output) -> None:
        out.label_header = "txn"
        assert out.transaction is None  # not known while the record runs
        await asyncio.sleep(0.001)
        out.send(msg.value)

    app.run(until_idle=0.5)
    with log.consumer(isolation="read_committed") as consumer:
        consumer.assign([TopicPartition("out", 0)])
        labels = []
        while batch := consumer.poll(timeout=0.3):
            labels += [dict(r.headers).get("txn") for r in batch]
    assert len(labels) == 40
    assert all(label is not None and told.get(label.decode()) == "committed" for label in labels)


async def _swallowing(msg: Message) -> None:
    """A call in a retry loop that swallows every cancellation (as a bare ``except:`` would;
    a closed coroutine's GeneratorExit still ends it)."""
    for _ in range(1000):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:  # the careless code under test
            continue


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_stop_ends_even_when_a_handler_swallows_every_cancellation(
    log: Log, concurrency: int, caplog: pytest.LogCaptureFixture
) -> None:
    """From a review: a handler that swallows asyncio.CancelledError for good (a bare
    ``except:`` in a retry loop) held a stop for ever: every give-up waited for its task,
    and so did closing the App. Now a record given up has a few seconds to end; then it is
    left behind, its outputs dropped, and the run returns; the next handles what was left."""
    fill(log, 20)
    stuck = threading.Event()
    app = App(log=log, group="g", guarantee="exactly-once", drain_timeout_ms=500)

    @app.handler("in", output="out", concurrency=concurrency)
    async def copy(msg: Message, out: Output) -> None:
        if msg.partition == 0 and msg.offset == 5:
            stuck.set()
            await _swallowing(msg)
        out.send(msg.value)

    stop_when(app, stuck)
    began = time.monotonic()
    stats = app.run(until_idle=60)
    assert time.monotonic() - began < 20  # the drain, then the give-up's 5 s
    assert stats.stopped_by == "stop"
    assert committed(log).get(0, 0) <= 5
    assert "swallows asyncio.CancelledError" in caplog.text

    again = App(log=log, group="g", guarantee="exactly-once")

    @again.handler("in", output="out", concurrency=concurrency)
    async def copy_again(msg: Message, out: Output) -> None:
        out.send(msg.value)

    again.run(until_idle=0.5)
    values = [v or b"" for _, v in read(log)]
    assert sorted(values) == sorted(f"m{i:04d}".encode() for i in range(20))  # each once


def test_a_record_that_swallows_its_cancellation_with_its_db_part_open_commits_nothing(
    log: Log, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same, into a database: the record given up holds its part of the shared
    transaction open (its first statement ran) and goes on for good. Left behind, its
    connection's transaction is abandoned (it must never commit: SQLite's connection did
    not know how, and committed it), and its later calls are refused."""
    fill(log, 20)
    stuck = threading.Event()
    sink = SqliteSink(str(tmp_path / "effects.db"), schema="CREATE TABLE IF NOT EXISTS t (v TEXT)")
    app = App(log=log, group="g", guarantee="exactly-once", drain_timeout_ms=500)

    @app.handler("in", sink=sink, concurrency=4)
    async def write(msg: Message, db: Any) -> None:
        if msg.partition == 0 and msg.offset == 5:
            await db.execute("INSERT INTO t VALUES (?)", ("early",))
            stuck.set()
            await _swallowing(msg)
        await db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))

    stop_when(app, stuck)
    began = time.monotonic()
    with contextlib.suppress(RetriableError):  # the step's commit could not be made
        app.run(until_idle=60)
    assert time.monotonic() - began < 25  # the drain, then a give-up's 5 s (or two)
    assert "swallows asyncio.CancelledError" in caplog.text

    def rows() -> list[str]:
        with sqlite3.connect(tmp_path / "effects.db") as conn:
            return [v for (v,) in conn.execute("SELECT v FROM t")]

    assert "early" not in rows()
    assert "m0005" not in rows()

    again = App(log=log, group="g", guarantee="exactly-once")

    @again.handler("in", sink=sink, concurrency=4)
    async def write_again(msg: Message, db: Any) -> None:
        await db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))

    again.run(until_idle=0.5)
    assert sorted(rows()) == sorted(f"m{i:04d}" for i in range(20))  # each once, no "early"


def _run_on_a_thread(
    app: App, seconds: float, until_idle: float = 1.0
) -> tuple[list[BaseException], float, bool]:
    """Run ``app`` until idle on a thread: what it raised, how long it took, whether it was
    still running after ``seconds`` (a hung App is left behind on its daemon thread)."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            app.run(until_idle=until_idle)
        except BaseException as e:
            failed.append(e)

    runner = threading.Thread(target=run, daemon=True)
    began = time.monotonic()
    runner.start()
    runner.join(seconds)
    return failed, time.monotonic() - began, runner.is_alive()


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_record_holding_its_connection_past_its_limit_that_swallows_the_cancel_stops_the_app(
    log: Log, tmp_path: Path, concurrency: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record that holds its database connection past transaction_timeout_ms is cancelled;
    one that swallows that cancellation held the connection for good, and the window's group
    commit waited for it: the App hung, polling nothing, with no error (found in a review,
    carried over since). Now, still holding it a while later (15 s; 1 s here), it stops the
    App with an error that says why; nothing of that record is committed, and the next run
    handles the rest (each record's row once)."""
    monkeypatch.setattr(_shared_db, "_SWALLOWED_S", 1.0)
    fill(log, 12)
    sink = SqliteSink(str(tmp_path / "effects.db"), schema="CREATE TABLE IF NOT EXISTS t (v TEXT)")
    app = App(log=log, group="g", guarantee="exactly-once", transaction_timeout_ms=1000)
    stuck = threading.Event()

    @app.handler("in", sink=sink, concurrency=concurrency)
    async def write(msg: Message, db: Any) -> None:
        await db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))
        if msg.partition == 0 and msg.offset == 3 and not stuck.is_set():
            stuck.set()
            await _swallowing(msg)  # holds its connection, and swallows the limit's cancel

    failed, took, alive = _run_on_a_thread(app, 40, until_idle=60)
    assert not alive, "the App hung on a record that swallows its cancellation"
    assert took < 30  # the limit, its grace, a give-up's 5 s
    assert len(failed) == 1
    assert isinstance(failed[0], HeldPastLimitError)
    assert "swallows asyncio.CancelledError" in str(failed[0])

    def rows() -> list[str]:
        with sqlite3.connect(tmp_path / "effects.db") as conn:
            return [v for (v,) in conn.execute("SELECT v FROM t")]

    assert "m0003" not in rows()
    again = App(log=log, group="g", guarantee="exactly-once")

    @again.handler("in", sink=sink, concurrency=concurrency)
    async def write_again(msg: Message, db: Any) -> None:
        await db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))

    again.run(until_idle=0.5)
    assert sorted(rows()) == sorted(f"m{i:04d}" for i in range(12))  # each once


def test_the_grace_of_a_record_cancelled_at_its_limit_counts_from_its_cancel(
    log: Log, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a review: the grace before HeldPastLimitError counted from when the record took
    its connection. A look that came late (a blocking call had held the event loop) then
    cancelled the record and, one look later, stopped the App, though the record let its
    cancellation through 0.2 s after it came. Now the grace counts from the cancel: the
    record fails at its limit (a TimeoutError, dead-lettered here), and the App goes on."""
    monkeypatch.setattr(_shared_db, "_SWALLOWED_S", 1.0)
    fill(log, 6)
    sink = SqliteSink(str(tmp_path / "effects.db"), schema="CREATE TABLE IF NOT EXISTS t (v TEXT)")
    app = App(log=log, group="g", guarantee="exactly-once", transaction_timeout_ms=1000)
    slow: list[int] = []

    @app.handler("in", sink=sink, concurrency=2, retries=0)
    async def write(msg: Message, db: Any) -> None:
        await db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))
        if msg.partition == 0 and msg.offset == 1 and not slow:
            slow.append(1)
            time.sleep(2.5)  # blocks the loop, as a slow SQLite call does: no look meanwhile
            try:
                await asyncio.sleep(5)  # cancelled here, at the first look
            except asyncio.CancelledError:
                await asyncio.sleep(0.2)  # cleans up, then lets it through
                raise

    failed, _, alive = _run_on_a_thread(app, 40)
    assert not alive
    assert failed == []


def test_a_retry_after_a_cancel_turned_into_the_handlers_own_error_is_cancelled_at_its_limit(
    log: Log, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a review: a record cancelled at its limit whose client turned the cancellation
    into an error of its own stayed marked as cancelled for good. Its retry (the same task)
    was then never cancelled at its own limit, and held its connection until the App stopped
    with HeldPastLimitError, though it swallowed nothing. The mark is now the attempt's."""
    monkeypatch.setattr(_shared_db, "_SWALLOWED_S", 1.0)
    fill(log, 6)
    sink = SqliteSink(str(tmp_path / "effects.db"), schema="CREATE TABLE IF NOT EXISTS t (v TEXT)")
    app = App(log=log, group="g", guarantee="exactly-once", transaction_timeout_ms=1000)
    attempts: list[int] = []

    class ClientError(Exception):
        pass

    @app.handler("in", sink=sink, concurrency=2, retries=3, backoff_ms=10)
    async def write(msg: Message, db: Any) -> None:
        await db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))
        if msg.partition == 0 and msg.offset == 1:
            attempts.append(1)
            if len(attempts) == 1:
                try:
                    await asyncio.sleep(5)  # cancelled at the limit
                except asyncio.CancelledError as e:
                    raise ClientError("request cancelled") from e
            elif len(attempts) == 2:
                await asyncio.sleep(2.5)  # slow again: cancelled at the limit again

    failed, _, alive = _run_on_a_thread(app, 40)
    assert not alive
    assert failed == []
    assert len(attempts) == 3  # the third went through

    with sqlite3.connect(tmp_path / "effects.db") as conn:
        rows = sorted(v for (v,) in conn.execute("SELECT v FROM t"))
    assert rows == [f"m{i:04d}" for i in range(6)]


@pytest.mark.postgres
def test_the_app_stops_soon_after_a_held_past_limit_record_stuck_in_a_statement(
    log: Log, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a review: after HeldPastLimitError the step's rollback sent ROLLBACK on the stuck
    record's connection, which waited behind its statement (40 s here; a statement waiting for
    a lock could wait for good) before the record could be given up. A connection whose
    record still runs is now abandoned instead, and dropped once the record is cut off."""
    monkeypatch.setattr(_shared_db, "_SWALLOWED_S", 1.0)
    fill(log, 6)
    table = f"held_{int(time.time() * 1000) % 10**9}"
    sink = PostgresSink(postgres_dsn, schema=f"CREATE TABLE IF NOT EXISTS {table} (v TEXT)")
    app = App(log=log, group=f"g-{table}", guarantee="exactly-once", transaction_timeout_ms=1000)
    seen: list[int] = []

    @app.handler("in", sink=sink, concurrency=2)
    async def write(msg: Message, db: Any) -> None:
        await db.execute(f"INSERT INTO {table} VALUES (%s)", (msg.value.decode(),))
        if msg.partition == 0 and msg.offset == 1 and not seen:
            seen.append(1)
            # Careless code: swallows every cancellation. (A closed coroutine's GeneratorExit
            # still ends it: the task left behind is collected during a later test.)
            for _ in range(100):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.sleep(1.5)
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await db.execute("SELECT pg_sleep(40)")

    failed, took, alive = _run_on_a_thread(app, 60)
    assert not alive
    assert [type(e) for e in failed] == [HeldPastLimitError]
    assert took < 25  # its limit, its grace, a give-up's 5 s; not the statement's 40 s


@contextlib.contextmanager
def _lock_held(
    path: Path, asked: threading.Event, held: threading.Event, seconds: float
) -> Iterator[None]:
    """Another connection (standing for another process) takes the SQLite write lock at
    ``path`` once ``asked``, says so with ``held``, and keeps it ``seconds``."""

    def hold() -> None:
        asked.wait(30)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(seconds)
        holder.rollback()
        holder.close()

    holding = threading.Thread(target=hold)
    holding.start()
    try:
        yield
    finally:
        asked.set()
        holding.join()


def test_a_sqlite_sink_locked_by_another_process_does_not_stop_the_event_loop(
    log: Log, tmp_path: Path
) -> None:
    """Records side by side into SQLite began their shared transaction inside SQLite's busy
    handler, which sleeps: while another process held the write lock, the App's event loop
    stood still (up to lock_timeout_s), every record with it. The wait is now on the loop:
    a timer on it keeps its pace while the lock is held, and every record is written once
    the lock is free."""
    fill(log, 8)
    path = tmp_path / "effects.db"
    sink = SqliteSink(str(path), schema="CREATE TABLE IF NOT EXISTS t (v TEXT)")
    sink.setup()
    asked, held = threading.Event(), threading.Event()
    gaps: list[float] = []

    async def ticking() -> None:
        last = time.monotonic()
        for _ in range(100):  # 1 s of 10 ms ticks, while the lock is held
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    app = App(log=log, group="g", guarantee="exactly-once")
    ticker: list[asyncio.Task[None]] = []

    @app.handler("in", sink=sink, concurrency=4)
    async def write(msg: Message, db: Any) -> None:
        asked.set()
        while not held.is_set():  # no record's transaction is open when the lock is taken
            await asyncio.sleep(0.01)
        if not ticker:
            ticker.append(asyncio.ensure_future(ticking()))
        await db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))

    with _lock_held(path, asked, held, 2.0):
        app.run(until_idle=0.5)
    assert len(gaps) == 100
    assert max(gaps) < 0.3  # before: about a second for each of SQLite's waits
    with sqlite3.connect(path) as conn:
        rows = sorted(v for (v,) in conn.execute("SELECT v FROM t"))
    assert rows == [f"m{i:04d}" for i in range(8)]


def test_waiting_for_a_sqlite_lock_another_process_holds_does_not_count_to_a_records_limit(
    log: Log, tmp_path: Path
) -> None:
    """From a review: once the wait for another process's write lock moved onto the event
    loop, it counted to the record's transaction_timeout_ms, and a record that waited past it
    was cancelled, failed and dead-lettered, though nothing was wrong with it and the lock came
    free well within the sink's lock_timeout_s. Waiting for the database is not the handler
    holding it: every record is written, none dead-lettered."""
    with log.admin() as admin:
        admin.create_topic("in.dlq", 1)
    fill(log, 8)
    path = tmp_path / "effects.db"
    sink = SqliteSink(str(path), lock_timeout_s=10, schema="CREATE TABLE IF NOT EXISTS t (v TEXT)")
    sink.setup()
    asked, held = threading.Event(), threading.Event()

    app = App(log=log, group="g", guarantee="exactly-once", transaction_timeout_ms=1000)

    @app.handler("in", sink=sink, concurrency=4, retries=0, dead_letter="in.dlq")
    async def write(msg: Message, db: Any) -> None:
        asked.set()
        while not held.is_set():
            await asyncio.sleep(0.01)
        await db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))

    with _lock_held(path, asked, held, 3.0):  # past the records' 1 s limit
        app.run(until_idle=1.0)
    with sqlite3.connect(path) as conn:
        rows = sorted(v for (v,) in conn.execute("SELECT v FROM t"))
    assert rows == [f"m{i:04d}" for i in range(8)]
    assert read(log, "in.dlq") == []


def test_records_that_swallow_their_cancellation_give_back_their_concurrency_slots(
    log: Log,
) -> None:
    """From a review: a record left behind kept its concurrency slot for good; after a rewind
    that gave up as many such records as the concurrency allows, no record could start again:
    the App polled and handled nothing until stopped. Its slot now goes to the records after
    it, and the rewound records are handled (each output once)."""
    with log.admin() as admin:
        admin.create_topic("dlq", 1)
    _two_partitions(log, (b"A", b"a", 0), (b"R", b"r", 1), (b"B", b"b", 1), (b"C", b"c", 0))
    app = App(log=log, group="g", guarantee="exactly-once", max_poll_records=10,
              commit_interval_ms=20)  # fmt: skip
    seen: set[bytes] = set()

    @app.handler("in", output="out", concurrency=2, ordering="unordered", retries=0,
                 dead_letter="dlq")  # fmt: skip
    async def handle(msg: Message, out: Output) -> None:
        first = msg.value not in seen
        seen.add(msg.value)
        if first and msg.value in (b"A", b"B"):
            await _swallowing(msg)  # given up by the rewind R causes, and goes on
        # R's first output is refused by the log: the transaction aborts, the window rewinds
        if first and msg.value == b"R":
            refused_later(out)
        else:
            out.send(msg.value)

    stopper = threading.Timer(40, app.stop)  # the run should end long before
    stopper.start()
    began = time.monotonic()
    try:
        stats = app.run(until_idle=2.0)
    finally:
        stopper.cancel()
    assert stats.stopped_by == "idle"
    assert time.monotonic() - began < 30
    assert sorted(v or b"" for _, v in read(log)) == [b"A", b"B", b"C", b"R"]


def test_a_revoke_drains_within_drain_timeout_when_a_record_never_returns(log: Log) -> None:
    """From a review: on a revoke, records side by side of the partitions that go finish and
    commit first; one whose call never came back held the revoke, and with it the rebalance
    and the whole group, until the member was stopped. The revoke's drain is now bounded as a
    stop's is: the record is given up and handled again by its partition's owner, once."""
    fill(log, 20)
    stuck = threading.Event()
    first = App(log=log, group="g", guarantee="exactly-once", drain_timeout_ms=500)

    @first.handler("in", output="out", concurrency=4)
    async def copy(msg: Message, out: Output) -> None:
        if msg.partition == 0 and msg.offset == 3 and not stuck.is_set():
            stuck.set()
            await asyncio.sleep(600)  # a call that does not come back (this time)
        out.send(msg.value)

    runs = threading.Thread(target=first.run, kwargs={"until_idle": 60}, daemon=True)
    runs.start()
    assert stuck.wait(30)
    second = App(log=log, group="g", guarantee="exactly-once")

    @second.handler("in", output="out", concurrency=4)
    async def copy_too(msg: Message, out: Output) -> None:
        out.send(msg.value)

    joins = threading.Thread(target=second.run, kwargs={"until_idle": 60}, daemon=True)
    joins.start()
    began = time.monotonic()
    try:
        # The stuck record is handled again once the rebalance is over, by whichever member
        # has its partition then: before, the rebalance waited for it.
        while len(read(log)) < 20 and time.monotonic() - began < 30:
            time.sleep(0.2)
        values = [v or b"" for _, v in read(log)]
    finally:
        first.stop()
        second.stop()
        runs.join(30)
        joins.join(30)
    assert sorted(values) == sorted(f"m{i:04d}".encode() for i in range(20))  # each once


def _window_of(
    log: Log, concurrency: int, fn: Any, room: int = 100, kind: Any = None, **handler: Any
) -> Any:
    """A window of ``fn`` (ordering by key; ``handler``: more of its settings), as the App
    makes one (of class ``kind``: Window unless said), with ``room``, driven by hand on the
    running loop (as a step would set it up)."""
    from assured.runtime._concurrent import Window
    from assured.runtime.metrics import RuntimeMetrics

    app = App(log=log, group="g")
    app.handler("in", concurrency=concurrency, **handler)(fn)
    spec, metrics = app._specs["in"], RuntimeMetrics("at-least-once")
    window = (kind or Window)(spec, metrics, "at-least-once", None, room)
    window.loop, window.changed = asyncio.get_running_loop(), asyncio.Event()
    return window


async def _until(done: Callable[[], bool], seconds: float = 2.0) -> None:
    """Let the loop run until ``done()`` (or ``seconds`` passed; the caller's asserts say)."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _records(*keys: bytes) -> list[Any]:
    from assured.log import Record

    return [Record("in", 0, offset, 0, key, b"v") for offset, key in enumerate(keys)]


def test_records_given_up_before_their_first_step_give_back_their_slots(log: Log) -> None:
    """A record is started (its task made) only with a concurrency slot. Given up before its
    task's first step, its code never runs, so nothing in it can give the slot back: the
    window does. Without that, a rewind at that moment shrank the concurrency for good (at
    concurrency 2, both slots: nothing ever ran again)."""
    ran: list[int] = []

    async def handle(msg: Message) -> None:
        ran.append(msg.offset)

    async def scenario() -> None:
        from assured.runtime._concurrent import given_up

        window = _window_of(log, 2, handle)
        for record in _records(b"a", b"b", b"c", b"d"):
            window._dispatch(record)  # a and b start (their tasks made), c and d wait
        assert window.slots.free == 0
        await given_up(window.reset())  # before a or b took a step
        assert ran == []
        assert window.slots.free == 2
        await window.step(_records(b"e", b"f", b"g"), complete=True)
        assert sorted(ran) == [0, 1, 2]  # the records after the rewind all ran

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("concurrency", "keys"),
    [
        (4, [b"k", b"k", b"k", b"k"]),  # 1 and 2 wait for 0, their lane's running record
        (1, [b"a", b"b", b"b", b"b"]),  # 1 waits for the one slot (0 holds it), 2 for 1
    ],
    ids=["waiting-for-their-lane", "waiting-for-a-slot"],
)
def test_a_lane_goes_on_past_records_given_up_without_a_rewind(
    log: Log, concurrency: int, keys: list[bytes]
) -> None:
    """Records given up at a drain's end stay in the window until the protocol is done with
    it; one that was still waiting for its turn (its lane's, or a concurrency slot) never
    runs. A later record of its lane must not wait for it for good: it runs once the record
    running ends, its lane's order kept."""
    ran: list[int] = []
    gate = asyncio.Event()

    async def handle(msg: Message) -> None:
        if msg.offset == 0:
            await gate.wait()
        ran.append(msg.offset)

    async def scenario() -> None:
        window = _window_of(log, concurrency, handle)
        records = _records(*keys)
        for record in records[:3]:
            window._dispatch(record)
        await asyncio.sleep(0.01)  # 0 runs, and waits
        window._give_up([e for q in window.entries.values() for e in q if e.record.offset])
        window._dispatch(records[3])  # the lane of 1 and 2 again
        gate.set()
        await _until(lambda: len(ran) == 2)
        assert ran == [0, 3]  # never 1 or 2 (given up); 3 after 0
        assert window.slots.free == concurrency

    asyncio.run(scenario())


def test_a_lane_given_up_while_waiting_goes_on_after_another_partition_is_forgotten(
    log: Log,
) -> None:
    """From a review: forgetting one partition dropped every record given up from the slots'
    queue, of other partitions too, so their lanes never went on: a later record of such a
    lane never started, and nothing of its partition committed past it."""
    ran: list[tuple[int, int]] = []
    gate = asyncio.Event()

    async def handle(msg: Message) -> None:
        if msg.offset == 0:
            await gate.wait()
        ran.append((msg.partition, msg.offset))

    async def scenario() -> None:
        from assured.log import Record
        from assured.runtime._concurrent import given_up

        window = _window_of(log, 2, handle)
        window._dispatch(Record("in", 1, 0, 0, b"a", b"v"))  # takes a slot, waits
        window._dispatch(Record("in", 0, 0, 0, b"x", b"v"))  # takes the other, waits
        window._dispatch(Record("in", 1, 1, 0, b"b", b"v"))  # waits for a slot
        await asyncio.sleep(0.01)
        window._give_up([e for e in window.entries[TopicPartition("in", 1)] if e.record.offset])
        await given_up(window.forget([TopicPartition("in", 0)]))
        window._dispatch(Record("in", 1, 2, 0, b"b", b"v"))  # lane b again
        gate.set()
        await _until(lambda: len(ran) == 2)
        assert sorted(ran) == [(1, 0), (1, 2)]  # 1@2 ran (1@1 never did)
        assert window.slots.free == 2

    asyncio.run(scenario())


def test_a_full_window_into_a_database_steps_on_without_waiting_for_every_record(
    log: Log, tmp_path: Path
) -> None:
    """Records handled into the shared database transaction leave the window at the step's
    group commit. A step that counted them as still in flight waited, once the window was
    full, for every record in it to end: one slow record then held up the next poll, and
    the concurrency slots stood idle meanwhile (about a sixth of them, into SQLite at
    concurrency 200). Here 5 records are handled and 1 still runs, in a window with room for
    4: the step ends, and commits the 5."""
    from assured.runtime._shared_db import SharedTransaction

    sink = SqliteSink(str(tmp_path / "effects.db"), schema="CREATE TABLE t (v INTEGER)")
    sink.setup()
    gate = asyncio.Event()

    async def handle(msg: Message, db: Any) -> None:
        if msg.offset == 5:
            await gate.wait()
        await db.execute("INSERT INTO t VALUES (?)", (msg.offset,))

    def rows() -> list[int]:
        with contextlib.closing(sqlite3.connect(tmp_path / "effects.db")) as conn:
            return sorted(r[0] for r in conn.execute("SELECT v FROM t"))

    async def scenario() -> None:
        window = _window_of(log, 8, handle, room=4, sink=sink)
        window.db = SharedTransaction(sink, "g", {}, marks=False, epochs=dict)
        records = _records(*(b"k%d" % i for i in range(6)))
        await asyncio.wait_for(window.step(records, complete=False), 5)
        assert rows() == [0, 1, 2, 3, 4]  # committed while 5 still runs
        slow = window.entries[TopicPartition("in", 0)][-1].task
        assert slow is not None
        assert not slow.done()
        assert window.prefix() == ({TopicPartition("in", 0): 5}, 5)
        gate.set()
        await asyncio.wait_for(window.step([], complete=True), 5)
        assert rows() == [0, 1, 2, 3, 4, 5]
        assert window.prefix() == ({TopicPartition("in", 0): 6}, 1)

    asyncio.run(scenario())


def test_the_planted_highest_completed_window_stays_bounded(log: Log) -> None:
    """From a review: the audit's planted window takes handled records out of the middle of
    a partition; the count of handled records at its head that the room check keeps must
    not outlive them (it then took records still running for leaving: no bound)."""
    from assured.audit.planted import _HighestCompleted

    gate = asyncio.Event()

    async def handle(msg: Message) -> None:
        if msg.offset % 2:
            await gate.wait()

    async def scenario() -> None:
        window = _window_of(log, 8, handle, room=6, kind=_HighestCompleted)
        for record in _records(*(b"k%d" % i for i in range(6))):
            window._dispatch(record)
        await _until(lambda: window.unfinished == 3)  # 0, 2 and 4 handled; 1, 3, 5 run
        assert window._has_room()  # 6 in the window, 0 leaves it (at the head)
        window.prefix()  # takes 0, 2 and 4 out: 1, 3 and 5 are left, running
        window.room = 3
        assert not window._has_room()
        gate.set()
        await _until(lambda: window.unfinished == 0)

    asyncio.run(scenario())
