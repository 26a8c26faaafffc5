"""SQLite ends a transaction by itself on some errors (a full disk, an I/O error): what a
handler or the sink does next must not run outside it, where each statement commits alone."""

from __future__ import annotations

import contextlib
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from assured import App, Message, SqliteSink, TopicPartition, open_log
from assured.log import Log
from assured.runtime._settings import Guarantee
from assured.sinks import SinkUnavailableError
from tests.conftest import stop_when
from tests.sinks.conftest import charges_log


def rows(path: Path) -> tuple[list[str], list[int], list[tuple[str, int, int]]]:
    with sqlite3.connect(path) as db:
        effects = sorted(r[0][:3] for r in db.execute("SELECT v FROM t"))
        letters = sorted(r[0] for r in db.execute("SELECT source_offset FROM assured_dead_letters"))
        offsets = list(db.execute("SELECT topic, partition, next_offset FROM assured_offsets"))
    return effects, letters, offsets


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_full_disk_is_the_databases_failure_and_commits_nothing(
    tmp_path: Path, guarantee: Guarantee
) -> None:
    """Old code: the disk filled up at m2's insert; SQLite rolled the whole transaction back,
    then m2's retries met "no such savepoint" and were dead-lettered, and the dead letters and
    the positions were written with no transaction open (each committed alone): m0 and m1's
    effects were lost, positions stored past them. Now the batch is redone once the database
    takes writes again, every effect once, nothing dead-lettered."""
    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        admin.create_topic("in", 1)
        admin.create_topic("in.dlq", 1)
    with log.producer() as producer:
        for i in range(4):
            producer.send("in", f"m{i}".encode())
        producer.flush()
    sink = SqliteSink(str(tmp_path / "sink.db"))
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE t (v TEXT)")
    full = Counter[str]()
    app = App(log=log, group="g", guarantee=guarantee)

    @app.handler("in", sink=sink, retries=1, backoff_ms=1)
    def book(msg: Message, db: Any) -> None:
        if msg.value == b"m2" and not full["once"]:
            full["once"] += 1  # the disk fills up, once: the file may not grow
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count={pages}")
        elif full["once"]:
            db.execute("PRAGMA max_page_count=1073741823")  # room again
        db.execute("INSERT INTO t VALUES (?)", (msg.value.decode() + "x" * 20_000,))

    app.run(until_idle=0.5)
    effects, letters, _ = rows(tmp_path / "sink.db")
    assert effects == ["m0x", "m1x", "m2x", "m3x"]
    assert letters == []
    with log.admin() as admin:
        assert admin.committed_offsets("g", ["in"]).get(TopicPartition("in", 0)) == 4


def test_nothing_runs_after_sqlite_ended_the_transaction(tmp_path: Path) -> None:
    sink = SqliteSink(str(tmp_path / "sink.db"))
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE t (v TEXT)")
    with sink, pytest.raises(SinkUnavailableError, match="rolled"), sink.transaction() as tx:  # noqa: PT012
        tx.execute("INSERT INTO t VALUES ('a')")
        with sink._own():  # a handler's ROLLBACK is refused: this is SQLite's own
            tx.connection.rollback()  # as SQLite does on SQLITE_FULL
        tx.execute("INSERT INTO t VALUES ('b')")  # would commit alone
    with sqlite3.connect(tmp_path / "sink.db") as db:
        assert list(db.execute("SELECT v FROM t")) == []


def test_a_handler_that_swallows_the_end_and_writes_on_the_raw_connection_commits_nothing(
    tmp_path: Path,
) -> None:
    """SQLite ended the transaction (a full disk); the handler catches the error and goes on
    through ``db.connection``, the raw connection. Old code: that statement ran with no
    transaction open and committed at once, while the batch was redone: its effect twice.
    Now the sink opens a transaction again as soon as it sees the end, so what follows runs
    inside it, and it is rolled back with the batch."""
    sink = SqliteSink(str(tmp_path / "sink.db"))
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE t (v TEXT)")
    with sink, pytest.raises(SinkUnavailableError, match="rolled"), sink.transaction() as tx:  # noqa: PT012
        tx.execute("INSERT INTO t VALUES ('a')")
        pages = tx.execute("PRAGMA page_count").fetchone()[0]
        tx.execute(f"PRAGMA max_page_count={pages}")
        try:
            for _ in range(50):  # until the disk is full and SQLite gives the transaction up
                tx.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,))
        except SinkUnavailableError:
            pass  # swallowed, as a careless handler would
        tx.connection.execute("PRAGMA max_page_count=1073741823")
        tx.connection.execute("INSERT INTO t VALUES ('after')")  # the raw connection
    with sqlite3.connect(tmp_path / "sink.db") as db:
        assert list(db.execute("SELECT v FROM t")) == []


def _or_rollback(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT OR ROLLBACK INTO u VALUES (1)")  # u holds 1: SQLite rolls back


def _trigger(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO guarded VALUES (1)")  # its trigger: RAISE(ROLLBACK, ...)


# The handler's raw write after SQLite ended the transaction, each by another path.
AFTER = {
    "execute": lambda conn: conn.execute("INSERT INTO t VALUES ('after')"),
    # The same text as the handler's own earlier statement: Python's sqlite3 reuses the
    # statement it prepared inside the transaction, and SQLite's authorizer is not asked again.
    "cached": lambda conn: conn.execute("INSERT INTO t VALUES (?)", ("after",)),
    "executemany": lambda conn: conn.executemany("INSERT INTO t VALUES (?)", [("after",)]),
    "script": lambda conn: conn.executescript("INSERT INTO t VALUES ('after');"),
    "cursor": lambda conn: conn.cursor().execute("INSERT INTO t VALUES ('after')"),
    "cursor-factory": lambda conn: conn.cursor(factory=_OwnCursor).execute(
        "INSERT INTO t VALUES ('after')"
    ),
    "cte": lambda conn: conn.execute("WITH a(v) AS (SELECT 'after') INSERT INTO t SELECT v FROM a"),
}


class _OwnCursor(sqlite3.Cursor):
    """A library's own cursor class."""


def _fixture(path: Path) -> SqliteSink:
    sink = SqliteSink(str(path))
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE t (v TEXT)")
        tx.execute("CREATE TABLE u (k INTEGER PRIMARY KEY)")
        tx.execute("INSERT INTO u VALUES (1)")
        tx.execute("CREATE TABLE guarded (k INTEGER)")
        tx.execute(
            "CREATE TRIGGER no_guarded BEFORE INSERT ON guarded "
            "BEGIN SELECT RAISE(ROLLBACK, 'refused by a trigger'); END"
        )
    return sink


@pytest.mark.parametrize("after", sorted(AFTER))
@pytest.mark.parametrize("end", [_or_rollback, _trigger], ids=["or-rollback", "trigger"])
def test_a_raw_write_after_sqlite_ended_the_transaction_itself_commits_nothing(
    tmp_path: Path, end: Any, after: str
) -> None:
    """A handler's own raw statement makes SQLite end the transaction (``INSERT OR
    ROLLBACK`` on a conflict, ``RAISE(ROLLBACK)`` in a trigger); the handler catches the
    error and writes on through ``db.connection``, with no ``db.execute`` between. Old code:
    that write ran with no transaction open and committed at once, while the batch was
    redone: its effect twice under exactly-once. Now no statement runs on the connection
    after such an end, by any path, and nothing of the transaction commits."""
    sink = _fixture(tmp_path / "sink.db")
    with sink, pytest.raises(SinkUnavailableError, match="rolled"), sink.transaction() as tx:  # noqa: PT012
        conn = tx.connection
        conn.execute("INSERT INTO t VALUES (?)", ("before",))
        with pytest.raises(sqlite3.IntegrityError):
            end(conn)
        try:
            AFTER[after](conn)
        except SinkUnavailableError:
            pass  # swallowed, as a careless handler would
        else:
            pytest.fail("the raw write ran after the transaction's end")
    with sqlite3.connect(tmp_path / "sink.db") as db:
        assert list(db.execute("SELECT v FROM t")) == []


def test_a_blob_written_after_sqlite_ended_the_transaction_commits_nothing(tmp_path: Path) -> None:
    sink = _fixture(tmp_path / "sink.db")
    with sink, sink.transaction() as tx:
        tx.execute("INSERT INTO t VALUES ('.....')")
    with sink, pytest.raises(SinkUnavailableError, match="rolled"), sink.transaction() as tx:  # noqa: PT012
        conn = tx.connection
        with pytest.raises(sqlite3.IntegrityError):
            _or_rollback(conn)
        with contextlib.suppress(SinkUnavailableError), conn.blobopen("t", "v", 1) as blob:
            blob.write(b"after")
    with sqlite3.connect(tmp_path / "sink.db") as db:
        assert list(db.execute("SELECT v FROM t")) == [(".....",)]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_an_app_whose_handler_writes_on_after_a_trigger_rolled_back_keeps_exactly_once(
    tmp_path: Path, concurrency: int
) -> None:
    """The whole runtime, exactly-once: at one record a trigger rolls the transaction back;
    the handler catches it and records the refusal on the raw connection. Old code: that row
    committed alone, then the batch was redone and wrote it again. Now every effect is there
    once, each with its position."""
    log = _filled(tmp_path, 8)
    sink = _fixture(tmp_path / "sink.db")
    tried: list[bytes] = []
    app = App(log=log, group="g", guarantee="exactly-once")

    def effect(msg: Message, conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))
        if msg.value == b"5" and not tried:  # once: the redo goes through
            tried.append(msg.value)
            try:
                _trigger(conn)
            except sqlite3.IntegrityError:
                with contextlib.suppress(SinkUnavailableError):
                    conn.execute("INSERT INTO t VALUES ('refused')")

    _on_raw_connection(app, sink, concurrency, effect)

    assert app.run(until_idle=0.5).stopped_by == "idle"
    with sqlite3.connect(tmp_path / "sink.db") as db:
        made = sorted(r[0] for r in db.execute("SELECT v FROM t"))
    assert made == [str(i) for i in range(8)], "each effect once, and no stray write"
    with log.admin() as admin:
        assert admin.committed_offsets("g", ["in"]).get(TopicPartition("in", 0)) == 8


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_handler_that_closes_the_sqlite_connection_stops_the_app_and_commits_nothing(
    tmp_path: Path, concurrency: int
) -> None:
    """Old code: ``db.connection.close()`` rolled the transaction back and failed the record
    (retried, then dead-lettered) with a closed connection under the rest of the batch. It is
    refused now, and the App stops: a library that closes it would do so for every record."""
    from assured.sinks import HandlerEndedTransactionError

    log = _filled(tmp_path, 4)
    sink = _fixture(tmp_path / "sink.db")
    app = App(log=log, group="g", guarantee="exactly-once")

    def effect(msg: Message, conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))
        if msg.value == b"2":
            with contextlib.suppress(sqlite3.Error, HandlerEndedTransactionError):
                conn.close()

    _on_raw_connection(app, sink, concurrency, effect)

    with pytest.raises(HandlerEndedTransactionError, match=r"connection.close\(\)"):
        app.run(until_idle=0.5)
    with sqlite3.connect(tmp_path / "sink.db") as db:
        made = sorted(r[0] for r in db.execute("SELECT v FROM t"))
        stored = db.execute("SELECT coalesce(sum(next_offset), 0) FROM assured_offsets")
        assert len(made) == stored.fetchone()[0]
    assert "2" not in made


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_record_whose_statement_rolls_back_every_time_stops_the_app_saying_why(
    tmp_path: Path, guarantee: Guarantee
) -> None:
    """A trigger's RAISE(ROLLBACK) ends the whole batch's transaction at the same record on
    every redo. Old code: the App redid it until the deadline, then stopped saying the disk
    might be full. Now it names the statement's kind and the fix; nothing was committed."""
    log = _filled(tmp_path, 4)
    sink = _fixture(tmp_path / "sink.db")
    app = App(log=log, group="g", guarantee=guarantee, retry_deadline_ms=1000)

    @app.handler("in", sink=sink)
    def handle(msg: Message, db: Any) -> None:
        db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))
        if msg.value == b"2":
            _trigger(db)

    with pytest.raises(Exception, match=r"RAISE\(ROLLBACK\).*RAISE\(ABORT\)") as raised:
        app.run(until_idle=5)
    assert "refused by a trigger" in str(raised.value)
    assert "disk" not in str(raised.value)
    with sqlite3.connect(tmp_path / "sink.db") as db:
        assert list(db.execute("SELECT v FROM t")) == []


def _filled(tmp_path: Path, n: int) -> Log:
    """An embedded log whose one-partition topic ``in`` holds b"0" .. b"n-1"."""
    return charges_log(tmp_path, n, topic="in")


def _on_raw_connection(app: App, sink: SqliteSink, concurrency: int, effect: Any) -> None:
    """``effect(msg, conn)`` as the handler of ``in``, on the sink's raw connection: a sync
    handler at concurrency 1, an async one side by side (``db.hold()``) above it."""
    if concurrency == 1:

        @app.handler("in", sink=sink)
        def handle(msg: Message, db: Any) -> None:
            effect(msg, db.connection)

    else:

        @app.handler("in", sink=sink, concurrency=concurrency)
        async def handle_side_by_side(msg: Message, db: Any) -> None:
            effect(msg, (await db.hold()).connection)


def test_at_most_once_a_stop_does_not_wait_out_a_database_that_stays_away(tmp_path: Path) -> None:
    """From a review: at most once each record into a sink is its own transaction, and a
    database that stays away is waited for (retry_deadline_ms, 30 s) record after record. A
    stop waited that out for every record of the batch (236 s for 8 of them). Past the drain's
    end the records left are given up (lost, as this guarantee allows, and said so)."""
    import threading
    import time

    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        admin.create_topic("in", 1)
    with log.producer() as producer:
        for i in range(12):
            producer.send("in", f"m{i:02d}".encode())
        producer.flush()
    schema = [
        "CREATE TABLE IF NOT EXISTS t (v TEXT)",
        "CREATE TABLE IF NOT EXISTS u (id INTEGER PRIMARY KEY)",
        "INSERT OR IGNORE INTO u VALUES (1)",
    ]
    failing = threading.Event()
    app = App(log=log, group="g", guarantee="at-most-once", drain_timeout_ms=500)

    @app.handler("in", sink=SqliteSink(tmp_path / "s.db", schema=schema))
    def write(msg: Message, db: Any) -> None:
        db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))
        if msg.value >= b"m02":
            failing.set()
            db.execute("INSERT OR ROLLBACK INTO u VALUES (1)")  # SQLite ends the transaction

    stop_when(app, failing, after_s=0.5)
    began = time.monotonic()
    assert app.run(until_idle=60).stopped_by == "stop"
    assert time.monotonic() - began < 10
    with sqlite3.connect(tmp_path / "s.db") as db:
        assert sorted(v for (v,) in db.execute("SELECT v FROM t")) == ["m00", "m01"]
