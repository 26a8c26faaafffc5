"""A database sink for records handled side by side (issue 14): async handlers await their
database calls, records share a transaction per step (a savepoint each), and under exactly-once
every record committed above its partition's stored position is marked done, so a restart never
repeats it. On the embedded engine, into SQLite and into a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from assured import App, Message, PostgresSink, SqliteSink
from assured.errors import ConfigError, UsageError
from assured.log import Log
from assured.runtime._handling import HandlerFailedError
from assured.runtime._settings import Guarantee
from assured.runtime._shared_db import NotAwaitedError
from assured.sinks import Sink, SinkUnavailableError
from tests.conftest import stop_when
from tests.sinks.conftest import read_all

GUARANTEES: list[Guarantee] = ["at-most-once", "at-least-once", "exactly-once"]
SCHEMAS = {
    "sqlite": "CREATE TABLE IF NOT EXISTS charges (id INTEGER PRIMARY KEY, k BLOB, v BLOB)",
    "postgres": "CREATE TABLE IF NOT EXISTS charges "
    "(id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, k BYTEA, v BYTEA)",
}


@dataclass
class Db:
    """One database for a test: a new sink on it each call, its INSERT, and a reader."""

    new: Callable[[], Sink]
    insert: str

    def charges(self) -> list[tuple[bytes, bytes]]:
        with self.new() as sink, sink.transaction() as tx:
            rows = tx.execute("SELECT k, v FROM charges ORDER BY id").fetchall()
        return [(bytes(k), bytes(v)) for k, v in rows]

    def count(self, sql: str) -> int:
        with self.new() as sink, sink.transaction() as tx:
            return int(tx.execute(sql).fetchone()[0])


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Db:
    if request.param == "sqlite":
        path = tmp_path / "effects.db"
        return Db(
            lambda: SqliteSink(path, schema=SCHEMAS["sqlite"]),
            "INSERT INTO charges (k, v) VALUES (?, ?)",
        )
    dsn = request.getfixturevalue("pg_dsn")
    return Db(
        lambda: PostgresSink(dsn, schema=SCHEMAS["postgres"]),
        "INSERT INTO charges (k, v) VALUES (%s, %s)",
    )


def fill(log: Log, n: int, keys: int = 10) -> list[str]:
    values = [f"m{i:04d}" for i in range(n)]
    with log.producer() as producer:
        for i, v in enumerate(values):
            producer.send("in", v.encode(), key=f"k{i % keys}".encode(), partition=i % 2)
        producer.flush()
    return values


def values_of(log: Log, topic: str) -> list[bytes]:
    return [r.value or b"" for r in read_all(log, topic)]


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_records_side_by_side_write_each_effect_once_in_key_order(
    log: Log, db: Db, guarantee: Guarantee
) -> None:
    values = fill(log, 300)
    app = App(log=log, group="g", guarantee=guarantee)
    rng = random.Random(7)
    in_flight = Counter[str]()
    most = 0

    @app.handler("in", sink=db.new(), concurrency=20)
    async def charge(msg: Message, tx: Any) -> None:
        nonlocal most
        in_flight["all"] += 1
        most = max(most, in_flight["all"])
        await asyncio.sleep(rng.random() * 0.01)  # the gateway, before the database
        in_flight["all"] -= 1
        await tx.execute(db.insert, (msg.key, msg.value))

    assert app.run(until_idle=0.5).processed == 300
    rows = db.charges()
    assert sorted(v.decode() for _, v in rows) == values  # each once
    assert most > 5  # the awaits overlapped
    # per key (each key lives in one partition), effects in offset order
    for key in {k for k, _ in rows}:
        mine = [v for k, v in rows if k == key]
        assert mine == sorted(mine)


def test_a_failed_attempts_writes_are_rolled_back_and_the_retry_writes_once(
    log: Log, db: Db
) -> None:
    values = fill(log, 60)
    app = App(log=log, group="g", guarantee="exactly-once")
    tries = Counter[bytes]()

    @app.handler("in", sink=db.new(), concurrency=8, backoff_ms=1)
    async def charge(msg: Message, tx: Any) -> None:
        await tx.execute(db.insert, (msg.key, msg.value))
        tries[msg.value] += 1
        await asyncio.sleep(0.001)
        if tries[msg.value] == 1:
            raise RuntimeError("the gateway timed out after the write")

    assert app.run(until_idle=0.5).processed == 60
    assert sorted(v.decode() for _, v in db.charges()) == values


def test_exactly_once_a_restart_never_repeats_a_record_committed_above_a_slow_one(
    log: Log, db: Db
) -> None:
    values = fill(log, 80)
    sink = db.new()
    first = App(log=log, group="g", guarantee="exactly-once")

    @first.handler("in", sink=sink, concurrency=10, retries=0, dead_letter=False, backoff_ms=1)
    async def stuck(msg: Message, tx: Any) -> None:
        if msg.offset == 3 and msg.partition == 0:  # the head of a partition fails for good
            await asyncio.sleep(0.3)  # while the records above it commit
            raise RuntimeError("the gateway is down")
        await tx.execute(db.insert, (msg.key, msg.value))

    with pytest.raises(HandlerFailedError):
        first.run(until_idle=2)
    before = db.charges()
    assert len(before) > 4  # records above the failed one committed, marked done
    assert db.count("SELECT count(*) FROM assured_done WHERE partition = 0") > 0

    second = App(log=log, group="g", guarantee="exactly-once")
    ran = Counter[bytes]()

    @second.handler("in", sink=db.new(), concurrency=10)
    async def charge(msg: Message, tx: Any) -> None:
        ran[msg.value] += 1
        await tx.execute(db.insert, (msg.key, msg.value))

    second.run(until_idle=0.5)
    after = db.charges()
    assert sorted(v.decode() for _, v in after) == values  # each effect exactly once
    assert not set(ran) & {v for _, v in before}  # nothing committed before ran again
    assert db.count("SELECT count(*) FROM assured_done") == 0  # below the stored positions
    assert db.count("SELECT sum(next_offset) FROM assured_offsets") == 80


def test_exactly_once_dead_letters_side_by_side_go_out_once(log: Log, db: Db) -> None:
    fill(log, 40)
    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", sink=db.new(), concurrency=8, retries=1, backoff_ms=1)
    async def charge(msg: Message, tx: Any) -> None:
        await tx.execute(db.insert, (msg.key, msg.value))
        if msg.value.endswith(b"7"):
            raise ValueError("refused by the gateway")

    assert app.run(until_idle=1).processed == 40
    assert sorted(v for _, v in db.charges()) == sorted(
        f"m{i:04d}".encode() for i in range(40) if i % 10 != 7
    )
    letters = values_of(log, "in.dlq")
    assert sorted(letters) == [f"m{i:04d}".encode() for i in range(40) if i % 10 == 7]


def test_side_by_side_with_a_sink_is_refused_where_it_cannot_work(log: Log, tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "s.db")
    app = App(log=log, group="g")

    def plain(msg: Message, db: Any) -> None: ...

    with pytest.raises(ConfigError, match="must be an async def"):
        app.handler("in", sink=sink, concurrency=4)(plain)

    async def fine(msg: Message, db: Any) -> None: ...

    app.handler("in", sink=sink, concurrency=4)(fine)
    with pytest.raises(ConfigError, match="into sinks must all be of one kind"):
        app.handler("other", sink=sink)(plain)
    app.handler("other", sink=sink)(fine)  # an async def awaits its db at concurrency 1 too


def test_db_connection_is_refused_side_by_side(log: Log, tmp_path: Path) -> None:
    fill(log, 2)
    app = App(log=log, group="g", guarantee="at-least-once")
    seen: list[str] = []

    @app.handler("in", sink=SqliteSink(tmp_path / "s.db"), concurrency=2, retries=0)
    async def raw(msg: Message, db: Any) -> None:
        try:
            db.connection  # noqa: B018
        except Exception as e:
            seen.append(str(e))

    app.run(until_idle=0.3)
    assert seen
    assert seen[0].startswith("db.connection: an async def handler's db is awaited"), seen[0]
    assert "await db.hold()" in seen[0]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_stop_gives_up_a_record_stuck_inside_its_database_work(
    log: Log, db: Db, concurrency: int
) -> None:
    """Past drain_timeout_ms a record still in its part of the transaction is rolled back to
    its savepoint; the others commit; the next run makes the stuck record's effect once. An
    async def at concurrency 1 goes by the same rules."""
    values = fill(log, 40)
    stuck = threading.Event()
    app = App(log=log, group="g", guarantee="exactly-once", drain_timeout_ms=500)

    @app.handler("in", sink=db.new(), concurrency=concurrency)
    async def charge(msg: Message, tx: Any) -> None:
        await tx.execute(db.insert, (msg.key, msg.value))
        if msg.partition == 1 and msg.offset == 7:
            stuck.set()
            await asyncio.sleep(120)  # holding the database: the others wait for it

    stop_when(app, stuck)
    began = time.monotonic()
    app.run(until_idle=30)
    assert time.monotonic() - began < 10
    assert b"m0015" not in {v for _, v in db.charges()}  # partition 1, offset 7: rolled back

    again = App(log=log, group="g", guarantee="exactly-once")

    @again.handler("in", sink=db.new(), concurrency=4)
    async def charge_again(msg: Message, tx: Any) -> None:
        await tx.execute(db.insert, (msg.key, msg.value))

    again.run(until_idle=0.5)
    assert sorted(v.decode() for _, v in db.charges()) == values


# -- from a hostile review of this feature: each failed before its fix ------------------------


def _one_partition(log: Log, n: int, start: int = 0) -> None:
    with log.producer() as producer:
        for i in range(start, start + n):
            producer.send("in", f"v{i}".encode(), key=f"k{i}".encode(), partition=0)
        producer.flush()


@pytest.mark.parametrize("guarantee", ["exactly-once", "at-most-once"])
def test_a_record_still_in_its_database_work_when_a_step_ends_is_committed_as_handled(
    log: Log, db: Db, guarantee: Guarantee
) -> None:
    """Its writes go into the step's commit, so it must count as handled there (marked, under
    exactly-once), not at the next commit: a rewind in between would make them again."""
    _one_partition(log, 4)
    app = App(log=log, group="g", guarantee=guarantee)
    broke: list[int] = []

    @app.handler("in", sink=db.new(), concurrency=4, ordering="unordered")
    async def charge(msg: Message, tx: Any) -> None:
        if msg.offset == 3 and not broke:
            await asyncio.sleep(0.05)
            await tx.execute(db.insert, (msg.key, msg.value))
            broke.append(1)
            raise SinkUnavailableError("simulated: the connection to the database broke")
        await tx.execute(db.insert, (msg.key, msg.value))
        if msg.offset == 2 and not broke:
            await asyncio.sleep(0.1)  # an API call after the write, across the step's end

    app.run(until_idle=1)
    assert sorted(v for _, v in db.charges()) == [b"v0", b"v1", b"v2", b"v3"]


def test_a_redo_rewinds_a_partition_that_has_no_stored_position_yet(log: Log, db: Db) -> None:
    _one_partition(log, 10)
    app = App(log=log, group="g", guarantee="exactly-once")
    broke: list[int] = []

    @app.handler("in", sink=db.new(), concurrency=4)
    async def charge(msg: Message, tx: Any) -> None:
        if msg.offset == 1 and not broke:
            broke.append(1)
            raise SinkUnavailableError("simulated: the connection to the database broke")
        await tx.execute(db.insert, (msg.key, msg.value))

    def more() -> None:
        time.sleep(1.5)
        _one_partition(log, 5, 10)

    threading.Thread(target=more).start()
    app.run(until_idle=2.5)
    assert sorted(int(v[1:]) for _, v in db.charges()) == list(range(15))


def test_db_used_after_the_handler_returned_is_refused(log: Log, db: Db) -> None:
    _one_partition(log, 20)
    app = App(log=log, group="g", guarantee="at-least-once")
    refused: list[str] = []

    @app.handler("in", sink=db.new(), concurrency=4)
    async def charge(msg: Message, tx: Any) -> None:
        await asyncio.sleep(0.005)
        await tx.execute(db.insert, (msg.key, msg.value))
        if msg.offset == 1:

            async def later() -> None:
                await asyncio.sleep(0)
                try:
                    await tx.execute(db.insert, (b"late", b"late"))
                except Exception as e:
                    refused.append(str(e))

            asyncio.ensure_future(later())  # noqa: RUF006 -- a handler's mistake, on purpose

    assert app.run(until_idle=0.5).processed == 20
    assert refused
    assert "after the handler returned" in refused[0]
    assert b"late" not in {v for _, v in db.charges()}


def test_a_db_call_never_awaited_stops_the_app_instead_of_losing_the_effect(
    log: Log, db: Db
) -> None:
    _one_partition(log, 5)
    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", sink=db.new(), concurrency=4)
    async def charge(msg: Message, tx: Any) -> None:
        tx.execute(db.insert, (msg.key, msg.value))  # no await: the statement never runs

    with pytest.raises(NotAwaitedError, match="never awaited"):
        app.run(until_idle=0.5)
    assert db.charges() == []
    assert db.count("SELECT count(*) FROM assured_offsets WHERE next_offset > 0") == 0


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_record_holding_the_database_past_its_limit_fails_and_the_others_go_on(
    log: Log, db: Db, concurrency: int
) -> None:
    """A call that never comes back, after the record's first write: every other record waits
    for the database. Past transaction_timeout_ms it is cancelled: its work rolls back, it
    fails with a TimeoutError and is retried; nothing else was held up for good. An async def
    at concurrency 1 goes by the same rules."""
    _one_partition(log, 20)
    app = App(log=log, group="g", guarantee="exactly-once", transaction_timeout_ms=1000)
    hung: list[int] = []

    @app.handler("in", sink=db.new(), concurrency=concurrency, backoff_ms=1)
    async def charge(msg: Message, tx: Any) -> None:
        await tx.execute(db.insert, (msg.key, msg.value))
        if msg.offset == 5 and not hung:
            hung.append(1)
            await asyncio.sleep(3600)  # holding the database

    began = time.monotonic()
    assert app.run(until_idle=1).processed == 20
    assert time.monotonic() - began < 15
    assert sorted(int(v[1:]) for _, v in db.charges()) == list(range(20))


@pytest.mark.postgres
@pytest.mark.parametrize(("awaited", "concurrency"), [(False, 1), (True, 1), (True, 4)])
def test_postgres_a_statement_error_swallowed_by_the_handler_fails_only_its_record(
    log: Log, pg_dsn: str, awaited: bool, concurrency: int
) -> None:
    """Catching a unique violation and going on leaves PostgreSQL's transaction aborted; its
    COMMIT would roll back every record of the batch. The record that swallowed it fails
    (retried, then dead-lettered); the others' effects commit. A plain def or an async def."""
    import psycopg

    _one_partition(log, 6)
    schema = "CREATE TABLE IF NOT EXISTS seen (k BYTEA PRIMARY KEY)"
    with PostgresSink(pg_dsn, schema=schema) as sink, sink.transaction() as tx:
        tx.execute("INSERT INTO seen VALUES (%s)", (b"k3",))  # k3 was handled before
    app = App(log=log, group="g", guarantee="at-least-once")

    async def remember(msg: Message, tx: Any) -> None:
        with contextlib.suppress(psycopg.errors.UniqueViolation):  # "already seen"...
            await tx.execute("INSERT INTO seen VALUES (%s)", (msg.key,))  # ...but now aborted

    def remember_plainly(msg: Message, tx: Any) -> None:
        with contextlib.suppress(psycopg.errors.UniqueViolation):
            tx.execute("INSERT INTO seen VALUES (%s)", (msg.key,))

    sink = PostgresSink(pg_dsn, schema=schema)
    handler = remember if awaited else remember_plainly
    app.handler("in", sink=sink, concurrency=concurrency, retries=1, backoff_ms=1)(handler)
    assert app.run(until_idle=0.5).processed == 6
    with PostgresSink(pg_dsn) as check, check.transaction() as tx:
        keys = sorted(bytes(r[0]) for r in tx.execute("SELECT k FROM seen").fetchall())
    assert keys == [b"k0", b"k1", b"k2", b"k3", b"k4", b"k5"]
    assert values_of(log, "in.dlq") == [b"v3"]


# -- from a second review ------------------------------------------------------------------


def _stop_after(app: App, seconds: float) -> None:
    def stop() -> None:
        time.sleep(seconds)
        app.stop()

    threading.Thread(target=stop, daemon=True).start()


def test_a_handler_that_swallows_its_cancellation_leaves_nothing_behind(log: Log, db: Db) -> None:
    """Given up at a stop, a handler that catches the CancelledError and returns must not keep
    its work: it would commit unmarked, and the next owner would make it again."""
    _one_partition(log, 20)

    def app(slow: bool) -> App:
        made = App(log=log, group="g", guarantee="exactly-once", drain_timeout_ms=500)

        @made.handler("in", sink=db.new(), concurrency=4, ordering="unordered")
        async def charge(msg: Message, tx: Any) -> None:
            await tx.execute(db.insert, (msg.key, msg.value))
            if slow and msg.offset == 3:
                with contextlib.suppress(asyncio.CancelledError):  # a library that swallows it
                    await asyncio.sleep(30)

        return made

    first = app(slow=True)
    _stop_after(first, 1.5)
    first.run(until_idle=10)
    app(slow=False).run(until_idle=0.5)
    values = [v for _, v in db.charges()]
    assert sorted(values) == sorted({f"v{i}".encode() for i in range(20)})  # each once


def test_db_calls_gathered_side_by_side_share_the_records_part(log: Log, db: Db) -> None:
    _one_partition(log, 10)
    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", sink=db.new(), concurrency=4, ordering="unordered")
    async def charge(msg: Message, tx: Any) -> None:
        await asyncio.sleep(0.001)
        await asyncio.gather(
            tx.execute(db.insert, (msg.key, msg.value)),
            tx.execute(db.insert, (msg.key, msg.value + b"+")),
        )

    assert app.run(until_idle=0.5).processed == 10
    assert len(db.charges()) == 20


def test_a_db_call_still_running_when_the_handler_returns_does_not_count(log: Log, db: Db) -> None:
    _one_partition(log, 4)
    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", sink=db.new(), concurrency=2)
    async def charge(msg: Message, tx: Any) -> None:
        asyncio.ensure_future(tx.execute(db.insert, (msg.key, msg.value)))  # noqa: RUF006

    with pytest.raises(NotAwaitedError, match="had not finished"):
        app.run(until_idle=0.5)


def test_a_db_call_cancelled_before_it_ran_is_not_a_missing_await(log: Log, db: Db) -> None:
    _one_partition(log, 4)
    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", sink=db.new(), concurrency=2)
    async def charge(msg: Message, tx: Any) -> None:
        task = asyncio.ensure_future(tx.execute(db.insert, (b"never", b"never")))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await tx.execute(db.insert, (msg.key, msg.value))

    assert app.run(until_idle=0.5).processed == 4
    assert sorted(v for _, v in db.charges()) == [b"v0", b"v1", b"v2", b"v3"]


@pytest.mark.parametrize(
    "statement",
    [
        "COMMIT",
        "ROLLBACK",
        " begin",
        "END",
        "/* a /* nested */ comment */ COMMIT",
        "-- a line comment ended by a CR\rCOMMIT",
        "ROLLBACK\n  AND CHAIN",
        "PREPARE TRANSACTION 'x'",
        "/* /* SQLite does not nest comments */ COMMIT",
    ],
)
def test_a_handler_may_not_end_its_transaction(log: Log, db: Db, statement: str) -> None:
    _one_partition(log, 3)
    app = App(log=log, group="g", guarantee="exactly-once")
    refused: list[str] = []

    @app.handler("in", sink=db.new(), concurrency=2, retries=0)
    async def charge(msg: Message, tx: Any) -> None:
        await tx.execute(db.insert, (msg.key, msg.value))
        try:
            await tx.execute(statement)
        except UsageError as e:
            refused.append(str(e))

    assert app.run(until_idle=0.5).processed == 3
    assert len(refused) == 3
    assert sorted(v for _, v in db.charges()) == [b"v0", b"v1", b"v2"]


def test_records_into_a_sink_leave_no_reference_cycles_behind(log: Log, tmp_path: Path) -> None:
    """Each record's db is freed with its task when the record ends. It was not: the task's
    context held the db and the db the task, a cycle per record that only the cyclic garbage
    collector freed, in full collections that grew with the records in flight."""
    import gc

    fill(log, 200)
    app = App(log=log, group="g", guarantee="exactly-once")
    sink = SqliteSink(tmp_path / "s.db", schema=SCHEMAS["sqlite"])

    @app.handler("in", sink=sink, concurrency=8)
    async def charge(msg: Message, db: Any) -> None:
        await db.execute("INSERT INTO charges (k, v) VALUES (?, ?)", (msg.key, msg.value))

    gc.collect()
    gc.disable()
    try:
        assert app.run(until_idle=0.3).processed == 200
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left["RecordDb"] == 0, left.most_common(10)
    assert left["Task"] < 20, left.most_common(10)
