"""Records' first statements in one message on PostgreSQL (issue 14): records waiting for a
connection have their savepoints and first statements sent together by the record whose turn
it is. Each gets its result only on its own turn, so every record must see, and leave, what it
would have had its statement run then: a record ahead that calls again or fails, a statement
of the batch that fails, a record given up before its turn, a group commit or a rollback
while some wait: nothing of a record commits without it, and nothing runs twice. Against a
real PostgreSQL, one connection, records played step by step."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from assured import App, Message, PostgresSink
from assured.log import Log
from assured.runtime._shared_db import RecordDb, SharedTransaction, _Waiter
from assured.sinks import SinkUnavailableError, _pg_wire
from tests.conftest import fill_keyed as fill
from tests.sinks.conftest import read_all

pytestmark = pytest.mark.postgres

TABLE = "CREATE TABLE steps (id BIGINT GENERATED ALWAYS AS IDENTITY, who TEXT UNIQUE)"
INSERT = "INSERT INTO steps (who) VALUES (%s)"


def committed(dsn: str) -> list[str]:
    """Who committed a row, in the order the rows were made."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [who for (who,) in conn.execute("SELECT who FROM steps ORDER BY id")]


class Messages:
    """Counts the messages of records' statements sent straight on libpq (the hot path's), by
    wrapping Wire.run (a connection's commit goes that way too, with no savepoint in it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.sent: list[int] = []  # statements in each
        run = _pg_wire.Wire.run

        async def counted(wire: _pg_wire.Wire, query: bytes) -> Any:
            if b"SAVEPOINT" in query:
                self.sent.append(query.count(b"SAVEPOINT"))
            return await run(wire, query)

        monkeypatch.setattr(_pg_wire.Wire, "run", counted)


class Play:
    """A window of one connection and records played on it: each inserts its name, may wait
    for a go, then may insert again, raise, or be cancelled."""

    def __init__(self, dsn: str):
        self.sink = PostgresSink(dsn, connections=1)
        self.shared = SharedTransaction(self.sink, "g", {}, marks=False, epochs=dict)
        self.shared.again = 0.0  # as after records seen to make one call each
        self.shared.reopen()
        self.go: dict[str, asyncio.Event] = {}
        self.got: dict[str, Any] = {}  # what each record's first call returned or raised
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def record(
        self, name: str, hold: bool = False, again: bool = False, fail: bool = False
    ) -> None:
        self.go[name] = asyncio.Event()
        if not hold:
            self.go[name].set()

        async def run() -> None:
            task = asyncio.current_task()
            assert task is not None
            db = RecordDb(self.shared, task)
            try:
                try:
                    result = await db.execute(INSERT + " RETURNING who", (name,))
                    self.got[name] = result.fetchone()[0]
                except psycopg.Error as e:
                    self.got[name] = e
                    raise
                await self.go[name].wait()
                if again:
                    await db.execute(INSERT, (name + "+",))
                if fail:
                    raise RuntimeError(name)
            except BaseException as e:
                await db.end(e)
                raise
            await db.end(None)

        self.tasks[name] = asyncio.create_task(run())

    async def settle(self, times: int = 20) -> None:
        for _ in range(times):
            await asyncio.sleep(0.01)

    async def commit(self) -> None:
        await self.shared.commit(lambda: ([], {}))

    async def close(self) -> None:
        """Whatever happened, no transaction is left open (it would hold the test's schema)."""
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self.shared.close()

    async def finish(self) -> dict[str, BaseException | None]:
        done = await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self.commit()
        await self.shared.close()
        return {n: r for n, r in zip(self.tasks, done, strict=True) if r is not None}


def play(dsn: str, scenario: Callable[[Play], Awaitable[None]], *setup: str) -> Play:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql in (TABLE, *setup):
            conn.execute(sql)

    async def main() -> Play:
        p = Play(dsn)
        try:
            await asyncio.wait_for(scenario(p), 20)
        finally:
            await p.close()
        return p

    return asyncio.run(main())


async def a_batch_behind(p: Play, b: dict[str, bool] | None = None) -> None:
    """A holds the connection; B (``b``: its behaviour) and C..F wait for it; A ends, and B
    sends its statement with C..F's. Returns with B holding the connection."""
    p.record("A", hold=True)
    await p.settle()
    p.record("B", hold=True, **(b or {}))
    for name in "CDEF":
        p.record(name)
    await p.settle()
    p.go["A"].set()
    await p.settle()


def test_waiting_records_first_statements_go_in_one_message_and_keep_their_order(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = Messages(monkeypatch)

    async def scenario(p: Play) -> None:
        await a_batch_behind(p)
        assert p.got["B"] == "B"
        assert "C" not in p.got  # C's result only on its turn
        p.go["B"].set()
        assert await p.finish() == {}

    p = play(pg_dsn, scenario)
    assert messages.sent == [1, 5]  # A alone; B with C, D, E and F
    assert p.got == {n: n for n in "ABCDEF"}
    assert committed(pg_dsn) == list("ABCDEF")


def test_a_record_that_calls_again_has_the_batch_after_it_undone_and_sent_again(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = Messages(monkeypatch)

    async def scenario(p: Play) -> None:
        await a_batch_behind(p, {"again": True})
        p.go["B"].set()
        assert await p.finish() == {}

    p = play(pg_dsn, scenario)
    # B's second row comes right after its first: C..F's first run was undone, then redone
    assert committed(pg_dsn) == ["A", "B", "B+", "C", "D", "E", "F"]
    assert p.got == {n: n for n in "ABCDEF"}
    assert messages.sent[:2] == [1, 5]
    assert messages.sent[-1] == 4  # C with D, E and F again


def test_a_record_that_fails_takes_nothing_of_the_others_with_it(pg_dsn: str) -> None:
    async def scenario(p: Play) -> None:
        await a_batch_behind(p, {"fail": True})
        p.go["B"].set()
        failed = await p.finish()
        assert list(failed) == ["B"]
        assert isinstance(failed["B"], RuntimeError)

    play(pg_dsn, scenario)
    assert committed(pg_dsn) == ["A", "C", "D", "E", "F"]


def test_a_statement_that_fails_in_a_batch_fails_its_own_record_alone(pg_dsn: str) -> None:
    async def scenario(p: Play) -> None:
        await a_batch_behind(p)
        p.go["B"].set()
        failed = await p.finish()
        assert list(failed) == ["D"]
        assert isinstance(failed["D"], psycopg.errors.UniqueViolation)

    p = play(pg_dsn, scenario, "INSERT INTO steps (who) VALUES ('D')")  # D's will conflict
    assert isinstance(p.got["D"], psycopg.errors.UniqueViolation)
    assert all(p.got[n] == n for n in "ABCEF")
    assert committed(pg_dsn) == ["D", "A", "B", "C", "E", "F"]  # D: the row there before


def test_a_record_given_up_before_its_turn_leaves_nothing_and_those_after_it_go_again(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = Messages(monkeypatch)

    async def scenario(p: Play) -> None:
        await a_batch_behind(p)
        p.tasks["D"].cancel()  # its statement ran in B's message; it never gets its turn
        await p.settle()
        p.go["B"].set()
        failed = await p.finish()
        assert list(failed) == ["D"]
        assert isinstance(failed["D"], asyncio.CancelledError)

    p = play(pg_dsn, scenario)
    assert committed(pg_dsn) == ["A", "B", "C", "E", "F"]
    assert messages.sent == [1, 5, 2]  # E and F again, after D's statement was undone
    assert "D" not in p.got


def test_the_last_record_of_a_batch_given_up_leaves_nothing_at_the_commit(pg_dsn: str) -> None:
    """No record uses the connection after F's statement is to be undone: the commit does it."""

    async def scenario(p: Play) -> None:
        await a_batch_behind(p)
        p.tasks["F"].cancel()
        await p.settle()
        p.go["B"].set()
        failed = await p.finish()
        assert list(failed) == ["F"]

    play(pg_dsn, scenario)
    assert committed(pg_dsn) == list("ABCDE")


def test_a_record_handed_its_turn_as_it_is_cancelled_leaves_nothing(pg_dsn: str) -> None:
    async def scenario(p: Play) -> None:
        await a_batch_behind(p)
        p.go["B"].set()
        for _ in range(50):  # C's turn: handed the connection, not yet resumed
            await asyncio.sleep(0)
            if isinstance(p.shared.lanes[0].holder, _Waiter):
                p.tasks["C"].cancel()
                break
        assert "C" not in p.got
        failed = await p.finish()
        assert list(failed) == ["C"]

    play(pg_dsn, scenario)
    assert committed(pg_dsn) == ["A", "B", "D", "E", "F"]


def test_a_group_commit_begun_while_records_wait_with_statements_run_takes_them_all(
    pg_dsn: str,
) -> None:
    async def scenario(p: Play) -> None:
        await a_batch_behind(p)
        commit = asyncio.create_task(p.commit())  # the gate shuts; C..F's statements ran
        await p.settle()
        assert not commit.done()  # waits for B, and for C..F to have their turns
        p.go["B"].set()
        await asyncio.wait_for(commit, 5)
        assert committed(p.sink.dsn) == list("ABCDEF")
        assert await p.finish() == {}

    play(pg_dsn, scenario)


def test_a_rollback_while_records_wait_with_statements_run_has_them_run_again(
    pg_dsn: str,
) -> None:
    async def scenario(p: Play) -> None:
        await a_batch_behind(p)
        await p.shared.rollback()  # a failed step: A's, B's and C..F's statements are gone
        p.go["B"].set()
        await p.settle()
        p.shared.reopen()  # the next step: C..F run again, in a new transaction
        failed = await p.finish()
        assert list(failed) == ["B"]  # its part was rolled back under it

    play(pg_dsn, scenario)
    assert committed(pg_dsn) == ["C", "D", "E", "F"]


def test_records_side_by_side_in_batches_commit_each_effect_once(
    log: Log, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An App into PostgreSQL on two connections, 600 records 100 at a time: most make one
    insert; some insert again after a wait, some fail for good after their insert, some
    conflict with a row already there (dead-lettered): every record that succeeded has its
    rows once, none of the others has any, and batches did form."""
    messages = Messages(monkeypatch)
    values = fill(log, 600)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE fx (id BIGSERIAL, v BYTEA UNIQUE, k BYTEA)")
        conn.execute("INSERT INTO fx (v) VALUES (%s)", (b"m0250",))
    app = App(log=log, group="g", guarantee="exactly-once")
    rng = random.Random(5)

    @app.handler(
        "in", sink=PostgresSink(pg_dsn, connections=2), concurrency=100, retries=1, backoff_ms=1
    )
    async def handle(msg: Message, db: Any) -> None:
        await asyncio.sleep(rng.random() * 0.01)
        n = int(msg.value[1:])
        await db.execute("INSERT INTO fx (v, k) VALUES (%s, %s)", (msg.value, msg.key))
        if n % 37 == 0:
            await asyncio.sleep(0.002)
            await db.execute("INSERT INTO fx (v, k) VALUES (%s, %s)", (msg.value + b"+", msg.key))
        if n % 41 == 0:
            raise RuntimeError("fails for good")

    assert app.run(until_idle=0.5).processed == 600
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        found = [bytes(v) for (v,) in conn.execute("SELECT v FROM fx ORDER BY id")]
    failed = {v for v in values if int(v[1:]) % 41 == 0} | {b"m0250"}
    want = [v for v in values if v not in failed] + [
        v + b"+" for v in values if int(v[1:]) % 37 == 0 and v not in failed
    ]
    assert Counter(found) == Counter([*want, b"m0250"])
    assert len(messages.sent) < 400  # batches formed
    assert max(messages.sent) > 2


def test_records_waiting_again_on_a_connection_no_longer_used_get_another(pg_dsn: str) -> None:
    """B's batch ran on the second connection when the window fell back to one (a commit
    waited for a lock): B calls again, and C and D, whose statements it undid, wait for the
    first connection, not for one nobody serves any more (E and F, left out of B's batch as
    the first connection's share, wait for it too)."""

    async def scenario(p: Play) -> None:
        p.record("A", hold=True)
        await p.settle()
        p.record("X", hold=True)
        await p.settle()
        p.record("B", hold=True, again=True)
        for name in "CDEF":
            p.record(name)
        await p.settle()
        p.go["X"].set()  # B gets the second connection, and sends C's and D's with its own
        await p.settle()
        assert len(p.shared.lanes[1].ready) == 2
        p.go["A"].set()
        await p.settle()
        p.shared._one_connection()
        p.go["B"].set()
        assert await asyncio.wait_for(p.finish(), 5) == {}

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(TABLE)

    async def main() -> None:
        p = Play(pg_dsn)
        p.sink = PostgresSink(pg_dsn, connections=2)
        p.shared = SharedTransaction(p.sink, "g", {}, marks=False, epochs=dict)
        p.shared.again = 0.0
        p.shared.reopen()
        try:
            await scenario(p)
        finally:
            await p.close()

    asyncio.run(main())
    assert sorted(committed(pg_dsn)) == sorted(["A", "X", "B", "B+", "C", "D", "E", "F"])


@pytest.mark.parametrize("who", ["B", "E"])
def test_a_record_cancelled_at_any_point_while_statements_are_undone_leaves_none_of_them(
    pg_dsn: str, who: str
) -> None:
    """B fails (its part and the batch after it are undone), or E goes first after D, given up
    before its turn, must have its statement undone: the record is cancelled at each point of
    the way in turn. Whatever lands, neither B's row nor D's ever commits, and no row twice."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(TABLE)

    async def once(k: int) -> list[str]:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE steps")
        p = Play(pg_dsn)
        p.record("A", hold=True)
        await p.settle(2)
        p.record("B", hold=True, fail=who == "B")
        for name in "CDEF":
            p.record(name)
        await p.settle(2)
        p.go["A"].set()
        await p.settle(2)
        if who == "E":
            p.tasks["D"].cancel()
            await p.settle(2)
        p.go["B"].set()
        for _ in range(k):
            await asyncio.sleep(0)
        p.tasks[who].cancel()
        try:
            await asyncio.wait_for(asyncio.gather(*p.tasks.values(), return_exceptions=True), 10)
            with contextlib.suppress(Exception):
                await p.commit()
        finally:
            await p.close()
        return committed(pg_dsn)

    for k in range(30):
        found = asyncio.run(once(k))
        assert "B" not in found or who != "B", k
        assert "D" not in found or who != "E", k
        assert len(found) == len(set(found)), k


@pytest.mark.parametrize("calls", [1, 2])
def test_a_statement_that_does_not_parse_fails_its_own_record_not_the_one_that_sent_it(
    log: Log, pg_dsn: str, calls: int
) -> None:
    """PostgreSQL refuses a message whole when one statement in it does not parse, its
    savepoint too: that is the sink's failure (the step is redone), and from then on that SQL
    goes alone, then in a pipeline, so its own record meets the error and is dead-lettered,
    and every other record's row commits once. With two calls a record no batch is made: the
    record's own message of its savepoint and statement is refused (before, the App stopped
    on the aborted transaction)."""
    values = fill(log, 300)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE fx (id BIGSERIAL, v BYTEA UNIQUE)")
    app = App(log=log, group="g", guarantee="exactly-once")
    rng = random.Random(7)

    @app.handler(
        "in", sink=PostgresSink(pg_dsn, connections=1), concurrency=100, retries=1, backoff_ms=1
    )
    async def handle(msg: Message, db: Any) -> None:
        await asyncio.sleep(rng.random() * 0.01)
        bad = " RETURNING v v v" if msg.value == b"m0150" else ""
        await db.execute("INSERT INTO fx (v) VALUES (%s)" + bad, (msg.value,))
        if calls == 2:
            await db.execute("SELECT 1")

    assert app.run(until_idle=0.5).processed >= 300  # those in flight at a refusal: again
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        found = [bytes(v) for (v,) in conn.execute("SELECT v FROM fx")]
    assert Counter(found) == Counter(v for v in values if v != b"m0150")
    assert [r.value for r in read_all(log, "in.dlq")] == [b"m0150"]


@pytest.mark.parametrize("pause", [0.0, 0.002, 0.2])
def test_a_record_given_up_while_a_call_it_left_running_ends_commits_nothing(
    pg_dsn: str, pause: float
) -> None:
    """R fails while a call it started beside another (gather) still runs: its end cancels
    that call, then undoes its part. R is also given up (a drain's deadline, the region
    limit) ``pause`` after its end began: if that lands while the end waits for the call, its
    part is left neither kept nor undone, so the connection's transaction never commits and
    W, which took the connection meanwhile, fails as the sink's failure (redone with the
    step). Either way none of R's rows ever commits."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(TABLE)

    async def main() -> tuple[BaseException | None, list[str], BaseException | None]:
        p = Play(pg_dsn)

        async def record() -> None:
            task = asyncio.current_task()
            assert task is not None
            db = RecordDb(p.shared, task)
            try:
                await db.execute(INSERT, ("R",))

                async def api() -> None:
                    await asyncio.sleep(0.05)
                    raise RuntimeError("the API failed")

                slow = "INSERT INTO steps (who) SELECT 'R-slow' FROM pg_sleep(0.5)"
                await asyncio.gather(db.execute(slow), api())
            except BaseException as e:
                ended.append(True)
                await db.end(e)
                raise
            await db.end(None)

        ended: list[bool] = []
        r = asyncio.create_task(record())
        while not ended:  # R failed; its end has begun
            await asyncio.sleep(0.001)
        await asyncio.sleep(pause)
        r.cancel()
        await asyncio.gather(r, return_exceptions=True)
        w_error: BaseException | None = None
        try:
            task = asyncio.current_task()
            assert task is not None
            w = RecordDb(p.shared, task)
            try:
                await w.execute(INSERT, ("W",))
            except Exception as e:
                await w.end(e)
                raise
            await w.end(None)
        except Exception as e:
            w_error = e
        commit_error: BaseException | None = None
        try:
            await asyncio.wait_for(p.commit(), 10)
        except Exception as e:
            commit_error = e
        finally:
            await p.close()
        return w_error, committed(pg_dsn), commit_error

    w_error, found, commit_error = asyncio.run(main())
    assert "R" not in found
    assert "R-slow" not in found
    if found != ["W"]:
        assert found == []
        assert isinstance(w_error or commit_error, SinkUnavailableError)
