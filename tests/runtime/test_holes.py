"""Issue 18's holes in the runtime, shown on the embedded engine. Where a test's docstring says
what the old code did, that test failed on it; the others guard paths that were right on the
embedded engine and broke elsewhere (the same cases run on Kafka in tests/kafka/)."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from assured import App, Message, Output, TopicPartition, open_log
from assured.errors import ConfigError, UsageError
from assured.log import Log
from assured.runtime._settings import Guarantee

GUARANTEES: list[Guarantee] = ["at-least-once", "exactly-once"]


@pytest.fixture
def log(tmp_path: Path) -> Log:
    opened = open_log(f"embedded://{tmp_path}/log.db")
    with opened.admin() as admin:
        admin.create_topic("in", 1)
        admin.create_topic("out", 1)
    return opened


def fill(log: Log, values: list[bytes]) -> None:
    with log.producer() as producer:
        for v in values:
            producer.send("in", v)
        producer.flush()


def read(log: Log, topic: str) -> list[bytes | None]:
    with log.consumer(isolation="read_committed") as consumer:
        consumer.assign([TopicPartition(topic, 0)])
        out: list[bytes | None] = []
        while batch := consumer.poll(timeout=0.3):
            out += [r.value for r in batch]
        return out


def committed(log: Log, group: str = "g") -> int | None:
    with log.admin() as admin:
        return admin.committed_offsets(group, ["in"]).get(TopicPartition("in", 0))


BIG = 2_000_000  # over the embedded engine's 1,000,000-byte record limit


@pytest.mark.parametrize("guarantee", GUARANTEES)
@pytest.mark.parametrize("before", [0, 1], ids=["big-only", "small-then-big"])
@pytest.mark.parametrize("last", [False, True], ids=["big-inside", "big-last"])
@pytest.mark.parametrize("refused", ["oversize", "no-topic"])
def test_an_output_over_the_size_limit_is_that_records_failure(
    log: Log, guarantee: Guarantee, before: int, last: bool, refused: str
) -> None:
    """Old code: ``run()`` raised RecordTooLargeError with the transaction open, and closing the
    consumer committed it from on_revoke: ``out`` held a, b and no input offset was committed;
    running again gave a, b, a, b, ... Now the record is retried, then dead-lettered, inside the
    transaction; with part of its outputs already sent, the transaction is aborted and the
    record redone alone, so the part never shows (and, once dead-lettered, is not met again: a
    review found it committed over and over when it was the last record).

    An output over the size limit the producer knows is refused by ``out.send`` itself, so
    its attempt sends nothing at all; an output to a topic the log lacks is refused only as the
    outputs go out, after the part before it (at least once, that part stays out)."""
    fill(log, [b"a", b"b", b"d", b"BIG"] if last else [b"a", b"b", b"BIG", b"d"])
    app = App(log=log, group="g", guarantee=guarantee)

    @app.handler("in", output="out", retries=1, backoff_ms=1)
    def copy(msg: Message, out: Output) -> None:
        if msg.value == b"BIG":
            for _ in range(before):
                out.send(b"part-of-BIG")
            if refused == "oversize":
                out.send(b"x" * BIG)
            else:
                out.send(b"x", topic="no-such-topic")
        else:
            out.send(msg.value)

    stats = app.run(until_idle=1)
    assert stats.stopped_by == "idle"
    outputs = read(log, "out")
    if guarantee == "exactly-once" or before == 0 or refused == "oversize":
        assert outputs == [b"a", b"b", b"d"]
    else:  # at least once, a part that went out stays out; it is not sent again
        expected = (
            [b"a", b"b", b"d", b"part-of-BIG"] if last else [b"a", b"b", b"part-of-BIG", b"d"]
        )
        assert outputs == expected
    assert read(log, "in.dlq") == [b"BIG"]
    assert committed(log) == 4


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_outputs_of_a_failed_attempt_are_not_kept(log: Log, guarantee: Guarantee) -> None:
    """Old code: a handler that sent and then raised on its first attempt left that output in
    the transaction: 10 inputs gave 20 committed receipts."""
    fill(log, [f"m{i}".encode() for i in range(10)])
    app = App(log=log, group="g", guarantee=guarantee)
    attempts: dict[bytes, int] = {}

    @app.handler("in", output="out", retries=2, backoff_ms=1)
    def charge(msg: Message, out: Output) -> None:
        out.send(b"receipt-" + msg.value)
        attempts[msg.value] = attempts.get(msg.value, 0) + 1
        if attempts[msg.value] == 1:
            raise TimeoutError("the gateway timed out after charging")

    app.run(until_idle=1)
    assert sorted(v or b"" for v in read(log, "out")) == sorted(
        f"receipt-m{i}".encode() for i in range(10)
    )
    assert committed(log) == 10


STRAYS = [
    pytest.param(1, False, id="plain-def-thread"),
    pytest.param(1, True, id="async-task"),
    pytest.param(8, True, id="side-by-side-task"),
]


@pytest.mark.parametrize("guarantee", ["at-most-once", *GUARANTEES])
@pytest.mark.parametrize(("concurrency", "is_async"), STRAYS)
def test_a_send_from_work_a_failed_attempt_left_running_is_refused(
    log: Log, guarantee: Guarantee, concurrency: int, is_async: bool
) -> None:
    """Record m0's first attempt leaves work running (a thread from a plain def, a task from an
    async def) that sends through the same ``out`` while the retry and the next records run,
    and between their attempts. Old code: those sends joined whichever attempt's outputs were
    pending and went out with them: 12 receipts for 10 inputs, under every guarantee."""
    fill(log, [f"m{i}".encode() for i in range(10)])
    app = App(log=log, group="g", guarantee=guarantee)
    tried: list[str] = []
    first = True

    def stray(out: Output) -> None:
        try:
            out.send(b"stray")
            tried.append("sent")
        except UsageError as e:
            tried.append(type(e).__name__ if "out.send" in str(e) else repr(e))

    async def later(out: Output) -> None:
        for _ in range(6):
            await asyncio.sleep(0.003)
            stray(out)

    def in_thread(out: Output) -> None:
        for _ in range(6):
            time.sleep(0.003)
            stray(out)

    def attempt(msg: Message, out: Output) -> None:
        nonlocal first
        out.send(b"receipt-" + msg.value)
        if msg.value == b"m0" and first:
            first = False
            if is_async:
                strays.append(asyncio.create_task(later(out)))
            else:
                threading.Thread(target=in_thread, args=(out,)).start()
            raise TimeoutError("the gateway timed out after charging")

    strays: list[asyncio.Task[None]] = []
    options: dict[str, Any] = {"retries": 2, "backoff_ms": 5, "concurrency": concurrency}
    if is_async:

        @app.handler("in", output="out", **options)
        async def charge(msg: Message, out: Output) -> None:
            await asyncio.sleep(0.004)
            attempt(msg, out)

    else:

        @app.handler("in", output="out", **options)
        def charge_plainly(msg: Message, out: Output) -> None:
            time.sleep(0.004)
            attempt(msg, out)

    app.run(until_idle=0.5)
    deadline = time.monotonic() + 5
    while len(tried) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tried == ["StraySendError"] * 6, tried
    assert sorted(v or b"" for v in read(log, "out")) == sorted(
        f"receipt-m{i}".encode() for i in range(10)
    )


def test_sends_from_the_attempts_own_threads_and_tasks_go_out(log: Log) -> None:
    """What the refusal tells a handler to do works: a thread in the attempt's context
    (``asyncio.to_thread``), a task it awaits. A plain thread (or a pool's: submit does not
    copy the context) is refused, and the App stops saying so: that handler would fail every
    record alike, and its records must not all be dead-lettered for it."""
    fill(log, [b"to-thread", b"task"])
    app = App(log=log, group="g", guarantee="exactly-once")
    plain = False

    @app.handler("in", output="out", retries=1, backoff_ms=1)
    async def charge(msg: Message, out: Output) -> None:
        if plain:
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(out.send, [msg.value, msg.value]))
        elif msg.value == b"to-thread":
            await asyncio.to_thread(out.send, msg.value)
        else:

            async def send_soon() -> None:
                await asyncio.sleep(0)
                out.send(msg.value)

            await asyncio.create_task(send_soon())

    app.run(until_idle=0.5)
    assert read(log, "out") == [b"to-thread", b"task"]
    fill(log, [b"pool"])
    plain = True
    with pytest.raises(UsageError, match="without the handler's context"):
        app.run(until_idle=0.5)
    assert read(log, "out") == [b"to-thread", b"task"]
    assert read(log, "in.dlq") == []
    assert committed(log) == 2


def test_an_error_leaving_run_aborts_the_transaction_and_commits_nothing(log: Log) -> None:
    """Any error that escapes ``run()`` with a transaction open aborts it: not committed from
    on_revoke when the consumer leaves, not from close."""
    fill(log, [b"a", b"b", b"c"])
    app = App(log=log, group="g", guarantee="exactly-once", commit_interval_ms=60_000)

    class Crash(BaseException):
        """Not an Exception: the handler wrapper does not retry it; it leaves run()."""

    @app.handler("in", output="out")
    def copy(msg: Message, out: Output) -> None:
        if msg.value == b"c":
            raise Crash
        out.send(msg.value)

    with pytest.raises(Crash):
        app.run(until_idle=1)
    assert read(log, "out") == []
    assert committed(log) is None


def test_async_handlers_run_and_handlers_of_the_wrong_shape_are_refused_when_registered(
    log: Log,
) -> None:
    """Old code: an ``async def`` handler was called and never awaited; every offset committed
    and nothing was sent (exit 0). Now it is awaited (tests/runtime/test_async_handlers.py has
    the rest); a generator, which would also return without running, is refused."""
    fill(log, [b"a", b"b"])
    app = App(log=log, group="g", guarantee="at-least-once")

    async def charge(msg: Message, out: Output) -> None:
        await asyncio.sleep(0.01)
        out.send(msg.value)

    app.handler("in", output="out")(charge)
    app.run(until_idle=0.5)
    assert read(log, "out") == [b"a", b"b"]
    assert committed(log) == 2

    app = App(log=log, group="g2", guarantee="at-least-once")

    async def charges(msg: Message, out: Output) -> Any:
        yield msg.value

    with pytest.raises(ConfigError, match="generator"):
        app.handler("in", output="out")(charges)

    def one_arg(msg: Message) -> None: ...

    with pytest.raises(ConfigError, match="cannot be called as"):
        app.handler("in", output="out")(one_arg)

    def two_args(msg: Message, out: Output) -> None: ...

    with pytest.raises(ConfigError, match="cannot be called as"):
        app.handler("in")(two_args)

    class NoDecode:
        def encode(self, value: Any) -> bytes:
            return b""

    with pytest.raises(ConfigError, match="no decode"):
        app.handler("in", value_codec=NoDecode())  # type: ignore[arg-type]
    app.handler("in", output="out")(two_args)  # the right shape still registers


def test_transaction_labels_are_unique_across_restarts(log: Log) -> None:
    """Old code: labels were ``<transactional-id>:<n>`` with n from 1 in every process, so a
    restart with the same transactional id reused them (the audit saw false aborted reads)."""
    fill(log, [b"a"])
    labels: list[str] = []
    for _ in range(2):
        app = App(log=log, group="g", guarantee="exactly-once", transactional_id="pay-0")
        app.on_transaction = lambda label, outcome: labels.append(label)

        @app.handler("in", output="out")
        def copy(msg: Message, out: Output) -> None:
            out.send(msg.value)

        app.run(until_idle=0.5)
        fill(log, [b"b"])
    assert len(labels) == 2
    assert len(set(labels)) == 2


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_handler_slower_than_the_transaction_timeout_or_max_poll_interval_is_ridden_out(
    log: Log, guarantee: Guarantee
) -> None:
    """Now and then a handler outlasts the transaction timeout and ``max_poll_interval_ms``:
    the App aborts or drops what it may no longer commit, rejoins, and goes on; every record
    ends up handled, exactly once under exactly-once."""
    fill(log, [f"m{i}".encode() for i in range(6)])
    app = App(
        log=log,
        group="g",
        guarantee=guarantee,
        transaction_timeout_ms=1000,
        max_poll_interval_ms=1000,
        session_timeout_ms=6000,
        max_poll_records=2,
    )
    slept = threading.Event()

    @app.handler("in", output="out")
    def copy(msg: Message, out: Output) -> None:
        if msg.value == b"m2" and not slept.is_set():
            slept.set()
            time.sleep(1.6)
        out.send(msg.value)

    stats = app.run(until_idle=3)
    assert slept.is_set()
    assert stats.stopped_by == "idle"
    outputs = sorted(v or b"" for v in read(log, "out"))
    expected = [f"m{i}".encode() for i in range(6)]
    if guarantee == "exactly-once":
        assert outputs == expected
    else:
        assert sorted(set(outputs)) == expected
    assert committed(log) == 6


def test_a_replaced_sink_database_is_an_error_not_a_silent_skip(log: Log, tmp_path: Path) -> None:
    """Old code: with the sink's database gone, a restart found no stored offsets, fell back to
    the log's committed offsets and processed nothing: every effect gone without a word. The
    database's positions are the truth under exactly-once: their absence is an error, unless the
    user chooses where to start."""
    from assured.errors import ConfigError as Refused
    from assured.sinks import SqliteSink

    fill(log, [b"a", b"b"])

    def run(db: Path, **settings: Any) -> int:
        sink = SqliteSink(db)
        app = App(log=log, group="g", guarantee="exactly-once", **settings)

        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS fx (v BLOB)")

        @app.handler("in", sink=sink)
        def effect(msg: Message, tx: Any) -> None:
            tx.execute("INSERT INTO fx VALUES (?)", (msg.value,))

        app.run(until_idle=0.5)
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT count(*) FROM fx").fetchone()[0])

    assert run(tmp_path / "fx.db") == 2
    assert committed(log) == 2
    with pytest.raises(Refused, match=r"no position for group 'g'.*missing_sink_offsets"):
        run(tmp_path / "replaced.db")
    assert run(tmp_path / "replaced.db", missing_sink_offsets="earliest") == 2
    assert run(tmp_path / "other.db", missing_sink_offsets="committed") == 0


def test_the_inbox_keeps_each_group_and_each_topic_incarnation_apart(
    log: Log, tmp_path: Path
) -> None:
    """Old code: ``first_delivery(msg.id)`` keyed on ``topic[p]@offset`` alone: a second group
    writing to the same database skipped every message (groups billing and shipping, 3 messages
    each: the inbox kept only billing's), and a topic deleted and created again reused ids."""
    from assured.sinks import SinkTransaction, SqliteSink

    db = tmp_path / "fx.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE fx (grp TEXT, v BLOB)")

    def run(group: str) -> None:
        app = App(log=log, group=group, guarantee="at-least-once")

        @app.handler("in", sink=SqliteSink(db))
        def effect(msg: Message, tx: SinkTransaction) -> None:
            if tx.first_delivery(msg.id):
                tx.execute("INSERT INTO fx VALUES (?, ?)", (group, msg.value))

        app.run(until_idle=0.5)

    def effects() -> list[tuple[str, bytes]]:
        with sqlite3.connect(db) as conn:
            return sorted(conn.execute("SELECT grp, v FROM fx").fetchall())

    fill(log, [b"a", b"b", b"c"])
    run("billing")
    run("shipping")
    assert effects() == [(g, v) for g in ("billing", "shipping") for v in (b"a", b"b", b"c")]

    with log.admin() as admin:
        admin.delete_topic("in")
        admin.create_topic("in", 1)
    fill(log, [b"x", b"y"])  # offsets 0 and 1 again, in a new incarnation of the topic
    run("billing")
    assert [v for g, v in effects() if g == "billing"] == [b"a", b"b", b"c", b"x", b"y"]


def test_a_dead_letter_the_log_cannot_take_does_not_block_the_others(
    log: Log, tmp_path: Path
) -> None:
    """Exactly-once into a database, a review found: a record of 999,950 bytes fails and is
    dead-lettered into the database; with the relay's headers it is over the topic's limit, so
    every try to publish it failed, and every later dead letter of the group waited behind it,
    for good, with only a warning. Now it is set aside in the table (relayed_ms = -1)."""
    from assured.sinks import SqliteSink

    big = b"x" * (1_000_000 - 50)
    fill(log, [b"ok1", big, b"bad-small", b"ok2"])
    db = tmp_path / "fx.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE fx (v BLOB)")
    app = App(log=log, group="g", guarantee="exactly-once")

    @app.handler("in", sink=SqliteSink(db), retries=0)
    def effect(msg: Message, tx: Any) -> None:
        if msg.value in (big, b"bad-small"):
            raise ValueError("declined")
        tx.execute("INSERT INTO fx VALUES (?)", (msg.value,))

    assert app.run(until_idle=1).stopped_by == "idle"
    assert read(log, "in.dlq") == [b"bad-small"]
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT length(value), relayed_ms > 0 FROM assured_dead_letters ORDER BY id"
        ).fetchall()
        assert rows == [(len(big), 0), (len(b"bad-small"), 1)]
        assert sorted(v for (v,) in conn.execute("SELECT v FROM fx")) == [b"ok1", b"ok2"]


ENDINGS = {
    "commit": lambda conn: conn.commit(),
    "execute-commit": lambda conn: conn.execute("COMMIT"),
    "script": lambda conn: conn.executescript("COMMIT; BEGIN"),
    "rollback": lambda conn: conn.rollback(),
}


@pytest.mark.parametrize("swallowed", [False, True], ids=["raised", "swallowed"])
@pytest.mark.parametrize("ending", sorted(ENDINGS))
@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_handler_that_ends_the_sqlite_transaction_itself_is_refused_and_stops_the_app(
    log: Log, tmp_path: Path, ending: str, swallowed: bool, concurrency: int
) -> None:
    """Under exactly-once the effects commit with their positions. A handler (or a library it
    hands ``db.connection`` to, as pandas' to_sql commits) that commits or rolls back the
    sink's transaction would have committed the batch's effects without their positions, and
    its redo would have made them again: SQLite refuses the statement, nothing of the
    transaction commits, and the App stops with what to do, even if the handler swallowed
    the error."""
    from assured.sinks import HandlerEndedTransactionError, SqliteSink

    fill(log, [b"%d" % i for i in range(8)])
    db = tmp_path / "fx.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE fx (v BLOB)")
    app = App(log=log, group="g", guarantee="exactly-once")

    tried: list[bytes] = []

    def end(msg: Message, conn: sqlite3.Connection) -> None:
        if msg.value == b"5" and not tried:  # once: without the guard, once was a duplicate
            tried.append(msg.value)
            try:
                ENDINGS[ending](conn)
            except sqlite3.DatabaseError:
                if not swallowed:
                    raise

    if concurrency == 1:

        @app.handler("in", sink=SqliteSink(db))
        def effect(msg: Message, tx: Any) -> None:
            tx.execute("INSERT INTO fx VALUES (?)", (msg.value,))
            end(msg, tx.connection)

    else:

        @app.handler("in", sink=SqliteSink(db), concurrency=concurrency)
        async def effect_side_by_side(msg: Message, db: Any) -> None:
            await db.execute("INSERT INTO fx VALUES (?)", (msg.value,))
            end(msg, (await db.hold()).connection)

    with pytest.raises(HandlerEndedTransactionError, match=r"do not commit or roll back"):
        app.run(until_idle=0.5)
    with sqlite3.connect(db) as conn:
        made = [r[0] for r in conn.execute("SELECT v FROM fx")]
        stored = conn.execute(
            "SELECT coalesce(sum(next_offset), 0) FROM assured_offsets"
        ).fetchone()
    assert len(made) == len(set(made)), "no effect twice"
    assert len(made) == stored[0], "every effect committed with its position, none without"
    assert b"5" not in made


def _send_or_say(out: Output, value: str, refused: list[str]) -> None:
    """A thread's send: refused ones are named in ``refused``."""
    try:
        out.send(value)
    except UsageError as e:
        refused.append(type(e).__name__)


class _SlowCodec:
    """An encoder that takes a moment (a large value, a schema check)."""

    def encode(self, value: str) -> bytes:
        time.sleep(0.03)
        return value.encode()

    def decode(self, data: bytes) -> str:
        return data.decode()


def test_a_send_checked_before_its_attempt_ended_never_joins_the_retrys_outputs(
    tmp_path: Path,
) -> None:
    """A thread in the failing attempt's context passes the check, then encodes while the
    attempt fails and the retry runs. Old code (the check, then the encoding, then the list):
    its output was appended to the retry's and committed with it."""
    import contextvars

    from assured.testing import AppTest

    app = App(group="g", guarantee="exactly-once")
    tries: dict[str, int] = {}
    refused: list[str] = []
    send = functools.partial(_send_or_say, refused=refused)

    @app.handler("in", output="out", value_codec=_SlowCodec(), retries=3, backoff_ms=100)
    def charge(msg: Message, out: Output) -> None:
        tries[msg.value] = tries.get(msg.value, 0) + 1
        if tries[msg.value] == 1:
            context = contextvars.copy_context()
            stray = threading.Thread(target=context.run, args=(send, out, "stray-" + msg.value))
            stray.start()
            time.sleep(0.01)  # the thread is encoding
            raise TimeoutError("the gateway timed out")
        out.send("retry-" + msg.value)

    with AppTest(app, folder=tmp_path) as test:
        test.send("in", "a")
        test.run_until_idle()
        time.sleep(0.1)  # the stray thread is done
        assert test.outputs("out") == ["retry-a"]
    assert refused == []  # checked in time: kept in the failed attempt's list, never released


def test_an_app_run_from_a_handler_is_not_that_handlers_attempt(tmp_path: Path) -> None:
    """A handler that runs another App (a replay, a backfill): the inner App's own statements
    into its sink are its runtime's. Old code: they carried the outer attempt's mark and were
    refused as a handler's between parts."""
    import sqlite3

    from assured.sinks import SqliteSink
    from assured.testing import AppTest

    (tmp_path / "inner").mkdir()
    (tmp_path / "outer").mkdir()
    with sqlite3.connect(tmp_path / "effects.db") as conn:
        conn.execute("CREATE TABLE effects (v TEXT)")
    inner = App(group="inner", guarantee="exactly-once")

    @inner.handler("x", sink=SqliteSink(tmp_path / "effects.db"))
    def store(msg: Message, db: Any) -> None:
        db.execute("INSERT INTO effects VALUES (?)", (msg.value.decode(),))

    outer = App(group="outer", guarantee="exactly-once")
    stored: list[Any] = []

    @outer.handler("in", output="out", retries=0, dead_letter=False)
    def replay(msg: Message, out: Output) -> None:
        with AppTest(inner, folder=tmp_path / "inner") as test:
            test.send("x", msg.value)
            test.run_until_idle()
            stored.extend(test.query("SELECT v FROM effects"))
        out.send(b"replayed-" + msg.value)

    with AppTest(outer, folder=tmp_path / "outer") as test:
        test.send("in", b"v1")
        test.run_until_idle()
        assert test.outputs("out") == [b"replayed-v1"]
    assert stored == [("v1",)]


def test_a_late_send_of_a_dead_lettered_records_own_thread_is_never_released(
    tmp_path: Path,
) -> None:
    """Side by side under exactly-once: record b's last attempt starts a thread in its own
    context whose send passes the check, then encodes past the attempt's failure; b is
    dead-lettered while a slower record ahead of it holds the partition's prefix. Old code:
    the send landed in b's list after it was discarded, and went into the transaction with
    b's dead letter when the prefix moved."""
    import contextvars

    from assured.testing import AppTest

    gate = threading.Event()

    class GatedCodec:
        def encode(self, value: str) -> bytes:
            if value.startswith("late"):
                gate.wait(5)
            return value.encode()

        def decode(self, data: bytes) -> str:
            return data.decode()

    app = App(group="g", guarantee="exactly-once")
    refused: list[str] = []
    send = functools.partial(_send_or_say, refused=refused)

    @app.handler(
        "in", output="out", value_codec=GatedCodec(), retries=0, concurrency=2,
        ordering="unordered",
    )  # fmt: skip
    async def charge(msg: Message, out: Output) -> None:
        if msg.value == "slow":
            await asyncio.sleep(0.6)  # holds the partition's prefix
            out.send("ok-slow")
            return
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(send, out, "late-" + msg.value)).start()
        await asyncio.sleep(0.05)  # the thread is encoding
        threading.Timer(0.2, gate.set).start()  # it ends after the attempt failed
        raise TimeoutError("the gateway timed out")

    with AppTest(app, folder=tmp_path, partitions=1) as test:
        test.send("in", "slow")
        test.send("in", "b")
        test.run_until_idle(idle=1.0)
        assert test.outputs("out") == ["ok-slow"]
        assert [r.value for r in test.dead_letters("in")] == [b"b"]
    assert refused == []  # checked in time: kept in the failed attempt's list, never released
