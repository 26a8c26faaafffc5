"""A lost PostgreSQL connection is the sink's failure, not the handler's (issue 18, item 11):
statements, savepoints and commits turn it into SinkUnavailableError (or, during COMMIT,
SinkCommitUnknownError), and the next transaction reconnects. On the real server, restarted."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from assured import App, Message, TopicPartition
from assured.errors import RetriableError, ServiceError, UsageError
from assured.log import Log
from assured.sinks import (
    HandlerEndedTransactionError,
    PostgresSink,
    SinkCommitUnknownError,
    SinkTransaction,
    SinkUnavailableError,
    SinkUnreachableError,
)
from assured.testing._net import free_ports
from assured.testing.postgres import PostgresServer
from tests.sinks.conftest import charges_log, read_all

pytestmark = pytest.mark.postgres


def effects_sink(dsn: str) -> PostgresSink:
    sink = PostgresSink(dsn, reconnect_timeout_s=30)
    sink.setup()
    with sink.transaction() as tx:
        tx.execute("CREATE TABLE effects (n integer)")
    return sink


def eight_charges(tmp_path: Path, dsn: str) -> Log:
    """An embedded log whose topic ``charges`` holds 0..7, and the effects table made."""
    log = charges_log(tmp_path, 8)
    effects_sink(dsn).close()
    return log


def effects(sink: PostgresSink) -> list[int]:
    with sink.transaction() as tx:
        return [r[0] for r in tx.execute("SELECT n FROM effects ORDER BY n").fetchall()]


def test_a_restart_mid_transaction_is_the_sinks_failure(
    postgres: PostgresServer, pg_dsn: str
) -> None:
    sink = effects_sink(pg_dsn)
    with pytest.raises(SinkUnavailableError) as info, sink.transaction(group="g") as tx:  # noqa: PT012
        tx.execute("INSERT INTO effects VALUES (1)")
        postgres.restart("fast")
        tx.execute("INSERT INTO effects VALUES (2)")
    assert isinstance(info.value, RetriableError)
    assert not isinstance(info.value, SinkCommitUnknownError)
    assert "rolled back" in str(info.value)
    assert "AdminShutdown" in str(info.value)
    with sink.transaction() as tx:  # reconnects
        tx.execute("INSERT INTO effects VALUES (3)")
    assert effects(sink) == [3]
    sink.close()


def test_a_handlers_savepoint_reports_the_lost_connection(
    postgres: PostgresServer, pg_dsn: str
) -> None:
    sink = effects_sink(pg_dsn)

    def handler_turns_it_into_its_own_error(tx: SinkTransaction) -> None:
        with tx.savepoint():
            postgres.restart("fast")
            try:
                tx.execute("INSERT INTO effects VALUES (1)")
            except Exception as e:
                raise ValueError("my handler failed") from e

    with pytest.raises(SinkUnavailableError), sink.transaction() as tx:
        handler_turns_it_into_its_own_error(tx)

    def handler_swallows_it(tx: SinkTransaction, savepoint: bool) -> None:
        with tx.savepoint() if savepoint else contextlib.nullcontext():
            tx.execute("INSERT INTO effects VALUES (2)")
            postgres.restart("fast")
            with contextlib.suppress(psycopg.Error):
                tx.connection.execute("INSERT INTO effects VALUES (3)")  # the raw connection

    for savepoint in (True, False):
        with pytest.raises(SinkUnavailableError) as info, sink.transaction() as tx:
            handler_swallows_it(tx, savepoint)
        assert not isinstance(info.value, SinkCommitUnknownError), "it broke before COMMIT"
    assert effects(sink) == [], "a transaction whose connection broke never commits"
    sink.close()


def test_an_idle_connection_broken_by_a_restart_is_replaced(
    postgres: PostgresServer, pg_dsn: str
) -> None:
    sink = effects_sink(pg_dsn)
    postgres.restart("immediate")
    with sink.transaction() as tx:  # nothing had been done on the dead connection: no error
        tx.execute("INSERT INTO effects VALUES (1)")
    assert effects(sink) == [1]
    sink.close()


def test_transactions_across_a_restart_see_only_the_sinks_errors(
    postgres: PostgresServer, pg_dsn: str
) -> None:
    sink = effects_sink(pg_dsn)

    def restart_thrice() -> None:
        for _ in range(3):
            postgres.restart("fast")

    restarts = threading.Thread(target=restart_thrice)
    committed, refused = [], 0
    restarts.start()
    n = 0
    while restarts.is_alive() or n < 50:
        n += 1
        try:
            with sink.transaction() as tx:
                tx.execute("INSERT INTO effects VALUES (%s)", (n,))
                time.sleep(0.005)
            committed.append(n)
        except SinkCommitUnknownError:
            refused += 1  # may or may not be there: not counted either way
            committed.append(-n)
        except SinkUnavailableError:
            refused += 1
    restarts.join()
    stored = set(effects(sink))
    assert {c for c in committed if c > 0} <= stored
    assert stored <= {abs(c) for c in committed}, "a rolled-back transaction left nothing"
    sink.close()


def test_a_connection_lost_during_commit_is_reported_as_unknown(pg_dsn: str) -> None:
    sink = effects_sink(pg_dsn)
    with sink.transaction() as tx:  # a commit that takes a while: a deferred trigger sleeps
        tx.execute(
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$"
        )
        tx.execute(
            "CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON effects DEFERRABLE INITIALLY "
            "DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
        )

    def terminate(pid: int) -> None:
        time.sleep(1.0)
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    with pytest.raises(SinkCommitUnknownError) as info, sink.transaction() as tx:  # noqa: PT012
        tx.execute("INSERT INTO effects VALUES (1)")
        pid = tx.execute("SELECT pg_backend_pid()").fetchone()[0]
        threading.Thread(target=terminate, args=(pid,), daemon=True).start()
    assert isinstance(info.value, SinkUnavailableError)
    assert "stored offsets" in str(info.value)
    assert effects(sink) == [], "terminated before the commit record: it did not land"
    sink.close()


def test_a_server_away_past_the_deadline_is_unreachable() -> None:
    (port,) = free_ports(1)
    sink = PostgresSink(f"postgresql://ann:secret@127.0.0.1:{port}/shop", reconnect_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(SinkUnreachableError) as info, sink.transaction():
        pass
    assert 1.0 <= time.monotonic() - started < 10
    message = str(info.value)
    assert f"127.0.0.1:{port}/shop" in message
    assert "secret" not in message
    assert info.value.fatal


def test_a_wrong_database_is_refused_at_once(postgres: PostgresServer) -> None:
    sink = PostgresSink(postgres.dsn.rsplit("/", 1)[0] + "/no_such_db", reconnect_timeout_s=30)
    started = time.monotonic()
    with pytest.raises(ServiceError, match="no_such_db"):
        sink.setup()
    assert time.monotonic() - started < 5


def test_an_app_never_dead_letters_a_record_over_a_lost_connection(
    postgres: PostgresServer, pg_dsn: str, tmp_path: Path
) -> None:
    log = eight_charges(tmp_path, pg_dsn)
    restarted: list[bool] = []

    def app() -> App:
        made = App(log=log, group="g", guarantee="exactly-once", max_poll_records=2)

        @made.handler("charges", sink=PostgresSink(pg_dsn), retries=2, backoff_ms=1)
        def charge(msg: Message, db: SinkTransaction) -> None:
            if msg.offset == 3 and not restarted:
                restarted.append(True)
                postgres.restart("fast")
            db.execute("INSERT INTO effects VALUES (%s)", (int(msg.value),))

        return made

    with contextlib.suppress(SinkUnavailableError):  # a runtime that does not redo the batch
        app().run(until_idle=1.0)  # itself stops; nothing was lost
    app().run(until_idle=1.0)
    assert restarted
    sink = PostgresSink(pg_dsn)
    assert effects(sink) == list(range(8)), "each effect exactly once"
    assert sink.stored_offsets("g") == {TopicPartition("charges", 0): 8}
    sink.close()
    with log.admin() as admin:
        if "charges.dlq" in admin.list_topics():
            assert read_all(log, "charges.dlq") == [], "nothing dead-lettered"
    log.close()


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_statement_with_a_commit_tacked_on_is_refused_and_no_effect_repeats(
    pg_dsn: str, tmp_path: Path, concurrency: int
) -> None:
    """``UPDATE ...; COMMIT`` without parameters would go by the simple query protocol, which
    runs both: the COMMIT would end the batch's transaction under the records before it, and
    their effects would commit without their positions, then again when the batch is redone.
    Such SQL goes by the extended protocol, where the server refuses a second statement: the
    record fails (the error says so), and every effect lands once."""
    log = eight_charges(tmp_path, pg_dsn)
    refused: list[str] = []
    app = App(log=log, group="g", guarantee="exactly-once", max_poll_records=8)

    def charge(msg: Message, db: SinkTransaction) -> None:
        db.execute("INSERT INTO effects VALUES (%s)", (int(msg.value),))
        if msg.offset == 5 and not refused:
            try:
                db.execute("UPDATE effects SET n = n; COMMIT")
            except Exception as e:
                refused.append(str(e))
                raise

    async def charge_async(msg: Message, db: Any) -> None:
        await db.execute("INSERT INTO effects VALUES (%s)", (int(msg.value),))
        if msg.offset == 5 and not refused:
            try:
                await db.execute("UPDATE effects SET n = n; COMMIT")
            except Exception as e:
                refused.append(str(e))
                raise

    handler: Any = charge if concurrency == 1 else charge_async
    app.handler("charges", sink=PostgresSink(pg_dsn), concurrency=concurrency, backoff_ms=1)(
        handler
    )
    stats = app.run(until_idle=1.0)
    sink = PostgresSink(pg_dsn)
    try:
        assert sorted(effects(sink)) == list(range(8)), "each effect exactly once"
        assert stats.processed == 8
        assert refused
        assert "one statement per execute" in refused[0]
    finally:
        sink.close()
        log.close()


def test_a_schema_item_with_two_statements_is_refused_and_nothing_is_made(pg_dsn: str) -> None:
    """A schema= item is one statement, as any execute: two in one string are refused by the
    server, said plainly, and setup's transaction leaves nothing behind."""
    sink = PostgresSink(pg_dsn, schema="CREATE TABLE a (x int); CREATE TABLE b (y int)")
    with pytest.raises(UsageError, match="per schema= item"):
        sink.setup()
    sink.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        made = conn.execute(
            "SELECT count(*) FROM pg_tables "
            "WHERE schemaname = current_schema() AND tablename IN ('a', 'b')"
        )
        assert made.fetchone() == (0,)


RAW_ENDINGS: dict[str, Any] = {
    "commit": lambda conn: conn.commit(),
    "rollback": lambda conn: conn.rollback(),
    "autocommit": lambda conn: setattr(conn, "autocommit", True),
    "execute-commit": lambda conn: conn.execute("COMMIT"),
    "cursor-commit": lambda conn: conn.cursor().execute("/* c */ COMMIT"),
    "cursor-connection": lambda conn: conn.cursor().connection.commit(),
    "exit": lambda conn: conn.__exit__(None, None, None),
    "client-cursors": lambda conn: setattr(conn, "cursor_factory", psycopg.ClientCursor),
}


@pytest.mark.parametrize("swallowed", [False, True], ids=["raised", "swallowed"])
@pytest.mark.parametrize("ending", sorted(RAW_ENDINGS))
def test_a_handler_that_ends_the_transaction_through_the_connection_stops_the_app(
    pg_dsn: str, tmp_path: Path, ending: str, swallowed: bool
) -> None:
    """``db.connection`` is psycopg's connection inside the runtime's transaction, for code
    that wants one; what would end that transaction (commit(), rollback(), autocommit, a
    COMMIT however it is sent) would commit the batch's effects without their positions, and
    the redo would make them again. It is refused, nothing of the transaction commits, and
    the App stops with what to do, even when the handler swallows the error."""
    log = eight_charges(tmp_path, pg_dsn)
    app = App(log=log, group="g", guarantee="exactly-once", max_poll_records=8)
    tried: list[str] = []

    @app.handler("charges", sink=PostgresSink(pg_dsn))
    def charge(msg: Message, db: SinkTransaction) -> None:
        db.execute("INSERT INTO effects VALUES (%s)", (int(msg.value),))
        conn = db.connection
        assert conn.execute("SELECT count(*) FROM effects").fetchone()[0] >= 1  # in the txn
        if msg.offset == 5 and not tried:  # once: without the guard, once was a duplicate
            tried.append(ending)
            try:
                RAW_ENDINGS[ending](conn)
            except Exception:
                if not swallowed:
                    raise

    with pytest.raises(HandlerEndedTransactionError, match="do not commit or roll back"):
        app.run(until_idle=1.0)
    sink = PostgresSink(pg_dsn)
    try:
        made = effects(sink)
        stored = sum(sink.stored_offsets("g").values())
    finally:
        sink.close()
        log.close()
    assert tried == [ending]
    assert made == list(range(stored)), "every effect once, each with its position"
    assert 5 not in made


def test_what_the_guarded_connection_still_does(pg_dsn: str) -> None:
    """The guard refuses only what would end the transaction: a nested transaction() is a
    savepoint inside it, psycopg's helpers take the connection as theirs (isinstance), and
    what is written commits with the rest."""
    from psycopg.types import TypeInfo

    sink = effects_sink(pg_dsn)
    try:
        with sink.transaction() as tx:
            conn = tx.connection
            assert isinstance(conn, psycopg.Connection)
            assert TypeInfo.fetch(conn, "int4") is not None
            with conn.transaction():
                conn.execute("INSERT INTO effects VALUES (%s)", (41,))
            with contextlib.suppress(RuntimeError), conn.transaction():
                conn.execute("INSERT INTO effects VALUES (%s)", (42,))
                raise RuntimeError("undone: the savepoint rolls back")
            assert conn.cursor().execute("SELECT 1").fetchone() == (1,)
            # placeholders read as psycopg reads them: db.execute's parameters default to ()
            # ('%%' is a '%'), the connection's to None (no placeholders at all)
            assert tx.execute("SELECT '100%%'").fetchone() == ("100%",)
            assert conn.execute("SELECT '100%'").fetchone() == ("100%",)
            # the cursors handed back keep the rules, and pass for psycopg's, iterator too
            assert isinstance(tx.execute("SELECT 1"), psycopg.Cursor)
            assert next(tx.execute("SELECT 7")) == (7,)
            assert [row for row in conn.execute("SELECT 8")] == [(8,)]
        assert effects(sink) == [41]
    finally:
        sink.close()


def test_a_failed_records_task_writes_nothing_into_a_later_records_part(
    tmp_path: Path, pg_dsn: str
) -> None:
    """An async handler at concurrency 1: record 0 starts a task that keeps its ``db`` and
    fails (dead-lettered). The task writes during the next records' parts and between them.
    Old code (where an async def at concurrency 1 was given the batch's transaction, each
    record's part a savepoint of it): those writes committed with the batch, the effects of
    a record counted as failed."""
    import asyncio

    log = eight_charges(tmp_path, pg_dsn)
    sink = PostgresSink(pg_dsn, reconnect_timeout_s=30)
    app = App(log=log, group="g", guarantee="exactly-once")
    tried: list[str] = []

    async def later(db: Any) -> None:
        for _ in range(4):
            await asyncio.sleep(0.004)
            try:
                await db.execute("INSERT INTO effects VALUES (-1)")
                tried.append("ran")
            except UsageError:
                tried.append("refused")

    strays: list[asyncio.Task[None]] = []

    @app.handler("charges", sink=sink, retries=0)
    async def charge(msg: Message, db: Any) -> None:
        if msg.value == b"0":
            strays.append(asyncio.create_task(later(db)))
            raise ValueError("declined")
        await asyncio.sleep(0.01)
        await db.execute("INSERT INTO effects VALUES (%s)", (int(msg.value),))

    try:
        assert app.run(until_idle=0.5).stopped_by == "idle"
        assert effects(sink) == [1, 2, 3, 4, 5, 6, 7]
    finally:
        sink.close()
    assert tried, "the stray ran"
    assert all(t.endswith("refused") for t in tried), tried


def test_a_thread_a_failed_record_left_running_writes_nothing(tmp_path: Path, pg_dsn: str) -> None:
    """A plain ``def`` handler: record 0 starts a thread that keeps its ``db`` and fails
    (dead-lettered). The thread has none of the attempt's context: it writes, through ``db``,
    through ``db.connection``, by COPY on a cursor of it, and through a cursor ``db.execute``
    returned and its ``connection``, during the next records' parts,
    between them and after the batch's transaction ended. Old code: its writes between parts
    committed with the batch, and those after the commit committed on their own (the
    connection is in autocommit); COPY got past the attempt's rule wherever it ran."""
    log = eight_charges(tmp_path, pg_dsn)
    sink = PostgresSink(pg_dsn, reconnect_timeout_s=30)
    app = App(log=log, group="g", guarantee="exactly-once")
    tried: list[str] = []

    def copy(sql: str, db: Any) -> None:  # COPY, which passes through to psycopg's cursor
        with db.connection.cursor().copy("COPY effects (n) FROM STDIN") as rows:
            rows.write_row((-2,))

    def later(db: Any, cursor: Any) -> None:
        for _ in range(30):
            time.sleep(0.002)
            ways = (
                ("db", db.execute),
                ("raw", db.connection.execute),
                ("copy", lambda sql: copy(sql, db)),
                ("cursor", cursor.execute),  # one it got from db.execute, kept
                ("cursor's connection", cursor.connection.execute),
            )
            for how, run in ways:
                try:
                    run("INSERT INTO effects VALUES (-1)")
                    tried.append(f"{how}: ran")
                except UsageError as e:
                    tried.append(
                        f"{how}: refused" if "thread" in str(e) or "after" in str(e) else repr(e)
                    )

    strays: list[threading.Thread] = []

    @app.handler("charges", sink=sink, retries=0)
    def charge(msg: Message, db: Any) -> None:
        if msg.value == b"0":
            cursor = db.execute("SELECT 1")
            strays.append(thread := threading.Thread(target=later, args=(db, cursor)))
            thread.start()
            raise ValueError("declined")
        time.sleep(0.005)
        db.execute("INSERT INTO effects VALUES (%s)", (int(msg.value),))

    try:
        assert app.run(until_idle=0.5).stopped_by == "idle"
        strays[0].join(10)
        assert effects(sink) == [1, 2, 3, 4, 5, 6, 7]
    finally:
        sink.close()
    assert len(tried) == 150, tried
    assert all(t.endswith("refused") for t in tried), tried


def test_a_transaction_a_handler_opens_for_itself_may_be_used_from_its_threads(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A handler without a sink opens a transaction of its own and writes through it from a
    pool's threads (no context of its attempt). That transaction is not the runtime's: its
    threads are not strays. (Refused, and the App stopped, while code of no App's was
    refused in any transaction an App's code had opened.)"""
    from concurrent.futures import ThreadPoolExecutor

    log = eight_charges(tmp_path, pg_dsn)
    own = PostgresSink(pg_dsn, reconnect_timeout_s=30)
    app = App(log=log, group="g", guarantee="at-least-once")

    @app.handler("charges")
    def charge(msg: Message) -> None:
        with own.transaction() as tx, ThreadPoolExecutor(2) as pool:
            done = pool.map(
                lambda n: tx.execute("INSERT INTO effects VALUES (%s)", (n,)),
                [int(msg.value), 100 + int(msg.value)],
            )
            list(done)

    try:
        assert app.run(until_idle=0.5).stopped_by == "idle"
        assert effects(own) == [*range(8), *range(100, 108)]
    finally:
        own.close()


def test_a_worker_a_handler_started_once_may_use_the_handlers_own_transaction_later(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A handler without out or db (its code marked as its attempt's) starts a worker task
    once, which writes through the handler's own sink for every record, after the first
    record's attempt ended. That transaction is the worker's own: nothing is refused."""
    import asyncio

    log = eight_charges(tmp_path, pg_dsn)
    own = PostgresSink(pg_dsn, reconnect_timeout_s=30)
    app = App(log=log, group="g", guarantee="at-least-once")
    queue: list[asyncio.Queue[tuple[int, asyncio.Future[None]]]] = []
    workers: list[asyncio.Task[None]] = []

    async def worker(items: asyncio.Queue[tuple[int, asyncio.Future[None]]]) -> None:
        while True:
            n, done = await items.get()
            try:
                with own.transaction() as tx:
                    tx.execute("INSERT INTO effects VALUES (%s)", (n,))
                done.set_result(None)
            except Exception as e:
                done.set_exception(e)

    @app.handler("charges", concurrency=2)
    async def charge(msg: Message) -> None:
        if not queue:
            queue.append(asyncio.Queue())
            workers.append(asyncio.create_task(worker(queue[0])))
        done = asyncio.get_running_loop().create_future()
        await queue[0].put((int(msg.value), done))
        await done

    try:
        assert app.run(until_idle=0.5).stopped_by == "idle"
        assert effects(own) == list(range(8))
    finally:
        own.close()
