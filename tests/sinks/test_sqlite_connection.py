"""What a handler does with the SQLite sink's raw connection (``db.connection``) must never
commit an effect without its position, nor change what the runtime's own statements read.
Each test here failed on the code before the connection checked its statements (a hostile
read's findings); tests/sinks/test_sqlite_rolled_back.py holds SQLite's own rollbacks."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from assured import App, Message, SqliteSink, TopicPartition, open_log
from assured.errors import UsageError
from assured.log import Log
from assured.sinks import HandlerEndedTransactionError, StrayStatementError
from assured.sinks.sqlite import CursorLeftOpenError


def _log(tmp_path: Path, n: int) -> Log:
    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        admin.create_topic("in", 1)
        admin.create_topic("in.dlq", 1)
    with log.producer() as producer:
        for i in range(n):
            producer.send("in", b"%d" % i, key=b"k%d" % i)
        producer.flush()
    return log


def _sink(tmp_path: Path) -> SqliteSink:
    sink = SqliteSink(str(tmp_path / "sink.db"))
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE t (v TEXT)")
        tx.execute("CREATE TABLE u (k INTEGER PRIMARY KEY)")
        tx.execute("INSERT INTO u VALUES (1)")
    return sink


def _state(tmp_path: Path) -> tuple[Counter[str], list[int], int | None]:
    with contextlib.closing(sqlite3.connect(tmp_path / "sink.db")) as db:
        effects = Counter(r[0] for r in db.execute("SELECT v FROM t"))
        letters = [r[0] for r in db.execute("SELECT source_offset FROM assured_dead_letters")]
        stored = db.execute("SELECT max(next_offset) FROM assured_offsets").fetchone()[0]
    return effects, sorted(letters), stored


def test_a_returned_returning_cursor_keeps_nothing_of_a_failed_attempt(tmp_path: Path) -> None:
    """Old code: a handler that returned its ``INSERT ... RETURNING`` cursor (a one-line
    lambda) kept the statement in progress; SQLite refused the record's RELEASE, the record
    failed without being rolled back to its savepoint (when a commit then landed, the rows of
    every attempt committed beside its dead letter), and here every record was dead-lettered
    and no commit landed until the App stopped. The cursor is dropped before the savepoint
    ends now."""
    log, sink = _log(tmp_path, 4), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")
    app.handler("in", sink=sink)(
        lambda msg, db: db.execute("INSERT INTO t VALUES (?) RETURNING v", (msg.value.decode(),))
    )
    assert app.run(until_idle=0.5).stopped_by == "idle"
    assert _state(tmp_path) == (Counter({"0": 1, "1": 1, "2": 1, "3": 1}), [], 4)


def test_a_failed_handlers_unread_returning_cursor_fails_that_record_alone(tmp_path: Path) -> None:
    """The cursor is left unread in the failed handler's frame, which the error's traceback
    holds. Old code: RELEASE failed, then every later SAVEPOINT, and records that never
    raised were dead-lettered too. Now only the record that raised is."""
    log, sink = _log(tmp_path, 4), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", sink=sink, retries=1, backoff_ms=1)
    def handle(msg: Message, db: Any) -> None:
        cursor = db.execute("INSERT INTO t VALUES (?) RETURNING v", (msg.value.decode(),))
        if msg.value == b"2":
            raise ValueError(f"declined, {cursor} unread")

    assert app.run(until_idle=0.5).stopped_by == "idle"
    assert _state(tmp_path) == (Counter({"0": 1, "1": 1, "3": 1}), [2], 4)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_returning_cursor_kept_past_the_handler_is_closed_with_its_part(
    tmp_path: Path, concurrency: int
) -> None:
    """Old code: every commit failed on the statement in progress, and after the deadline
    the App stopped saying the disk might be full. The cursors made in a handler's part are
    closed when it ends now: the records commit, and a kept cursor cannot write later."""
    log, sink = _log(tmp_path, 4), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")
    kept: list[Any] = []
    later: list[str] = []

    def effect(msg: Message, conn: Any) -> None:
        if kept:  # the cursor an earlier record kept
            try:
                kept[-1].execute("INSERT INTO t VALUES ('later')")
            except sqlite3.ProgrammingError as e:
                later.append(str(e))
        kept.append(conn.execute("INSERT INTO t VALUES (?) RETURNING v", (msg.value.decode(),)))

    if concurrency == 1:
        app.handler("in", sink=sink)(effect)
    else:

        @app.handler("in", sink=sink, concurrency=concurrency)
        async def side_by_side(msg: Message, db: Any) -> None:
            effect(msg, await db.hold())

    assert app.run(until_idle=0.5).stopped_by == "idle"
    assert _state(tmp_path) == (Counter({"0": 1, "1": 1, "2": 1, "3": 1}), [], 4)
    assert len(later) == 3
    assert all("closed cursor" in e for e in later)


def test_a_returning_cursor_made_by_hand_and_kept_stops_the_app_saying_why(
    tmp_path: Path,
) -> None:
    """A cursor made with ``sqlite3.Cursor(conn)`` is beyond the sink's reach: one left
    unread stops the App with what to do, and nothing of the transaction commits."""
    log, sink = _log(tmp_path, 4), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once", retry_deadline_ms=2000)
    kept: list[Any] = []

    @app.handler("in", sink=sink)
    def handle(msg: Message, db: Any) -> None:
        cursor = sqlite3.Cursor(db.connection)
        kept.append(cursor.execute("INSERT INTO t VALUES (?) RETURNING v", (msg.value.decode(),)))

    with pytest.raises(CursorLeftOpenError, match=r"sqlite3\.Cursor\(conn\).*fetchall\(\)"):
        app.run(until_idle=0.5)
    assert _state(tmp_path) == (Counter(), [], None)


def test_the_handlers_text_factory_does_not_change_what_the_runtime_reads(
    tmp_path: Path,
) -> None:
    """Old code: a handler's ``text_factory = bytes`` (to read legacy TEXT) stayed on the
    connection, so the runtime read its records marked done as bytes, matched none of them
    after a redo, and handled them again: effects twice. The handlers' settings apply in
    their own parts now, and are kept for them from one record to the next."""
    log, sink = _log(tmp_path, 8), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")
    tried: list[int] = []
    seen: list[Any] = []

    @app.handler("in", sink=sink, concurrency=4, ordering="key")
    async def handle(msg: Message, db: Any) -> None:
        value = msg.value.decode()
        if value in ("0", "7"):
            await asyncio.sleep(1.0 if value == "0" else 0.5)  # those after it commit first
        tx = await db.hold()
        conn = tx.connection
        if value == "1":
            conn.text_factory = bytes
        seen.append(type(conn.execute("SELECT 'x'").fetchone()[0]))
        conn.execute("INSERT INTO t VALUES (?)", (value,))
        if value == "7" and not tried:  # SQLite ends the transaction once: a redo
            tried.append(1)
            with contextlib.suppress(sqlite3.IntegrityError):
                conn.execute("INSERT OR ROLLBACK INTO u VALUES (1)")
            tx.execute("SELECT 1")  # raises: the sink saw the end

    assert app.run(until_idle=1.0).stopped_by == "idle"
    effects, letters, stored = _state(tmp_path)
    assert effects == Counter({str(i): 1 for i in range(8)})
    assert (letters, stored) == ([], 8)
    assert bytes in seen  # the handlers' own setting held for them


def test_the_handlers_row_factory_does_not_break_dead_letters(tmp_path: Path) -> None:
    """Old code: a handler's dict ``row_factory`` (the sqlite3 docs' recipe) stayed on the
    connection, and the next dead letter stopped the App with a KeyError."""
    log, sink = _log(tmp_path, 6), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")

    def as_dict(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
        return {d[0]: v for d, v in zip(cursor.description, row, strict=True)}

    @app.handler("in", sink=sink, retries=1, backoff_ms=1)
    def handle(msg: Message, db: Any) -> None:
        conn = db.connection
        conn.row_factory = as_dict
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
        conn.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))
        if msg.value == b"3":
            raise ValueError("declined")

    assert app.run(until_idle=0.5).stopped_by == "idle"
    assert _state(tmp_path) == (Counter({"0": 1, "1": 1, "2": 1, "4": 1, "5": 1}), [3], 6)


def test_a_handler_that_replaces_the_authorizer_stops_the_app(tmp_path: Path) -> None:
    """Old code: ``set_authorizer(None)`` took the sink's refusal of COMMIT away; the
    handler's ``commit()`` then committed effects without positions (each twice after the
    redo)."""
    log, sink = _log(tmp_path, 4), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", sink=sink)
    def handle(msg: Message, db: Any) -> None:
        conn = db.connection
        conn.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))
        with contextlib.suppress(HandlerEndedTransactionError):
            conn.set_authorizer(None)
        conn.commit()

    with pytest.raises(HandlerEndedTransactionError, match=r"set_authorizer"):
        app.run(until_idle=0.5)
    assert _state(tmp_path) == (Counter(), [], None)


def test_rows_made_after_the_end_in_executemanys_own_generator_commit_nothing(
    tmp_path: Path,
) -> None:
    """The code that makes executemany's rows ends the transaction (a swallowed INSERT OR
    ROLLBACK). Old code: checked once before it began, the rows after it committed alone."""
    sink = _sink(tmp_path)

    def rows(conn: sqlite3.Connection) -> Any:
        yield ("a",)
        with contextlib.suppress(sqlite3.IntegrityError):
            conn.execute("INSERT OR ROLLBACK INTO u VALUES (1)")
        yield ("b",)

    with sink, pytest.raises(Exception, match="rolled"), sink.transaction() as tx:  # noqa: PT012
        conn = tx.connection
        conn.executemany("INSERT INTO t VALUES (?)", rows(conn))
    assert _state(tmp_path)[0] == Counter()


def test_a_write_from_a_task_left_running_after_its_handler_does_not_run(tmp_path: Path) -> None:
    """Old code: a task a handler left running wrote on the connection from ``db.hold()``
    after the group commit, with no transaction open: the rows committed alone."""
    log, sink = _log(tmp_path, 4), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")
    late: list[BaseException | None] = []

    async def later(conn: sqlite3.Connection, value: str) -> None:
        await asyncio.sleep(0.3)
        try:
            conn.execute("INSERT INTO t VALUES (?)", (value + "-late",))
            late.append(None)
        except UsageError as e:
            late.append(e)

    tasks: list[asyncio.Task[None]] = []

    @app.handler("in", sink=sink, concurrency=4)
    async def handle(msg: Message, db: Any) -> None:
        conn = (await db.hold()).connection
        conn.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))
        tasks.append(asyncio.create_task(later(conn, msg.value.decode())))

    assert app.run(until_idle=1.0).stopped_by == "idle"
    assert len(late) == 4
    assert all(isinstance(e, UsageError) and "outside" in str(e) for e in late)
    assert _state(tmp_path) == (Counter({"0": 1, "1": 1, "2": 1, "3": 1}), [], 4)


def test_a_cursor_factory_that_is_not_a_class_is_refused_clearly(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    with sink, sink.transaction() as tx:

        def made(conn: sqlite3.Connection) -> sqlite3.Cursor:
            return sqlite3.Cursor(conn)

        with pytest.raises(UsageError, match=r"subclass of sqlite3\.Cursor"):
            tx.connection.cursor(factory=made)

        class Own(sqlite3.Cursor):
            pass

        assert isinstance(tx.connection.cursor(factory=Own), Own)


def test_the_raw_paths_rollback_is_named_when_the_app_stops(tmp_path: Path) -> None:
    """Old code: an INSERT OR ROLLBACK through the raw connection, its error re-raised,
    stopped the App saying the disk might be full."""
    log, sink = _log(tmp_path, 4), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once", retry_deadline_ms=1000)

    @app.handler("in", sink=sink)
    def handle(msg: Message, db: Any) -> None:
        db.connection.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))
        if msg.value == b"2":
            db.connection.execute("INSERT OR ROLLBACK INTO u VALUES (1)")

    with pytest.raises(Exception, match=r"UNIQUE constraint.*OR ROLLBACK") as raised:
        app.run(until_idle=5)
    assert "disk" not in str(raised.value)
    with log.admin() as admin:
        assert admin.committed_offsets("g", ["in"]).get(TopicPartition("in", 0)) is None
    assert _state(tmp_path) == (Counter(), [], None)


def test_a_cursor_left_in_a_chained_errors_frames_fails_only_its_record(tmp_path: Path) -> None:
    """A helper leaves its RETURNING cursor unread and raises; the handler wraps the error
    (``raise ... from e``), so the helper's frame hangs off ``__cause__``. Freeing the
    error's own frames did not reach it and the App stopped; the part's cursors are closed
    now, whatever holds them."""
    log, sink = _log(tmp_path, 4), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")

    def charge(db: Any, value: str) -> None:
        cursor = db.execute("INSERT INTO t VALUES (?) RETURNING v", (value,))
        if value == "2":
            raise ValueError(f"declined with {cursor} unread")

    @app.handler("in", sink=sink, retries=1, backoff_ms=1)
    def handle(msg: Message, db: Any) -> None:
        try:
            charge(db, msg.value.decode())
        except ValueError as e:
            raise RuntimeError("wrapped") from e

    assert app.run(until_idle=0.5).stopped_by == "idle"
    assert _state(tmp_path) == (Counter({"0": 1, "1": 1, "3": 1}), [2], 4)


def test_a_record_cut_short_with_a_cursor_unread_fails_alone(tmp_path: Path) -> None:
    """Side by side, a record holds the database past ``transaction_timeout_ms`` with its
    RETURNING cursor unread: it is cancelled and fails alone (its error has no traceback to
    free). Old code after the first fix: the App stopped."""
    log, sink = _log(tmp_path, 3), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once", transaction_timeout_ms=1000)

    @app.handler("in", sink=sink, concurrency=2, retries=0)
    async def handle(msg: Message, db: Any) -> None:
        tx = await db.hold()
        cursor = tx.execute("INSERT INTO t VALUES (?) RETURNING v", (msg.value.decode(),))
        if msg.value == b"1":
            await asyncio.sleep(5)  # cancelled here, the cursor unread in the frame
        assert cursor is not None

    assert app.run(until_idle=1.0).stopped_by == "idle"
    assert _state(tmp_path) == (Counter({"0": 1, "2": 1}), [1], 3)


def test_a_task_a_failed_record_left_running_writes_nothing_into_anothers_part(
    tmp_path: Path,
) -> None:
    """Record 1 writes, starts a task that keeps its connection, and fails (dead-lettered).
    The task writes while record 0 holds the shared transaction. Old code: that write
    committed with record 0, the effect of a record counted as failed."""
    log, sink = _log(tmp_path, 4), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")
    refused: list[BaseException] = []

    async def later(conn: sqlite3.Connection, value: str) -> None:
        await asyncio.sleep(0.05)  # record 0 holds the transaction now
        try:
            conn.execute("INSERT INTO t VALUES (?)", (value + "-stray",))
        except UsageError as e:
            refused.append(e)

    strays: list[asyncio.Task[None]] = []

    @app.handler("in", sink=sink, concurrency=4, retries=0)
    async def handle(msg: Message, db: Any) -> None:
        value = msg.value.decode()
        if value != "1":
            await asyncio.sleep(0.01)
        conn = (await db.hold()).connection
        conn.execute("INSERT INTO t VALUES (?)", (value,))
        if value == "0":
            await asyncio.sleep(0.2)
        if value == "1":
            strays.append(asyncio.create_task(later(conn, value)))
            raise ValueError("declined")

    assert app.run(until_idle=1.0).stopped_by == "idle"
    assert _state(tmp_path) == (Counter({"0": 1, "2": 1, "3": 1}), [1], 4)
    assert len(refused) == 1
    assert "after its attempt ended" in str(refused[0])


def test_a_handlers_own_savepoint_keeps_its_row_and_text_factories(tmp_path: Path) -> None:
    log, sink = _log(tmp_path, 2), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")
    seen: list[tuple[str, Any]] = []

    @app.handler("in", sink=sink)
    def handle(msg: Message, db: Any) -> None:
        conn = db.connection
        if msg.value == b"0":  # set once, on the first record
            conn.row_factory, conn.text_factory = sqlite3.Row, bytes
        with db.savepoint():  # an optional part of the handler's own
            seen.append(("inside", conn.execute("SELECT 'x' AS a").fetchone()["a"]))
        seen.append(("after", conn.execute("SELECT 'x' AS a").fetchone()["a"]))
        conn.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))

    assert app.run(until_idle=0.5).stopped_by == "idle"
    assert seen == [("inside", b"x"), ("after", b"x")] * 2
    assert _state(tmp_path) == (Counter({"0": 1, "1": 1}), [], 2)


def test_a_transaction_used_after_its_block_is_refused_and_the_sink_goes_on(
    tmp_path: Path,
) -> None:
    """Old code: it said SQLite had rolled back what had committed, and left a transaction
    open under the sink, so that every later one failed."""
    sink = _sink(tmp_path)
    with sink:
        with sink.transaction() as tx:
            tx.execute("INSERT INTO t VALUES ('a')")
        with pytest.raises(UsageError, match="used after its block"):
            tx.execute("INSERT INTO t VALUES ('late')")
        with sink.transaction() as again:
            again.execute("INSERT INTO t VALUES ('b')")
    assert _state(tmp_path)[0] == Counter({"a": 1, "b": 1})


def test_tasks_a_record_starts_and_awaits_write_in_its_own_part(tmp_path: Path) -> None:
    """The other side of the check above: code of the record's own, in tasks it starts and
    awaits (gather), writes on the raw connection as the record itself does."""
    log, sink = _log(tmp_path, 4), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")

    async def write(conn: sqlite3.Connection, value: str) -> None:
        await asyncio.sleep(0)
        conn.execute("INSERT INTO t VALUES (?)", (value,))

    @app.handler("in", sink=sink, concurrency=4)
    async def handle(msg: Message, db: Any) -> None:
        conn = (await db.hold()).connection
        value = msg.value.decode()
        await asyncio.gather(write(conn, value), write(conn, value + "+"))

    assert app.run(until_idle=0.5).stopped_by == "idle"
    expected = Counter({f"{i}{suffix}": 1 for i in range(4) for suffix in ("", "+")})
    assert _state(tmp_path) == (expected, [], 4)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_failed_records_task_writes_nothing_through_the_transaction_either(
    tmp_path: Path, concurrency: int
) -> None:
    """A failed record's task keeps ``execute`` of the transaction ``db.hold()`` gave, and
    writes later, through it and through the raw connection. Old code (where an async def at
    concurrency 1 was given the batch's transaction itself): its writes through the
    transaction passed, between parts and in the next record's part, and committed with the
    batch."""
    log, sink = _log(tmp_path, 3), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")
    tried: list[str] = []

    async def later(execute: Any, conn: sqlite3.Connection) -> None:
        for _ in range(3):  # between parts and in the later records' parts
            await asyncio.sleep(0.005)
            for how, run in (("db", execute), ("raw", conn.execute)):
                try:
                    run("INSERT INTO t VALUES (?)", (f"stray-{how}",))
                    tried.append(f"{how}: ran")
                except UsageError:
                    tried.append(f"{how}: refused")

    strays: list[asyncio.Task[None]] = []

    async def effect(msg: Message, execute: Any, conn: sqlite3.Connection) -> None:
        if msg.value == b"0":
            strays.append(asyncio.create_task(later(execute, conn)))
            raise ValueError("declined")
        await asyncio.sleep(0.01)
        execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))

    @app.handler("in", sink=sink, retries=0, concurrency=concurrency)
    async def handle(msg: Message, db: Any) -> None:
        tx = await db.hold()
        await effect(msg, tx.execute, tx.connection)

    assert app.run(until_idle=0.5).stopped_by == "idle"
    assert _state(tmp_path) == (Counter({"1": 1, "2": 1}), [0], 3)
    assert tried, "the stray ran"
    assert all(t.endswith("refused") for t in tried), tried


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_thread_a_failed_record_left_handing_writes_to_the_loop_writes_nothing(
    tmp_path: Path, concurrency: int
) -> None:
    """Record 0 keeps the raw connection and leaves a plain thread that hands a write back to
    the App's loop (``call_soon_threadsafe``): it runs on the App's own thread, in the
    thread's context, no attempt's. The write waits on the loop (``call_soon`` again, still
    in no attempt's context) for the window's transaction to be open between two records'
    parts. Old code: taken there for the runtime's own statement, it committed with the
    batch, a second effect."""
    log, sink = _log(tmp_path, 6), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")
    tried: list[str] = []

    def hunt(loop: asyncio.AbstractEventLoop, conn: sqlite3.Connection, left: int) -> None:
        tx = sink._inside
        if (tx is None or tx._in_part or not tx._had_parts) and left:
            loop.call_soon(hunt, loop, conn, left - 1)
            return
        try:
            conn.execute("INSERT INTO t VALUES ('stray')")
            tried.append("ran")
        except UsageError:
            tried.append("refused")

    def hand_over(loop: asyncio.AbstractEventLoop, conn: sqlite3.Connection) -> None:
        time.sleep(0.01)
        loop.call_soon_threadsafe(hunt, loop, conn, 200_000)

    @app.handler("in", sink=sink, retries=0, concurrency=concurrency)
    async def handle(msg: Message, db: Any) -> None:
        if msg.value == b"0":
            conn = (await db.hold()).connection
            loop = asyncio.get_running_loop()
            threading.Thread(target=hand_over, args=(loop, conn), daemon=True).start()
            raise ValueError("declined")
        await asyncio.sleep(0.02)
        await db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))

    assert app.run(until_idle=0.5).stopped_by == "idle"
    assert tried, "the stray ran"
    assert _state(tmp_path) == (Counter({f"{i}": 1 for i in range(1, 6)}), [0], 6), tried
    assert tried == ["refused"]


@pytest.mark.parametrize("undo", ["RELEASE x", "ROLLBACK TO x"])
def test_a_savepoint_left_open_by_one_record_ended_by_another_undoes_nothing_of_the_first(
    tmp_path: Path, undo: str
) -> None:
    """Side by side, record 1's part is kept with its handler's savepoint left open in it;
    record 2 takes ``SAVEPOINT x`` by hand, opens ``db.savepoint()``, ends x by hand (which
    ends the block's savepoint too) and fails. Savepoint names that repeat from one record to
    the next (tried for speed) made the runtime's ROLLBACK TO find record 1's savepoint of
    the same name, and undo its row while record 1 counted as handled. The names differ:
    it finds none, and says so."""
    from assured.sinks._base import RUNTIME, Attempt, _Plain, record_part

    sink = SqliteSink(tmp_path / "s.db", schema=["CREATE TABLE t (v TEXT)"])
    sink.setup()
    seen: list[str] = []

    async def two_records() -> None:
        record_part.set(RUNTIME)
        lane = _Plain(sink, "g", {})
        await lane.begin()
        first = Attempt()
        mark = record_part.set(first)
        tx = await lane.plain("r1")
        lane.owned_by(first)
        with tx.savepoint(release=False):
            tx.execute("INSERT INTO t VALUES ('a')")
        first.over = True
        record_part.reset(mark)
        await lane.end_region("r1", None)
        second = Attempt()
        mark = record_part.set(second)
        tx = await lane.plain("r2")
        lane.owned_by(second)
        error: BaseException | None = None
        try:
            tx.execute("SAVEPOINT x")
            with tx.savepoint():
                tx.execute("INSERT INTO t VALUES ('b')")
                tx.execute(undo)
                raise ValueError("record 2 fails")
        except Exception as e:
            error = e
            seen.append(str(e))
        second.over = True
        record_part.reset(mark)
        await lane.end_region("r2", error)
        await lane.commit()

    asyncio.run(two_records())
    assert any("no such savepoint" in e for e in seen), seen
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db:
        assert db.execute("SELECT v FROM t").fetchall() == [("a",)]


def test_a_failed_record_that_kept_hundreds_of_savepoints_leaves_nothing(
    tmp_path: Path,
) -> None:
    """A handler keeps one savepoint per item (``release=False``, one after another, as the
    docstring allows), 300 of them, then fails. Savepoint names that a record's part shared
    with a handler's 256th block (tried for speed) rolled back to that block only: the rows
    before it committed with the batch, the failed attempt's effects kept."""
    log, sink = _log(tmp_path, 2), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", sink=sink, retries=0)
    def effect(msg: Message, db: Any) -> None:
        for i in range(300):
            with db.savepoint(release=False):
                db.execute("INSERT INTO t VALUES (?)", (f"{msg.value.decode()}-{i}",))
        if msg.value == b"0":
            raise ValueError("declined after 300 items")

    assert app.run(until_idle=0.5).stopped_by == "idle"
    effects, letters, stored = _state(tmp_path)
    assert sorted(effects) == sorted(f"1-{i}" for i in range(300))
    assert (letters, stored) == ([0], 2)


def test_a_worker_task_that_runs_every_records_db_calls_refuses_none(tmp_path: Path) -> None:
    """A worker bound to the loop, started by the first record, awaits every record's
    ``db.execute``. Old code: the part it opened counted as the first record's, and the next
    records' own raw writes were refused and dead-lettered."""
    log, sink = _log(tmp_path, 3), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")
    queue: list[asyncio.Queue[tuple[Any, asyncio.Future[Any]]]] = []

    async def worker(calls: asyncio.Queue[tuple[Any, asyncio.Future[Any]]]) -> None:
        while True:
            call, done = await calls.get()
            try:
                done.set_result(await call)
            except Exception as e:  # handed to the record that asked
                done.set_exception(e)

    workers: list[asyncio.Task[None]] = []

    @app.handler("in", sink=sink, retries=0, concurrency=4)
    async def handle(msg: Message, db: Any) -> None:
        if not queue:
            queue.append(asyncio.Queue())
            workers.append(asyncio.create_task(worker(queue[0])))
        done = asyncio.get_running_loop().create_future()
        await queue[0].put((db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),)), done))
        await done
        (await db.hold()).connection.execute(
            "INSERT INTO t VALUES (?)", (msg.value.decode() + "-raw",)
        )

    assert app.run(until_idle=0.5).stopped_by == "idle"
    expected = Counter({f"{i}{suffix}": 1 for i in range(3) for suffix in ("", "-raw")})
    assert _state(tmp_path) == (expected, [], 3)


def test_a_blob_left_open_by_a_failed_handler_fails_that_record_alone(tmp_path: Path) -> None:
    """Old code: the blob, held by the error's frames, kept SQLite from releasing the part,
    and the App stopped blaming a cursor. Blobs opened in a part are closed at its end."""
    log, sink = _log(tmp_path, 3), _sink(tmp_path)
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE b (id INTEGER PRIMARY KEY, data BLOB)")
        tx.execute("INSERT INTO b VALUES (1, zeroblob(4))")
    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", sink=sink, retries=0)
    def handle(msg: Message, db: Any) -> None:
        blob = db.connection.blobopen("b", "data", 1)
        blob.write(msg.value.ljust(4, b"."))
        db.execute("INSERT INTO t VALUES (?)", (msg.value.decode(),))
        if msg.value == b"1":
            raise ValueError(f"declined, {blob} open")
        blob.close()

    assert app.run(until_idle=0.5).stopped_by == "idle"
    assert _state(tmp_path) == (Counter({"0": 1, "2": 1}), [1], 3)
    with contextlib.closing(sqlite3.connect(tmp_path / "sink.db")) as db:
        assert db.execute("SELECT data FROM b").fetchone()[0] == b"2..."


def test_db_dead_letter_reads_its_id_whatever_row_factory_the_handler_set(
    tmp_path: Path,
) -> None:
    """Old code: inside the handler's part, with the sqlite3 docs' dict ``row_factory``, the
    dead letter was written and then reading its id failed (KeyError 0)."""
    log, sink = _log(tmp_path, 2), _sink(tmp_path)
    app = App(log=log, group="g", guarantee="exactly-once")
    ids: list[int] = []

    def as_dict(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
        return {d[0]: v for d, v in zip(cursor.description, row, strict=True)}

    @app.handler("in", sink=sink)
    def handle(msg: Message, db: Any) -> None:
        db.connection.row_factory = as_dict
        ids.append(db.dead_letter(msg, topic="in.parked", error=ValueError("parked")))
        assert db.connection.execute("SELECT 1 AS one").fetchone() == {"one": 1}

    assert app.run(until_idle=0.5).stopped_by == "idle"
    assert len(ids) == 2
    assert all(isinstance(i, int) for i in ids)
    with contextlib.closing(sqlite3.connect(tmp_path / "sink.db")) as db:
        assert db.execute("SELECT count(*) FROM assured_dead_letters").fetchone()[0] == 2


def test_a_task_left_running_writes_nothing_into_a_transaction_before_its_first_part(
    tmp_path: Path,
) -> None:
    """At-least-once, one record a batch, and a second handler that awaits: the task record
    r1's failed attempt left running wakes in the next batch's transaction before any part of
    it opened, and writes through the raw connection it kept. Old code: allowed there (no part
    yet), and committed: a second effect for r1, past the inbox meant to prevent it."""
    from assured.testing import AppTest

    (tmp_path / "t").mkdir()
    with sqlite3.connect(tmp_path / "fx.db") as conn:
        conn.execute("CREATE TABLE effects (id TEXT)")
    sink = SqliteSink(tmp_path / "fx.db")
    app = App(group="g", guarantee="at-least-once", max_poll_records=1)
    failed: set[str] = set()
    tried: list[str] = []

    @app.handler("a", sink=sink, retries=3, dead_letter=False)
    async def effect(msg: Message, db: Any) -> None:
        mid = msg.value.decode()
        tx = await db.hold()
        if not tx.first_delivery(msg):
            return
        tx.execute("INSERT INTO effects VALUES (?)", (mid,))
        if mid not in failed:
            failed.add(mid)
            raw = tx.connection

            async def later() -> None:
                await asyncio.sleep(0.3)
                try:
                    raw.execute("INSERT INTO effects VALUES (?)", ("stray-" + mid,))
                    tried.append("made")
                except UsageError as e:
                    tried.append(f"{type(e).__name__}: {e}")

            strays.append(asyncio.create_task(later()))
            raise ValueError("declined")

    strays: list[asyncio.Task[None]] = []

    @app.handler("b")
    async def wait(msg: Message) -> None:
        await asyncio.sleep(0.5)

    with AppTest(app, folder=tmp_path / "t") as test:
        test.send("a", b"r1")
        test.send("b", b"x")
        test.run_until_idle()
        assert test.query("SELECT id FROM effects") == [("r1",)]
    assert len(tried) == 1, tried
    assert tried[0].startswith("StrayStatementError: "), tried


def test_a_savepoint_of_a_task_left_running_never_undoes_another_records_work(
    tmp_path: Path,
) -> None:
    """Record a fails, leaving a task that takes ``db.savepoint()`` inside record b's part,
    awaits while b writes, then fails inside it. Old code: the savepoint's own statements
    are the runtime's (trusted), so it was taken, and its ROLLBACK TO undid b's row, while
    b's position committed: b's effect lost under exactly-once."""
    from assured.testing import AppTest

    (tmp_path / "t").mkdir()
    with sqlite3.connect(tmp_path / "fx.db") as conn:
        conn.execute("CREATE TABLE fx (v TEXT)")
    app = App(group="g", guarantee="exactly-once")
    seen: list[str] = []

    async def left_running(savepoint: Any, execute: Any) -> None:
        await asyncio.sleep(0.02)  # inside record b's part now
        try:
            with savepoint():
                await asyncio.sleep(0.1)  # b writes meanwhile
                execute("INSERT INTO fx VALUES ('stray')")
        except UsageError as e:
            seen.append(type(e).__name__)

    strays: list[asyncio.Task[None]] = []

    @app.handler("in", sink=SqliteSink(tmp_path / "fx.db"), retries=0)
    async def effect(msg: Message, db: Any) -> None:
        value = msg.value.decode()
        tx = await db.hold()
        if value == "a":  # the methods themselves, past what hold() gave
            strays.append(asyncio.create_task(left_running(tx.savepoint, tx.execute)))
            raise TimeoutError("a failed")
        await asyncio.sleep(0.05)
        tx.execute("INSERT INTO fx VALUES (?)", (value,))
        await asyncio.sleep(0.2)  # an API call after the write

    with AppTest(app, folder=tmp_path / "t") as test:
        test.send("in", b"a")
        test.send("in", b"b")
        test.run_until_idle()
        assert test.query("SELECT v FROM fx") == [("b",)]
        assert [r.value for r in test.dead_letters("in")] == [b"a"]
    assert seen == ["StrayStatementError"]


def test_a_handler_whose_statements_come_from_a_worker_it_started_once_stops_the_app(
    tmp_path: Path,
) -> None:
    """A worker task started by the first record's attempt carries that attempt's mark for
    good: every later record's statements through it are refused. Old code: each was the
    record's own failure, retried and dead-lettered, and the topic drained into its dead
    letters; now the App stops, saying why, and nothing is dead-lettered."""
    from assured.testing import AppTest

    (tmp_path / "t").mkdir()
    with sqlite3.connect(tmp_path / "fx.db") as conn:
        conn.execute("CREATE TABLE fx (v TEXT)")
    app = App(group="g", guarantee="exactly-once")
    queue: asyncio.Queue[tuple[Any, str, asyncio.Future[None]]] | None = None
    workers: list[asyncio.Task[None]] = []

    async def serve() -> None:
        assert queue is not None
        while True:
            tx, value, done = await queue.get()
            try:
                tx.execute("INSERT INTO fx VALUES (?)", (value,))
                done.set_result(None)
            except Exception as e:
                done.set_exception(e)

    @app.handler("in", sink=SqliteSink(tmp_path / "fx.db"), retries=1, backoff_ms=5)
    async def effect(msg: Message, db: Any) -> None:
        nonlocal queue
        if queue is None:
            queue = asyncio.Queue()
            workers.append(asyncio.create_task(serve()))
        done = asyncio.get_running_loop().create_future()
        await queue.put((await db.hold(), msg.value.decode(), done))
        await done

    with AppTest(app, folder=tmp_path / "t") as test:
        for value in (b"1", b"2", b"3"):
            test.send("in", value)
        with pytest.raises(StrayStatementError, match="after its attempt ended"):
            test.run_until_idle()
        assert test.dead_letters("in") == []


def test_a_savepoint_block_a_handler_leaves_unfinished_commits_nothing_of_it(
    tmp_path: Path,
) -> None:
    """Side by side: record a's child task writes a-1 in ``tx.savepoint()``, and the handler
    returns before the block's second write (refused: its attempt is over). Old code: the
    block's exit was skipped for a stray, and a-1 committed without a-2 (half a block); now
    the part's end undoes the block still open."""
    from assured.testing import AppTest

    (tmp_path / "t").mkdir()
    sink = SqliteSink(tmp_path / "s.db", schema="CREATE TABLE IF NOT EXISTS t (v TEXT)")
    app = App(group="g", guarantee="exactly-once")
    errors: list[str] = []

    @app.handler("in", sink=sink, concurrency=4)
    async def effect(msg: Message, db: Any) -> None:
        value = msg.value.decode()
        if value == "a":
            tx = await db.hold()
            written = asyncio.Event()

            async def child() -> None:
                try:
                    with tx.savepoint():
                        tx.execute("INSERT INTO t VALUES ('a-1')")
                        written.set()
                        await asyncio.sleep(0.01)
                        tx.execute("INSERT INTO t VALUES ('a-2')")
                except UsageError as e:
                    errors.append(type(e).__name__)

            children.append(asyncio.create_task(child()))
            await written.wait()
            return
        await asyncio.sleep(0.02)
        await db.execute("INSERT INTO t VALUES (?)", (value,))

    children: list[asyncio.Task[None]] = []
    with AppTest(app, folder=tmp_path / "t") as test:
        test.send("in", b"a")
        test.send("in", b"b")
        test.run_until_idle(idle=0.2)
        assert test.query("SELECT v FROM t ORDER BY v") == [("b",)]
        assert test.dead_letters("in") == []
    assert errors == ["StrayStatementError"]
