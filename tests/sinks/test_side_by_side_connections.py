"""PostgreSQL side by side on several async connections (issue 14): records of one key share a
connection between two group commits, each connection commits on its own (under exactly-once
with a mark per record, fenced), and the step's last commit holds the positions. What one
connection committed stays when another's commit fails; the rest is handled again. On the
embedded engine, into a real PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest

from assured import App, Message, PostgresSink, TopicPartition
from assured.errors import ConfigError, UsageError
from assured.log import Log
from assured.runtime._settings import Guarantee
from assured.sinks import SinkUnavailableError
from assured.sinks import postgres as postgres_sink
from assured.sinks._pg_wire import wire_statement
from tests.conftest import fill_keyed as fill
from tests.sinks.conftest import read_all

pytestmark = pytest.mark.postgres

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS charges (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
    "k BYTEA, v BYTEA, backend INT)",
    "CREATE TABLE IF NOT EXISTS totals (id INT PRIMARY KEY, n INT NOT NULL)",
    "INSERT INTO totals VALUES (1, 0) ON CONFLICT DO NOTHING",
)
INSERT = "INSERT INTO charges (k, v, backend) VALUES (%s, %s, pg_backend_pid())"


def ends_within(app: App, seconds: float, until_idle: float) -> bool:
    """Run ``app`` on a thread until idle; whether it ended within ``seconds`` (a hung App is
    left behind on its daemon thread, and the test fails)."""
    finished = threading.Event()

    def run() -> None:
        app.run(until_idle=until_idle)
        finished.set()

    threading.Thread(target=run, daemon=True).start()
    return finished.wait(seconds)


def rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def charges(dsn: str) -> list[tuple[bytes, bytes, int]]:
    found = rows(dsn, "SELECT k, v, backend FROM charges ORDER BY id")
    return [(bytes(k), bytes(v), int(b)) for k, v, b in found]


def test_records_use_several_connections_and_each_effect_commits_once(
    log: Log, pg_dsn: str
) -> None:
    """A record that holds its connection a while (two writes with a wait between) makes the
    others take more connections, never over the sink's number; every effect once, and the
    positions end after the last record, with no mark left below them."""
    values = fill(log, 400)
    app = App(log=log, group="g", guarantee="exactly-once")
    rng = random.Random(3)

    @app.handler("in", sink=PostgresSink(pg_dsn, schema=SCHEMA, connections=4), concurrency=50)
    async def charge(msg: Message, db: Any) -> None:
        await asyncio.sleep(rng.random() * 0.005)
        await db.execute(INSERT, (msg.key, msg.value))
        await asyncio.sleep(0.002)  # still holding its connection
        await db.execute("UPDATE charges SET v = v WHERE v = %s", (msg.value,))

    assert app.run(until_idle=0.5).processed == 400
    found = charges(pg_dsn)
    assert sorted(v for _, v, _ in found) == values  # each once
    assert 1 < len({b for _, _, b in found}) <= 4  # several connections, at most four
    # records of one key ran on one connection per commit, and in offset order
    for key in {k for k, _, _ in found}:
        mine = [v for k, v, _ in found if k == key]
        assert mine == sorted(mine)
    assert rows(pg_dsn, "SELECT count(*) FROM assured_done") == [(0,)]
    assert rows(pg_dsn, "SELECT sum(next_offset) FROM assured_offsets") == [(400,)]


@pytest.mark.parametrize("guarantee", ["at-most-once", "at-least-once", "exactly-once"])
def test_a_connection_lost_at_the_group_commit_loses_and_repeats_only_as_the_guarantee_allows(
    log: Log, pg_dsn: str, guarantee: Guarantee
) -> None:
    """One record ends another connection's backend while its transaction is open (records
    done in it, not yet committed), with a third connection's open too: that commit fails and
    its records are handled again, while what another connection committed stays handled.
    Exactly-once: every effect once; at-least-once: none lost; at-most-once: none twice."""
    values = fill(log, 300)
    app = App(log=log, group="g", guarantee=guarantee)
    ended: list[int] = []

    async def end_one_other(dsn: str) -> int:
        """On a connection of the test's own (holding none of the App's): wait until two of
        the App's connections hold open transactions, then end one's backend."""
        open_ones = (
            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
            "AND state = 'idle in transaction' AND datname = current_database() ORDER BY pid"
        )
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as own:
            for _ in range(3000):
                found = await (await own.execute(open_ones)).fetchall()
                if len(found) >= 2:
                    await own.execute("SELECT pg_terminate_backend(%s)", (found[0][0],))
                    return len(found)
                await asyncio.sleep(0.001)
        return 0

    @app.handler("in", sink=PostgresSink(pg_dsn, schema=SCHEMA), concurrency=40, backoff_ms=1)
    async def charge(msg: Message, db: Any) -> None:
        await asyncio.sleep(0.003)
        if msg.partition == 0 and msg.offset == 60 and not ended:
            ended.append(await end_one_other(pg_dsn))
        await db.execute(INSERT, (msg.key, msg.value))

    app.run(until_idle=1)
    assert ended
    assert ended[0] >= 2  # the fault landed: other connections held work
    seen = Counter(v for _, v, _ in charges(pg_dsn))
    if guarantee == "exactly-once":
        assert sorted(seen.elements()) == values
    if guarantee == "at-least-once":
        assert set(seen) == set(values)
    if guarantee == "at-most-once":  # a commit of unknown outcome gives up all in flight
        assert max(seen.values()) == 1


def test_a_record_waiting_for_a_row_lock_another_connection_holds_goes_on(
    log: Log, pg_dsn: str
) -> None:
    """Records of different keys update one row: a record on a second connection waits for
    the first connection's row lock, which holds until that connection commits. The group
    commit commits the connections already free first, so the waiting one goes on (no stall
    until the records' time limit)."""
    fill(log, 120, keys=40)
    app = App(log=log, group="g", guarantee="exactly-once", transaction_timeout_ms=30_000)

    @app.handler("in", sink=PostgresSink(pg_dsn, schema=SCHEMA), concurrency=20)
    async def count(msg: Message, db: Any) -> None:
        await asyncio.sleep(0.001)
        await db.execute("UPDATE totals SET n = n + 1 WHERE id = 1")
        await asyncio.sleep(0.01)  # holds the row lock a while, in its connection

    assert ends_within(app, 20, until_idle=0.5), "the records waiting for the row lock stalled"
    assert rows(pg_dsn, "SELECT n FROM totals WHERE id = 1") == [(120,)]


def test_results_read_the_same_way_and_hold_is_refused_on_postgres(log: Log, pg_dsn: str) -> None:
    """An awaited execute returns the rows already read (fetchone, fetchall, rowcount), as on
    SQLite; db.hold(), which gives a plain transaction, is refused with what to do instead."""
    fill(log, 10)
    app = App(log=log, group="g", guarantee="exactly-once")
    read: list[Any] = []
    refused: list[str] = []

    @app.handler("in", sink=PostgresSink(pg_dsn, schema=SCHEMA), concurrency=4)
    async def look(msg: Message, db: Any) -> None:
        result = await db.execute("SELECT n, 'x' FROM totals WHERE id = 1")
        updated = await db.execute("UPDATE totals SET n = n WHERE id = 1")
        read.append((result.fetchone(), result.fetchone(), result.rowcount, updated.rowcount))
        if not refused:
            with pytest.raises(UsageError) as e:
                await db.hold()
            refused.append(str(e.value))

    assert app.run(until_idle=0.5).processed == 10
    assert read == [((0, "x"), None, 1, 1)] * 10
    assert "await db.execute" in refused[0]


@pytest.mark.parametrize("connections", [0, -1, 1.5, True])
def test_a_wrong_number_of_connections_is_refused(pg_dsn: str, connections: Any) -> None:
    with pytest.raises(ConfigError, match="connections"):
        PostgresSink(pg_dsn, connections=connections)


def test_a_stop_while_records_wait_for_each_others_row_locks_ends_promptly(
    log: Log, pg_dsn: str
) -> None:
    """The drain of a stop waits for every record; a record waiting for a row lock that a
    free connection's open transaction holds would wait for ever, and the drain with it. The
    waiting step commits the free connections, so the drain ends at once, and a second App
    finds every effect made exactly once."""
    fill(log, 400, keys=40)
    first = App(log=log, group="g", guarantee="exactly-once", drain_timeout_ms=20_000)

    @first.handler("in", sink=PostgresSink(pg_dsn, schema=SCHEMA), concurrency=8,
                   ordering="unordered")  # fmt: skip
    async def count(msg: Message, db: Any) -> None:
        await db.execute("UPDATE totals SET n = n + 1 WHERE id = 1")
        await asyncio.sleep(0.05)  # holds the row lock, in its connection

    threading.Timer(0.5, first.stop).start()
    began = time.monotonic()
    first.run()
    assert time.monotonic() - began < 8  # not the 20 s drain, nor for ever

    second = App(log=log, group="g", guarantee="exactly-once")

    @second.handler("in", sink=PostgresSink(pg_dsn, schema=SCHEMA), concurrency=8)
    async def count_again(msg: Message, db: Any) -> None:
        await db.execute("UPDATE totals SET n = n + 1 WHERE id = 1")

    second.run(until_idle=0.5)
    assert rows(pg_dsn, "SELECT n FROM totals WHERE id = 1") == [(400,)]


@pytest.mark.parametrize("left_running", [False, True])
def test_a_record_stuck_in_a_statement_past_its_limit_fails_alone(
    log: Log, pg_dsn: str, left_running: bool
) -> None:
    """A statement that never ends (a lock held elsewhere, a slow query): past
    transaction_timeout_ms the record is cancelled, psycopg cancels the statement on the
    server, and only the record's part rolls back; it fails with a TimeoutError, is retried,
    then dead-lettered, while the records beside it on the same connection commit.
    ``left_running``: the statement runs beside a call that fails (gather), so the handler
    ends while it runs; it is cancelled then, and the record fails alone the same way (before,
    its end waited for it past the limit, and the App stopped after 32 s of steps redone)."""
    fill(log, 20)
    app = App(log=log, group="g", guarantee="exactly-once", transaction_timeout_ms=1000)

    @app.handler("in", sink=PostgresSink(pg_dsn, schema=SCHEMA), concurrency=4, retries=1,
                 backoff_ms=1)  # fmt: skip
    async def charge(msg: Message, db: Any) -> None:
        await db.execute(INSERT, (msg.key, msg.value))
        if msg.value != b"m0005":
            return
        stuck = db.execute("SELECT pg_sleep(3600)")
        if not left_running:
            await stuck
            return

        async def api() -> None:
            await asyncio.sleep(0.01)
            raise RuntimeError("the API failed")

        await asyncio.gather(stuck, api())

    began = time.monotonic()
    try:
        assert app.run(until_idle=1).processed == 20
    finally:  # a statement left sleeping would hold the test's schema
        rows(
            pg_dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE '%pg_sleep(3600)%' AND pid <> pg_backend_pid()",
        )
    assert time.monotonic() - began < 30
    assert sorted(v for _, v, _ in charges(pg_dsn)) == [
        f"m{i:04d}".encode() for i in range(20) if i != 5
    ]
    letters = [r.value for r in read_all(log, "in.dlq")]
    assert letters == [b"m0005"]


@pytest.mark.slow  # the look that cancels them is covered in the default run below
def test_records_stuck_behind_an_outside_lock_together_each_fail_and_retry(
    log: Log, pg_dsn: str
) -> None:
    """Two records wait together on a row lock held outside the App past
    transaction_timeout_ms: both are cancelled in the same look, both fail with a TimeoutError
    and are retried (a record was left neither handled nor failed before, and the App never
    went idle); once the lock is released every effect is made exactly once."""
    fill(log, 20, keys=20)
    with PostgresSink(pg_dsn, schema=SCHEMA):
        pass
    holder = psycopg.connect(pg_dsn)
    holder.execute("SELECT n FROM totals WHERE id = 1 FOR UPDATE")  # held until released
    threading.Timer(3.5, holder.commit).start()
    app = App(log=log, group="g", guarantee="exactly-once", transaction_timeout_ms=1000)

    @app.handler("in", sink=PostgresSink(pg_dsn, schema=SCHEMA), concurrency=8, retries=20,
                 backoff_ms=100)  # fmt: skip
    async def count(msg: Message, db: Any) -> None:
        await db.execute(INSERT, (msg.key, msg.value))
        if msg.value in (b"m0005", b"m0006"):
            await db.execute("UPDATE totals SET n = n + 1 WHERE id = 1")

    try:
        assert ends_within(app, 40, until_idle=1), "a record stuck behind the lock was not retried"
    finally:
        holder.close()
    assert sorted(v for _, v, _ in charges(pg_dsn)) == [f"m{i:04d}".encode() for i in range(20)]
    assert rows(pg_dsn, "SELECT n FROM totals WHERE id = 1") == [(2,)]


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_commits_that_wait_for_each_others_locks_fall_back_to_one_connection(
    log: Log, pg_dsn: str, guarantee: Guarantee
) -> None:
    """A deferred foreign key is checked at COMMIT: a connection whose records inserted child
    rows waits for the parent row that another connection of the window holds locked, and
    that one commits only after it (exactly-once), or at the same time (at-least-once: every
    connection commits at once). The waiting commit gives up after a few seconds (rolled
    back, handled again) and the window goes on with one connection: no hang, every effect
    once."""
    schema = (
        *SCHEMA,
        "CREATE TABLE IF NOT EXISTS accounts (id INT PRIMARY KEY)",
        "INSERT INTO accounts VALUES (1) ON CONFLICT DO NOTHING",
        "CREATE TABLE IF NOT EXISTS transfers (v BYTEA PRIMARY KEY, account INT REFERENCES "
        "accounts (id) DEFERRABLE INITIALLY DEFERRED)",
    )
    values = fill(log, 40, keys=4)
    app = App(log=log, group="g", guarantee=guarantee)

    @app.handler("in", sink=PostgresSink(pg_dsn, schema=schema), concurrency=8)
    async def move(msg: Message, db: Any) -> None:
        if msg.key in (b"k0", b"k2"):  # locks the parent row, and keeps its connection
            await db.execute("SELECT id FROM accounts WHERE id = 1 FOR UPDATE")
            await asyncio.sleep(0.1)
        await db.execute("INSERT INTO transfers VALUES (%s, 1)", (msg.value,))

    assert ends_within(app, 60, until_idle=1), "commits waiting for each other's locks hung"
    found = sorted(bytes(v) for (v,) in rows(pg_dsn, "SELECT v FROM transfers"))
    assert found == values


def test_every_record_held_past_its_limit_in_one_look_is_cancelled_as_overrun(
    tmp_path: Path,
) -> None:
    """Records found past transaction_timeout_ms in the same look are each cancelled as
    overrun (each then fails with a TimeoutError and is retried); when only the last one was
    remembered, the others counted as given up and were left neither handled nor failed."""
    from assured import SqliteSink
    from assured.runtime._shared_db import SharedTransaction, _Lane

    async def scenario() -> set[asyncio.Task[Any]]:
        sink = SqliteSink(tmp_path / "x.db")
        shared = SharedTransaction(sink, "g", {}, marks=True, epochs=dict, region_limit_s=1)
        stuck = [asyncio.create_task(asyncio.sleep(3600)) for _ in range(3)]
        for task in stuck:
            lane = _Lane(sink.side_by_side("g", {}))
            lane.holder, lane.held_since = task, time.monotonic() - 5
            shared.lanes.append(lane)
        await shared.unblock(lambda _records: None)
        await asyncio.gather(*stuck, return_exceptions=True)
        assert all(t.cancelled() for t in stuck)
        return set(shared.overran) ^ set(stuck)

    assert asyncio.run(scenario()) == set()


def test_records_waiting_for_a_connection_given_up_by_the_fallback_get_the_first(
    tmp_path: Path,
) -> None:
    """When the window falls back to one connection, a record waiting for another one (bound
    to it by its key) is handed the first instead of waiting for a step that never comes."""
    from assured import SqliteSink
    from assured.runtime._shared_db import SharedTransaction, _Lane

    async def scenario() -> bool:
        sink = SqliteSink(tmp_path / "x.db")
        shared = SharedTransaction(sink, "g", {}, marks=True, epochs=dict)
        shared.most = 2
        first, second = (_Lane(sink.side_by_side("g", {})) for _ in range(2))
        shared.lanes = [first, second]
        second.holder = shared  # being committed
        shared._bound[("in", 0, b"k")] = second
        shared.reopen()
        waiter = asyncio.create_task(shared.take(affinity=("in", 0, b"k")))
        await asyncio.sleep(0.01)
        assert not waiter.done()  # waits for its own connection
        shared._one_connection()  # that connection's commit waited too long
        lane, _ = await asyncio.wait_for(waiter, 1)
        return lane is first

    assert asyncio.run(scenario())


NASTY = [
    "x'); COMMIT; --",
    "a\\'; COMMIT; --'",
    "line\nbreak -- ; */ /*",
    "cr\rCOMMIT;",
    "$$; COMMIT; $$",
    "100%% %s %(k)s",
    'é ✓ "quoted"',
]


def test_a_first_statement_merged_with_its_savepoint_keeps_every_value_as_it_was(
    log: Log, pg_dsn: str
) -> None:
    """A record's first statement goes with its savepoint in one message, its values merged
    in as literals: values that look like SQL (quotes, semicolons, COMMIT, comment marks, line
    breaks, dollar quotes, backslashes, placeholders) come back byte for byte, and what the
    statement returns is read as from any other."""
    fill(log, 6)
    app = App(log=log, group="g", guarantee="exactly-once")
    returned: list[list[str]] = []
    values = ", ".join(["(%s, %s)"] * len(NASTY))

    @app.handler("in", sink=PostgresSink(pg_dsn, schema=SCHEMA), concurrency=4)
    async def keep(msg: Message, db: Any) -> None:
        params = [p for text in NASTY for p in (msg.key, text.encode())]
        result = await db.execute(
            f"INSERT INTO charges (k, v) VALUES {values} RETURNING convert_from(v, 'UTF8')",
            params,
        )
        returned.append([v for (v,) in result.fetchall()])

    assert app.run(until_idle=0.5).processed == 6
    assert returned == [NASTY] * 6
    stored = [bytes(v).decode() for (v,) in rows(pg_dsn, "SELECT v FROM charges")]
    assert sorted(stored) == sorted(NASTY * 6)
    assert rows(pg_dsn, "SELECT n FROM totals") == [(0,)]  # nothing else ran


def test_a_first_call_with_a_second_statement_is_refused_and_nothing_of_it_commits(
    log: Log, pg_dsn: str
) -> None:
    """``INSERT ...; COMMIT`` as a record's first call cannot go with the savepoint in one
    message (it would end the window's transaction): it goes in a pipeline, where the server
    refuses a second statement; the record fails, saying so, and its retry, which writes
    alone, commits once."""
    fill(log, 6)
    app = App(log=log, group="g", guarantee="exactly-once")
    refused: list[str] = []
    tried: set[int] = set()

    @app.handler("in", sink=PostgresSink(pg_dsn, schema=SCHEMA), concurrency=4, backoff_ms=1)
    async def smuggle(msg: Message, db: Any) -> None:
        if msg.offset * 2 + msg.partition not in tried:
            tried.add(msg.offset * 2 + msg.partition)
            try:
                await db.execute("UPDATE totals SET n = n + 1 WHERE id = 1; COMMIT")
            except UsageError as e:
                refused.append(str(e))
                raise
        await db.execute(INSERT, (msg.key, msg.value))

    assert app.run(until_idle=0.5).processed == 6
    assert len(refused) == 6
    assert all("one statement per execute" in r for r in refused)
    assert rows(pg_dsn, "SELECT n FROM totals") == [(0,)]
    assert len(charges(pg_dsn)) == 6


def test_the_savepoint_goes_with_a_single_statement_only(pg_dsn: str) -> None:
    """The fast path is the one taken for a plain statement, with its values quoted for the
    connection; a second statement, a value without a literal form or a binary placeholder
    go the other way (None)."""

    async def merged(sql: str, params: Any) -> str | None:
        side: Any = PostgresSink(pg_dsn).side_by_side("g", {})
        await side.begin()
        try:
            made: str | None = side._merged(side._conn, "assured_r1", sql, params)
            return made
        finally:
            await side.close()

    one = asyncio.run(merged("INSERT INTO t VALUES (%s, %s)", ("it's", 1)))
    assert one == "SAVEPOINT assured_r1; INSERT INTO t VALUES ('it''s', ('1'::int2))"
    assert asyncio.run(merged("INSERT INTO t VALUES (%s); COMMIT", (1,))) is None
    assert asyncio.run(merged("INSERT INTO t VALUES (%s)", (object(),))) is None
    assert asyncio.run(merged("INSERT INTO t VALUES (%b)", (b"x",))) is None
    for value in ([1, 2, 70_000], Decimal("0.1"), {"a": 1}, "x" * 9000):  # a list loses its type
        assert asyncio.run(merged("SELECT %s", (value,))) is None


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        ("SELECT %s * %s", (300, 300)),  # int2 parameters overflow; bare 300s would not
        ("SELECT %s * %s", (70_000, 70_000)),
        ("SELECT (%s)::numeric", (0.1 + 0.2,)),  # a float8, not the numeric 0.30000000000000004
        ("SELECT (%s)::text, (%s)::text", (1e-07, -0.0)),
        ("SELECT round(%s, 2)", (2.5,)),  # no round(float8, int): refused both ways
        ("SELECT g FROM generate_series(1, 9) g OFFSET %s ROWS FETCH FIRST %s ROWS ONLY", (2, 3)),
        ("SELECT %s, %s, %s", (float("inf"), float("nan"), -(2**63))),
        ("SELECT pg_typeof(%s)::text, pg_typeof(%s)::text", (2**63, True)),
        ("SELECT %s || %s, %s", ("it's", "\\", b"\x00\xff")),
        (
            "SELECT pg_typeof(%s)::text, %s, %s, %s, %s",
            (
                datetime(2026, 12, 1, 6, 0, tzinfo=UTC),
                date(2026, 12, 1),
                timedelta(seconds=1.5),
                UUID(int=7),
                None,
            ),
        ),
        # what the rows, counts and status of writes read as (the table w: see below)
        ("INSERT INTO w (id, v) VALUES (%s, %s), (%s, %s) RETURNING id, v, j", (1, "a", 2, "b")),
        ("INSERT INTO w (id, v) VALUES (%s, %s)", (3, "c")),
        ("INSERT INTO w (id, v) VALUES (%s, %s)", (9, "dup")),  # a unique violation
        ("UPDATE w SET v = %s WHERE id >= %s", ("x", 0)),
        ("UPDATE w SET v = %s WHERE id > %s", ("x", 100)),  # no row
        ("DELETE FROM w WHERE id = %s RETURNING *", (9,)),
        ("SELECT id, v, j, a, n FROM w WHERE id = %s", (9,)),  # json, array, numeric loaded
        ("SELECT * FROM w WHERE id = %s", (-1,)),  # no row, columns described
        ("WITH moved AS (UPDATE w SET id = id + %s RETURNING id) SELECT * FROM moved", (1,)),
        ("VALUES (%s, %s)", ("v", 2)),
        ("TABLE w", ()),
        ("SELECT 1/%s", (0,)),  # division by zero: its error class both ways
    ],
)
def test_a_merged_statement_means_what_it_means_with_parameters(
    pg_dsn: str, sql: str, params: Any
) -> None:
    """A value merged in as a literal is typed as psycopg types the parameter (int2, int4,
    int8, numeric by size; float8), so a statement returns, writes or refuses the same on the
    merged path as with parameters sent apart. The merged path's message goes straight on
    libpq (_pg_wire): its rows, rowcount, status and columns read as psycopg's cursor's, and
    a failed statement raises psycopg's own error class."""

    async def both() -> tuple[Any, Any]:
        side: Any = PostgresSink(pg_dsn).side_by_side("g", {})
        await side.begin()
        try:
            await side._conn.execute(
                "CREATE TEMP TABLE w (id INT PRIMARY KEY, v TEXT, j JSONB DEFAULT '{\"k\": [1]}', "
                "a INT[] DEFAULT '{1,2}', n NUMERIC DEFAULT 0.5) ON COMMIT DROP"
            )
            await side._conn.execute("INSERT INTO w (id, v) VALUES (9, 'nine')")
            outcomes: list[Any] = []
            for merged in (True, False):
                await side._conn.execute("SAVEPOINT s")
                try:
                    if merged:
                        got = await side.execute(sql, params, savepoint="assured_r1")
                        rows = got.fetchall()
                    else:
                        got = await side._conn.execute(sql, params, prepare=False)
                        rows = await got.fetchall() if got.description is not None else []
                    columns = [(c.name, c.type_code) for c in got.description or []]
                    outcomes.append((rows, got.rowcount, got.statusmessage, columns))
                except psycopg.Error as e:
                    outcomes.append((type(e).__name__, e.sqlstate))
                await side._conn.execute("ROLLBACK TO SAVEPOINT s")
            assert side._wire is not None  # the merged statement went straight on libpq
            return outcomes[0], outcomes[1]
        finally:
            await side.close()

    merged, apart = asyncio.run(both())
    if len(merged) == 4 and len(apart) == 4:
        # The one difference: a bare value's column, unnamed as a parameter ("?column?"),
        # is named by its literal's cast when merged (int8, date, ...).
        named = [
            (m if a[0] == "?column?" else a[0], a[1])
            for (m, _), a in zip(merged[3], apart[3], strict=True)
        ]
        apart = (*apart[:3], named)
    assert repr(merged) == repr(apart)  # NaN is not equal to itself


@pytest.mark.parametrize(
    ("sql", "wired"),
    [
        ("INSERT INTO t VALUES (1)", True),
        ("/* a */ -- b\n select 1", True),
        ("WITH x AS (SELECT 1) SELECT * FROM x", True),
        ("values (1)", True),
        ("COPY t FROM STDIN", False),  # would wait for data
        ("SET x = 1", False),
        ("SELECTED", False),
        ("", False),
    ],
)
def test_only_plain_statements_go_straight_on_libpq(sql: str, wired: bool) -> None:
    assert wire_statement(sql) is wired


def _terminate(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_call_cancelled_on_the_wire_stops_its_statement_and_nothing_of_it_commits(
    pg_dsn: str,
) -> None:
    """A record's first statement cancelled while on the wire (a record past its limit, a
    window given up): the statement is cancelled on the server (no lock held meanwhile), the
    connection is dropped at the commit, and what the transaction held never commits, the
    parts of records already kept included."""

    async def run() -> tuple[float, str, list[Any]]:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS wired (id INT)")
            conn.execute("TRUNCATE wired")
        side: Any = PostgresSink(pg_dsn).side_by_side("g", {})
        await side.begin()
        await side.execute("INSERT INTO wired VALUES (%s)", (1,), savepoint="assured_r1")
        await side.end_region("assured_r1", None)  # kept: a record done
        pid = (await side.execute("SELECT pg_backend_pid()")).fetchone()[0]
        call = asyncio.ensure_future(
            side.execute("SELECT pg_sleep(%s)", (60,), savepoint="assured_r2")
        )
        await asyncio.sleep(0.3)
        began = time.monotonic()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for _ in range(100):  # the server stopped the statement
                state = conn.execute(
                    "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()
                if state is None or state[0] != "active":
                    break
                time.sleep(0.05)
        stopped = time.monotonic() - began
        with pytest.raises(SinkUnavailableError) as e:
            await side.commit()
        await side.close()
        return stopped, str(e.value), rows(pg_dsn, "SELECT id FROM wired")

    stopped, error, found = asyncio.run(run())
    assert stopped < 5  # not the 60 s of the sleep
    assert "cancelled half-way" in error
    assert found == []


def test_a_connection_that_ends_between_calls_on_the_wire_is_lost_not_spun_on(
    pg_dsn: str,
) -> None:
    """The server ends the backend while the connection sits between two calls, the hot
    path's reader still on its socket: the reader leaves it (the event loop does not spin on
    a closed socket), and the next call is the sink's failure, as on any lost connection."""

    async def run() -> tuple[bool, str]:
        side: Any = PostgresSink(pg_dsn).side_by_side("g", {})
        await side.begin()
        await side.execute("SELECT %s", (1,), savepoint="assured_r1")
        pid = (await side.execute("SELECT pg_backend_pid()")).fetchone()[0]
        await side.execute("SELECT %s", (2,), savepoint="assured_r2")  # the reader is on
        await asyncio.to_thread(_terminate, pg_dsn, pid)
        loop = asyncio.get_running_loop()
        turns = 0
        began = loop.time()
        while loop.time() - began < 0.5:  # a reader left on a closed socket would fire each turn
            await asyncio.sleep(0)
            turns += 1
        detached = side._wire._loop is None
        with pytest.raises(SinkUnavailableError) as e:
            await side.execute("SELECT %s", (3,), savepoint="assured_r3")
        await side.rollback(e.value)
        await side.close()
        return detached, str(e.value)

    detached, error = asyncio.run(run())
    assert detached
    assert "lost the connection" in error


def test_rows_on_the_wire_are_read_in_the_client_encoding_of_the_moment(pg_dsn: str) -> None:
    """A handler may SET client_encoding on its connection: rows read straight off libpq are
    decoded in the encoding of the moment, as psycopg's cursor decodes them."""

    async def run() -> list[Any]:
        side: Any = PostgresSink(pg_dsn).side_by_side("g", {})
        await side.begin()
        try:
            got = [(await side.execute("SELECT %s", ("é",), savepoint="assured_r1")).fetchall()]
            await side.execute("SET client_encoding TO 'LATIN1'")
            got.append((await side.execute("SELECT %s", ("é",), savepoint="assured_r2")).fetchall())
            await side.execute("RESET client_encoding")
            got.append((await side.execute("SELECT %s", ("é",), savepoint="assured_r3")).fetchall())
            return got
        finally:
            await side.close()

    assert asyncio.run(run()) == [[("é",)]] * 3


def test_a_call_on_the_wire_whose_reader_is_taken_off_still_ends(pg_dsn: str) -> None:
    """A call on the wire whose reader is taken off the socket under it (a detach from a task
    a handler left running) still gets its results: it reads the socket itself after a while,
    rather than wait for ever (holding the connection's lock, and the commit behind it)."""

    async def run() -> list[Any]:
        side: Any = PostgresSink(pg_dsn).side_by_side("g", {})
        await side.begin()
        try:
            call = asyncio.ensure_future(
                side.execute("SELECT pg_sleep(%s), %s", (0.3, "done"), savepoint="assured_r1")
            )
            await asyncio.sleep(0.1)
            side._unwire()  # as another task's psycopg call would, while this one waits
            result = await asyncio.wait_for(call, 5)
            await side.commit()  # the connection is in order after it
            rows: list[Any] = result.fetchall()
            return rows
        finally:
            await side.close()

    assert asyncio.run(run()) == [("", "done")]


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_records_that_deadlock_each_other_are_done_again_not_dead_lettered(
    log: Log, pg_dsn: str, guarantee: Guarantee
) -> None:
    """Transfers between two accounts, in either direction, by records on different
    connections whose transactions hold their row locks until their group commits: they
    deadlock each other, and PostgreSQL fails one statement of each deadlock. That is no
    fault of the record's: it is done again (its retries kept) and succeeds. Before, each
    deadlock spent a retry, and with retries=0 sent the record to its dead letters: a transfer
    never made, its account left unbalanced."""
    with log.admin() as admin:
        admin.create_topic("dlq", 1)
    values = fill(log, 60, keys=60)
    fast = pg_dsn.replace("options=", "options=-cdeadlock_timeout%3D50%20")  # found in 50 ms
    schema = (
        "CREATE TABLE IF NOT EXISTS accounts (id INT PRIMARY KEY, n INT NOT NULL)",
        "INSERT INTO accounts VALUES (1, 0), (2, 0) ON CONFLICT DO NOTHING",
        "CREATE TABLE IF NOT EXISTS transfers (v BYTEA PRIMARY KEY)",
    )
    deadlocks: list[bytes] = []
    app = App(log=log, group="g", guarantee=guarantee)

    @app.handler("in", sink=PostgresSink(fast, schema=schema), concurrency=8, retries=0,
                 dead_letter="dlq", ordering="unordered")  # fmt: skip
    async def transfer(msg: Message, db: Any) -> None:
        src, dst = (1, 2) if int(msg.value[1:]) % 2 else (2, 1)
        try:
            await db.execute("UPDATE accounts SET n = n - 1 WHERE id = %s", (src,))
            await asyncio.sleep(0.002)  # the gateway's answer, while holding the row
            await db.execute("UPDATE accounts SET n = n + 1 WHERE id = %s", (dst,))
        except psycopg.errors.DeadlockDetected:
            deadlocks.append(msg.value)
            raise
        await db.execute("INSERT INTO transfers VALUES (%s)", (msg.value,))

    assert ends_within(app, 120, until_idle=1)
    assert deadlocks, "no deadlock happened: the test proves nothing"
    assert read_all(log, "dlq") == []
    assert sorted(bytes(v) for (v,) in rows(pg_dsn, "SELECT v FROM transfers")) == values
    assert rows(pg_dsn, "SELECT id, n FROM accounts ORDER BY id") == [(1, 0), (2, 0)]


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_plain_batch_that_deadlocks_with_another_transaction_gives_way_and_is_done_again(
    log: Log, pg_dsn: str, guarantee: Guarantee
) -> None:
    """A plain def's batch holds its rows' locks in one transaction. Another transaction
    (another process) takes row 2, then waits for row 1, which the batch's first record
    holds; the batch's second record then waits for row 2: a deadlock, and PostgreSQL fails
    the batch's statement. Done again in place, that record met the same deadlock (the batch
    still held row 1): dead-lettered, the other transaction stuck until the batch ended. Now
    the batch's transaction gives way (rolled back, done again once the other committed)."""
    with log.admin() as admin:
        admin.create_topic("dlq", 1)
    with log.producer() as producer:
        for v in (b"1", b"2"):
            producer.send("in", v, key=v, partition=0)
        producer.flush()
    fast = pg_dsn.replace(
        "options=", "options=-cdeadlock_timeout%3D50%20"
    )  # the App's side sees it
    schema = (
        "CREATE TABLE IF NOT EXISTS accounts (id INT PRIMARY KEY, n INT NOT NULL)",
        "INSERT INTO accounts VALUES (1, 0), (2, 0) ON CONFLICT DO NOTHING",
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for statement in schema:
            conn.execute(statement)
    took_1, other_waits = threading.Event(), threading.Event()
    deadlocks: list[bytes] = []
    app = App(log=log, group="g", guarantee=guarantee)

    @app.handler("in", sink=PostgresSink(fast), retries=0, dead_letter="dlq")
    def credit(msg: Message, db: Any) -> None:
        try:
            db.execute("UPDATE accounts SET n = n + 1 WHERE id = %s", (int(msg.value),))
        except psycopg.errors.DeadlockDetected:
            deadlocks.append(msg.value)
            raise
        if msg.value == b"1" and not took_1.is_set():
            took_1.set()
            other_waits.wait(10)
            time.sleep(0.2)  # the other transaction is now waiting for row 1

    def other() -> None:
        with psycopg.connect(pg_dsn) as conn:  # deadlock_timeout 1 s: the App's side sees it first
            conn.execute("UPDATE accounts SET n = n + 10 WHERE id = 2")
            took_1.wait(10)
            other_waits.set()
            conn.execute("UPDATE accounts SET n = n + 10 WHERE id = 1")  # waits for the batch
            conn.commit()

    outside = threading.Thread(target=other, daemon=True)
    outside.start()
    assert ends_within(app, 60, until_idle=1)
    outside.join(10)
    assert not outside.is_alive()
    assert deadlocks == [b"2"], "the deadlock did not happen as planned: the test proves nothing"
    assert read_all(log, "dlq") == []
    assert rows(pg_dsn, "SELECT id, n FROM accounts ORDER BY id") == [(1, 11), (2, 11)]


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_record_that_always_conflicts_redoes_its_batch_a_bounded_number_of_times(
    log: Log, pg_dsn: str, guarantee: Guarantee
) -> None:
    """From a review: a plain batch done again for each conflict had no bound but the retry
    deadline: a record whose statement always fails with a serialization failure stopped the
    App, or, with other partitions committing meanwhile, redid its batch for ever. Now after
    BATCH_CONFLICT_REDOS its conflict is its failure: retried, then dead-lettered; every other
    record's row commits once."""
    from assured.runtime._handling import BATCH_CONFLICT_REDOS

    with log.admin() as admin:
        admin.create_topic("dlq", 1)
    with log.producer() as producer:
        for v in (b"a", b"b", b"poison", b"c"):
            producer.send("in", v, key=v, partition=0)
        producer.flush()
    calls: Counter[bytes] = Counter()
    app = App(log=log, group="g", guarantee=guarantee)
    schema = "CREATE TABLE IF NOT EXISTS t (v TEXT)"

    @app.handler("in", sink=PostgresSink(pg_dsn, schema=schema), retries=1, dead_letter="dlq")
    def write(msg: Message, db: Any) -> None:
        calls[msg.value] += 1
        db.execute("INSERT INTO t VALUES (%s)", (msg.value.decode(),))
        if msg.value == b"poison":  # as a serialization failure that never goes away
            db.execute("DO $$ BEGIN RAISE EXCEPTION 'no' USING ERRCODE = '40001'; END $$")

    assert ends_within(app, 60, until_idle=1)
    assert calls[b"poison"] == BATCH_CONFLICT_REDOS + 2  # then once more, its one retry
    assert [r.value for r in read_all(log, "dlq")] == [b"poison"]
    assert sorted(v for (v,) in rows(pg_dsn, "SELECT v FROM t")) == ["a", "b", "c"]


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
@pytest.mark.parametrize("kind", ["plain def", "async def"])
def test_a_serializable_transaction_that_loses_a_write_skew_is_done_again(
    log: Log, pg_dsn: str, guarantee: Guarantee, kind: str
) -> None:
    """From a review: under SERIALIZABLE, PostgreSQL fails a transaction that lost a write
    skew at a later statement (the runtime's own: its positions, its marks) or at COMMIT,
    with a serialization failure. That stopped the App with the raw error. It is a conflict,
    not a fault: the transaction rolled back, and its records are handled again, once."""
    with log.producer() as producer:
        for v in (b"a", b"b"):
            producer.send("in", v, key=v, partition=0)
        producer.flush()
    serializable = pg_dsn + "%20-cdefault_transaction_isolation%3Dserializable"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE acct (id INT PRIMARY KEY, n INT)")
        conn.execute("INSERT INTO acct VALUES (1, 0), (2, 0)")
    went = threading.Event()

    def skew() -> None:  # reads what the record read, writes what it did not, commits first
        went.set()
        with psycopg.connect(serializable) as other:
            other.execute("SELECT sum(n) FROM acct").fetchone()
            other.execute("UPDATE acct SET n = n + 10 WHERE id = 2")
            other.commit()

    app = App(log=log, group="g", guarantee=guarantee)
    sink = PostgresSink(serializable)
    if kind == "plain def":

        @app.handler("in", sink=sink)
        def credit(msg: Message, db: Any) -> None:
            db.execute("SELECT sum(n) FROM acct").fetchone()
            db.execute("UPDATE acct SET n = n + 1 WHERE id = 1")
            if msg.value == b"b" and not went.is_set():
                skew()

    else:

        @app.handler("in", sink=sink)
        async def credit_async(msg: Message, db: Any) -> None:
            await db.execute("SELECT sum(n) FROM acct")
            await db.execute("UPDATE acct SET n = n + 1 WHERE id = 1")
            if msg.value == b"b" and not went.is_set():
                await asyncio.to_thread(skew)

    assert ends_within(app, 60, until_idle=1)
    assert went.is_set()
    assert rows(pg_dsn, "SELECT id, n FROM acct ORDER BY id") == [(1, 2), (2, 10)]


@pytest.mark.parametrize("commit", ["fence_and_mark", "commit_marked", "store_positions"])
def test_a_claim_and_a_commit_lock_partitions_in_one_order_whatever_the_collation(
    postgres_dsn: str, commit: str
) -> None:
    """From a review: a commit side by side locked its partitions' offsets rows in the
    database's collation order, a claim in Python's (by code point). Under en-US "audit" comes
    before "Orders", and in Python after: a claim racing a commit on both deadlocked (one of
    them failed after PostgreSQL's deadlock_timeout). Both now lock by code point."""
    name = f"assured_icu_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu "
            "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
    dsn = psycopg.conninfo.make_conninfo(postgres_dsn, dbname=name)
    try:
        orders, audit = TopicPartition("Orders", 0), TopicPartition("audit", 0)
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 'audit' < 'Orders'").fetchone() == (True,)
        sink = PostgresSink(dsn)
        sink.setup()
        epochs = {tp: epoch for tp, (_, epoch) in sink.claim("g", [orders, audit]).items()}
        blocker = psycopg.connect(dsn)  # holds "Orders": the claim queues on it first
        blocker.execute("SELECT 1 FROM assured_offsets WHERE topic = 'Orders' FOR UPDATE")
        claimed: list[BaseException | None] = []

        def claim() -> None:
            try:
                with PostgresSink(dsn) as other:
                    other.claim("g", [orders, audit])
                claimed.append(None)
            except BaseException as e:
                claimed.append(e)

        claimer = threading.Thread(target=claim)
        claimer.start()
        time.sleep(0.3)

        async def run() -> TopicPartition | None:
            side = sink.side_by_side("g", {})
            await side.begin()
            if commit in ("fence_and_mark", "commit_marked"):
                fences = [(orders, epochs[orders]), (audit, epochs[audit])]
                call = side.fence_and_mark if commit == "fence_and_mark" else side.commit_marked
                work = call(fences, [])
            else:
                work = side.store_positions([], [(orders, 5, epochs[orders]), (audit, 7, 1)])
            task = asyncio.ensure_future(work)
            await asyncio.sleep(0.3)  # it waits for "Orders" (before: holding "audit")
            blocker.commit()
            try:
                return await task
            finally:
                await side.rollback(RuntimeError("the test is over"))
                await side.close()

        try:
            fenced = asyncio.run(run())
        finally:
            claimer.join(30)
            blocker.close()
            sink.close()
        assert claimed == [None]
        assert fenced == orders  # the claim went first: both partitions are no longer ours
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_record_cut_off_in_begin_does_not_end_its_begin_after_the_next_records(
    pg_dsn: str,
) -> None:
    """From a review: a record cut off (see RecordDb.cut_off) while its begin() waited to
    connect again gave the connection back; the next record began on it and ran a statement;
    then the first begin() ended, and made the open transaction look new (the second record's
    part looked rolled back, so its record would be handled again beside its committed
    statement) and forgot an undo. Begins now take turns. The server's absence is simulated:
    the first connect fails as one to a server that is away does."""
    sink = PostgresSink(pg_dsn, schema="CREATE TABLE IF NOT EXISTS late (v TEXT)")
    sink.setup()

    async def run() -> tuple[int, int, str | None]:
        side = sink.side_by_side("g", {})
        connect, away = side._connect, [True]  # type: ignore[attr-defined]

        async def flaky() -> Any:
            if away.pop() if away else False:
                raise postgres_sink._DownError("the server is away (simulated)")
            return await connect()

        side._connect = flaky  # type: ignore[attr-defined]
        cut = asyncio.ensure_future(side.begin())  # waits to connect again
        await asyncio.sleep(0.01)
        side.abandon()  # its record is cut off
        await side.begin()  # the next record's
        mine = side.generation
        await side.execute("INSERT INTO late VALUES ('B')", (), "assured_r1")
        side.undo_later("assured_r1")  # a statement to be undone before the commit
        await cut
        undo = side._undo_first  # type: ignore[attr-defined]
        now = side.generation
        await side.commit()
        await side.close()
        return mine, now, undo

    with sink:
        mine, now, undo = asyncio.run(run())
    assert now == mine
    assert undo == "assured_r1"
    assert rows(pg_dsn, "SELECT v FROM late") == []
