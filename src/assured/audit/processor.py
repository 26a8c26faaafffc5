"""The audit's processor: one App under the audited guarantee, run as its own process so the
audit can kill it. Its handler turns each input message into one effect (a record on the output
topic, or a row in the sink database) and acts out the fate the workload wrote in the message's
``fate`` header (see :mod:`assured.audit.workload`).

python -m assured.audit.processor --log URL --guarantee G --group G --input T --output T
    --sink topic|sqlite|postgres [--db PATH|DSN] --slot N --history FILE --marks DIR

Every process has a *run token*; it goes on each output record (header ``run``) and into each
history line, so the checker tells a restarted processor's transactions from its predecessor's.
Faults that fire inside a handler are written to the history too, which is how the audit counts
what landed. Fates that must happen once in a whole run (``fatal``, ``slow``, ``zombie``) are
claimed by creating a file in ``--marks``: the first process to create it acts the fate out;
every later delivery of that message is handled plainly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import faulthandler
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from assured import sinks
from assured.errors import FatalError
from assured.log import Consumer, Log, Producer, open_log
from assured.log._protocol import Admin
from assured.runtime import App, Message, Output
from assured.runtime.crashpoints import freeze_at
from assured.sinks import Sink, SinkTransaction, SqliteSink

__all__ = ["EFFECTS_DDL", "OVERSIZE", "as_a_processor", "main"]

EFFECTS_DDL = {
    "sqlite": "CREATE TABLE IF NOT EXISTS audit_effects (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "msg_id TEXT NOT NULL, account TEXT NOT NULL, slot INTEGER NOT NULL)",
    "postgres": "CREATE TABLE IF NOT EXISTS audit_effects (seq bigserial PRIMARY KEY, "
    "msg_id text NOT NULL, account text NOT NULL, slot integer NOT NULL)",
}
# Two rows the db-conflicts fate updates in either order (see to_db).
HOT_DDL = "CREATE TABLE IF NOT EXISTS audit_hot (id integer PRIMARY KEY, n bigint NOT NULL)"
OVERSIZE = 2 * 1024 * 1024  # over Kafka's and the engine's default limit of 1,000,000 bytes
# How long the work a failed attempt left running waits before it acts: from within the
# retry to several batches later (by the message's id).
STRAY_S = 0.02
# Side by side, the db a record's awaited calls go through (the stray fate uses it again).
_awaited_db: contextvars.ContextVar[Any] = contextvars.ContextVar("audit_db", default=None)


class PoisonError(ValueError):
    """The message was built to be rejected."""


class PlannedFailure(RuntimeError):  # noqa: N818 -- it is what the handler raises, on purpose
    """A handler failure the audit planned (``transient`` or ``permanent``)."""


class HandlerCrashError(FatalError):
    """The handler's own client failed for good (the audit's ``fatal`` fate): the App must stop
    and be restarted, and nothing it had open may commit."""


class _ProducersWith(Log):
    """A log whose producers all get ``config`` (the audit shortens their delivery timeout)."""

    def __init__(self, inner: Log, config: dict[str, Any]):
        self._inner = inner
        self._config = config
        self.url = inner.url

    def admin(self) -> Admin:
        return self._inner.admin()

    def consumer(self, **kw: Any) -> Consumer:
        return self._inner.consumer(**kw)

    def producer(self, **kw: Any) -> Producer:
        config = {**self._config, **(kw.pop("config", None) or {})}
        if kw.get("transactional_id") is not None and "delivery.timeout.ms" in config:
            # librdkafka refuses a delivery timeout longer than the transaction timeout
            limit = kw.get("transaction_timeout_ms", 60_000)
            config["delivery.timeout.ms"] = min(int(config["delivery.timeout.ms"]), limit)
        return self._inner.producer(config=config, **kw)

    def close(self) -> None:
        self._inner.close()


class _History:
    """Lines appended to the shared history file (JSONL), each with this process's run token."""

    def __init__(self, path: Path, run: str, slot: int):
        self._file = path.open("a", buffering=1)
        self._lock = threading.Lock()
        self._base = {"run": run, "slot": slot, "pid": os.getpid()}

    def write(self, **event: Any) -> None:
        line = json.dumps({**event, **self._base, "t": round(time.time(), 3)}) + "\n"
        with self._lock:
            self._file.write(line)


class _Marks:
    """Once-per-run fates, claimed by creating a file: the first process to do so acts."""

    def __init__(self, folder: Path):
        self._folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def claim(self, fate: str, mid: str) -> bool:
        try:
            fd = os.open(self._folder / f"{fate}-{mid}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True


def _stop_with_parent() -> None:
    """If the audit that started us dies, stop gracefully rather than run on as an orphan."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m assured.audit.processor")
    parser.add_argument("--log", required=True)
    parser.add_argument("--guarantee", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--sink", choices=("topic", "sqlite", "postgres"), default="topic")
    parser.add_argument("--db", default="")
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--marks", type=Path, default=None)
    parser.add_argument("--session-timeout-ms", type=int, default=2000)
    parser.add_argument("--commit-interval-ms", type=int, default=100)
    parser.add_argument("--handle-delay-ms", type=float, default=0.0)
    parser.add_argument("--transaction-timeout-ms", type=int, default=10_000)
    parser.add_argument("--max-poll-interval-ms", type=int, default=300_000)
    parser.add_argument("--delivery-timeout-ms", type=int, default=0, help="0: the log's default")
    parser.add_argument("--slow-ms", type=int, default=0, help="how long a 'slow' fate sleeps")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--ordering", choices=("key", "partition", "unordered"), default="key")
    parser.add_argument(
        "--handler-latency-ms", type=float, default=0.0,
        help="an async handler awaiting this long (one in ten: ten times as long); 0: a def",
    )  # fmt: skip
    return parser.parse_args(argv)


def _latencies(typical: float) -> Callable[[Message], float]:
    """A latency tail: nine messages in ten wait ``typical``, one waits ten times as long
    (chosen from the message's offset, so every process agrees)."""

    def wait(msg: Message) -> float:
        return typical * (10 if zlib.crc32(b"%d:%d" % (msg.partition, msg.offset)) % 10 == 0 else 1)

    return wait


def _open(args: argparse.Namespace) -> Log:
    log = open_log(args.log)
    if args.delivery_timeout_ms:
        return _ProducersWith(log, {"delivery.timeout.ms": args.delivery_timeout_ms})
    return log


def as_a_processor(slot: int) -> None:
    """What every processor the audit starts does first: signals, its log, and its end."""
    # Until the App takes over SIGTERM, a stop means nothing was consumed yet: exit cleanly.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    # A stuck run ends with SIGUSR1 from the audit: every thread's stack goes to our log.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _stop_with_parent()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s slot={slot} pid={os.getpid()} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # Every commit and abort with the positions it covered: what explains an anomaly.
    logging.getLogger("assured.runtime").setLevel(logging.DEBUG)


class _Statements:
    """Stands for a transaction to a plain handler, and keeps the statements it makes, to be
    awaited on a PostgreSQL connection side by side (none of them is read back)."""

    def __init__(self) -> None:
        self.made: list[tuple[str, Any]] = []

    def execute(self, sql: str, params: Any = ()) -> None:
        self.made.append((sql, params))


def _stray_write(db: Any, insert: str, row: tuple[Any, ...]) -> Callable[[], Any]:
    """The stray fate's write, taken while the attempt runs: on PostgreSQL side by side through
    the record's awaited ``db``; otherwise, by the message's id, through ``db`` or through its
    raw connection (``db.connection``), both kept past the attempt's end."""
    if isinstance(db, _Statements):
        target = _awaited_db.get()
        return lambda: target.execute(insert, row)
    through = db.connection if zlib.crc32(str(row[0]).encode()) % 2 == 0 else db
    return lambda: through.execute(insert, row)


def main(argv: list[str] | None = None) -> None:  # noqa: PLR0915 -- one handler per sink kind
    args = _parse(argv)
    as_a_processor(args.slot)
    slot = args.slot
    run = uuid.uuid4().hex[:10]
    app = App(
        log=_open(args),
        group=args.group,
        guarantee=args.guarantee,
        transactional_id=f"{args.group}-slot{slot}",
        session_timeout_ms=args.session_timeout_ms,
        heartbeat_interval_ms=max(100, args.session_timeout_ms // 6),
        commit_interval_ms=args.commit_interval_ms,
        max_poll_records=100,
        transaction_timeout_ms=args.transaction_timeout_ms,
        max_poll_interval_ms=args.max_poll_interval_ms,
    )
    history = _History(args.history, run, slot)
    marks = _Marks(args.marks or args.history.with_suffix(".marks"))
    app.on_transaction = lambda label, outcome: history.write(txn=label, outcome=outcome)
    delay = args.handle_delay_ms / 1000
    failed_here: set[str] = set()  # transient fates fail the first attempt in each process

    def at_commit(mid: str) -> bool:
        """Does this zombie stop at its transaction's commit (offsets pending), not mid-handler?
        Every other one by id, under exactly-once to topics (the only place offsets wait in a
        transaction on the log)."""
        return (
            args.guarantee == "exactly-once"
            and args.sink == "topic"
            and zlib.crc32(mid.encode()) % 2 == 1
        )

    def leave_running(mid: str, again: Callable[[], Awaitable[None] | None]) -> None:
        """The stray fate: work the failing attempt leaves running, that makes the effect
        ``again`` a moment later. Where an event loop runs, a task (it inherits the attempt's
        context, as a task a handler starts does) or, for one message in three, a plain thread
        that hands ``again`` back to the loop (``call_soon_threadsafe``: it runs in the
        thread's context, no attempt's); else a thread. Refused is right; made is what the
        checker then sees (a second effect, committed with other work)."""

        crc = zlib.crc32(mid.encode())
        wait = STRAY_S * (1 + crc % 25)

        def in_thread() -> None:
            time.sleep(wait)
            try:
                again()
            except Exception as e:
                history.write(stray=mid, outcome="refused", error=f"{type(e).__name__}: {e}")
            else:
                history.write(stray=mid, outcome="made")

        def back_to(loop: asyncio.AbstractEventLoop) -> None:
            time.sleep(wait)

            def callback() -> None:
                strays.add(task := loop.create_task(later(0)))
                task.add_done_callback(strays.discard)

            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(callback)

        async def later(pause: float = wait) -> None:
            await asyncio.sleep(pause)
            try:
                made = again()
                if inspect.isawaitable(made):  # a database's cursor is not
                    await made
            except Exception as e:
                history.write(stray=mid, outcome="refused", error=f"{type(e).__name__}: {e}")
            else:
                history.write(stray=mid, outcome="made")

        history.write(fault="handler-errors", kind="stray", id=mid)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            threading.Thread(target=in_thread, daemon=True).start()
        else:
            if crc % 3 == 2:
                threading.Thread(target=back_to, args=(loop,), daemon=True).start()
            else:
                strays.add(task := loop.create_task(later()))
                task.add_done_callback(strays.discard)

    strays: set[asyncio.Task[None]] = set()

    def act(
        msg: Message,
        mid: str,
        effect: Callable[[], None],
        refuse: Callable[[], None],
        stray: Callable[[], Awaitable[None] | None] | None = None,
    ) -> None:
        """The message's fate, acted out around its one ``effect``; ``stray`` makes the effect
        from work a failed attempt left running (it defaults to ``effect``)."""
        if delay:
            time.sleep(delay)
        fate = (msg.header("fate") or b"ok").decode()
        if fate == "poison":
            raise PoisonError(f"{mid} was built to be rejected")
        if fate == "oversize":
            history.write(fault="handler-errors", kind=fate, id=mid)
            refuse()  # the handler's only output: refused by the log or the database
            return
        if fate == "slow" and args.slow_ms and marks.claim(fate, mid):
            history.write(fault="slow-handler", id=mid, phase="asleep")
            time.sleep(args.slow_ms / 1000)
            history.write(fault="slow-handler", id=mid, phase="awake")
        if fate == "zombie" and marks.claim(fate, mid):
            if at_commit(mid):
                # Stop once this record's offsets are in the transaction, before its commit.
                history.write(fault="zombie", id=mid, phase="stopping-at-commit")
                freeze_at("after-handle-before-commit")
            else:
                history.write(fault="zombie", id=mid, phase="stopping")
                os.kill(os.getpid(), signal.SIGSTOP)  # the audit sees it and SIGCONTs us later
                history.write(fault="zombie", id=mid, phase="resumed")
        effect()
        if fate == "fatal" and marks.claim(fate, mid):
            history.write(fault="handler-errors", kind=fate, id=mid)
            raise HandlerCrashError(f"{mid}: the handler's own client failed for good (planned)")
        if fate == "transient" and mid not in failed_here:
            failed_here.add(mid)
            history.write(fault="handler-errors", kind=fate, id=mid)
            raise PlannedFailure(f"{mid}: fails its first attempt in each process (planned)")
        if fate == "stray" and mid not in failed_here:
            failed_here.add(mid)
            leave_running(mid, stray or effect)
            raise PlannedFailure(f"{mid}: fails its first attempt, leaving work running (planned)")
        if fate == "permanent":
            history.write(fault="handler-errors", kind=fate, id=mid)
            raise PlannedFailure(f"{mid}: fails every attempt (planned)")

    options: dict[str, Any] = {"retries": 1, "backoff_ms": 1, "concurrency": args.concurrency}
    if args.concurrency > 1:
        options["ordering"] = args.ordering
    waits = _latencies(args.handler_latency_ms / 1000)

    def register(handler: Callable[[Message, Any], None], **where: Any) -> None:
        """``handler`` as it is, or (``--handler-latency-ms``) behind an await: a gateway, an
        HTTP API."""
        is_async = args.concurrency > 1 or bool(args.handler_latency_ms)
        if not is_async:
            app.handler(args.input, **where, **options)(handler)
            return
        awaited_db = "sink" in where  # an async def's db calls are awaited

        async def waiting(msg: Message, target: Any) -> None:
            if awaited_db:
                _awaited_db.set(target)  # this record's task's own (see the stray fate)
            if args.handler_latency_ms:
                await asyncio.sleep(waits(msg))
            if not awaited_db:
                handler(msg, target)
            elif args.sink == "sqlite":  # the database taken (awaited), then used as it is
                handler(msg, await target.hold())
            else:  # async connections: what the handler writes is awaited once it returns
                statements = _Statements()
                handler(msg, statements)
                for sql, params in statements.made:
                    await target.execute(sql, params)

        app.handler(args.input, **where, **options)(waiting)

    if args.sink == "topic":

        def to_topic(msg: Message, out: Output) -> None:
            body = json.loads(msg.value)
            mid, account = body["id"], body["account"]
            headers = [("id", mid.encode()), ("slot", str(slot).encode()), ("run", run.encode())]
            out.label_header = "txn"  # the transaction it goes into (side by side too)

            def effect(value: bytes = mid.encode()) -> None:
                out.send(value, key=account.encode(), headers=headers)

            act(msg, mid, effect, lambda: effect(b"x" * OVERSIZE))

        register(to_topic, output=args.output)

    else:
        sink: Sink = SqliteSink(args.db) if args.sink == "sqlite" else sinks.PostgresSink(args.db)
        mark = "?" if args.sink == "sqlite" else "%s"
        columns = "INSERT INTO audit_effects (msg_id, account, slot) VALUES"
        insert = f"{columns} ({mark}, {mark}, {mark})"  # only the placeholder style varies
        with sink, sink.transaction() as tx:
            tx.execute(EFFECTS_DDL[args.sink])
            if args.sink == "postgres":
                tx.execute(HOT_DDL)
                tx.execute("INSERT INTO audit_hot VALUES (1, 0), (2, 0) ON CONFLICT DO NOTHING")

        full: list[bool] = []  # this process filled the disk: give it room at the next call

        def to_db(msg: Message, db: SinkTransaction) -> None:
            body = json.loads(msg.value)
            mid, account = body["id"], body["account"]
            if full:
                db.execute("PRAGMA max_page_count=1073741823")
                full.clear()
            if (
                args.sink == "sqlite"
                and (msg.header("fate") or b"") == b"diskfull"
                and marks.claim("diskfull", mid)
            ):
                # The disk is full: the file may not grow, and a write that needs a page fails
                # (SQLITE_FULL). When that happens as SQLite spills its cache to the file, it
                # rolls the whole transaction back by itself; when not, only the statement. The
                # first is the case to audit, so it is made to happen as SQLite would.
                history.write(fault="disk-full", id=mid)
                full.append(True)
                db.execute(EFFECTS_DDL["sqlite"].replace("audit_effects", "audit_filler"))
                pages = db.execute("PRAGMA page_count").fetchone()[0]
                db.execute(f"PRAGMA max_page_count={pages}")
                try:
                    db.execute("INSERT INTO audit_filler (msg_id, account, slot) VALUES (?, ?, ?)",
                               ("x" * 65_536, account, slot))  # fmt: skip
                except Exception:
                    if db.connection.in_transaction:
                        # as at a cache spill (a handler's own ROLLBACK would be refused)
                        assert isinstance(sink, SqliteSink)
                        with sink._own():
                            db.connection.rollback()
                    raise
            if (msg.header("fate") or b"") == b"conflict":
                # Two rows every such record updates, in either order: records on different
                # connections (or processes) hold one each till their commits and wait for
                # the other; PostgreSQL fails one statement of each deadlock (40P01). Not the
                # record's fault: its effect must still be made, once.
                history.write(fault="db-conflicts", id=mid)
                first = 1 + zlib.crc32(mid.encode()) % 2
                for row in (first, 3 - first):
                    db.execute("UPDATE audit_hot SET n = n + 1 WHERE id = %s", (row,))
            stray = None
            if (msg.header("fate") or b"") == b"stray":
                stray = _stray_write(db, insert, (mid, account, slot))
            act(
                msg,
                mid,
                lambda: db.execute(insert, (mid, account, slot)),
                lambda: db.execute(insert, (None, account, slot)),  # NOT NULL refuses it
                stray,
            )

        register(to_db, sink=sink)

    plant = os.environ.get("ASSURED_AUDIT_PLANT")
    if plant:  # a deliberate bug, for tests that show the audit catches it
        from assured.audit.planted import planted

        factory = planted(plant)
        app._protocol = lambda rt, sink: factory(rt)  # type: ignore[method-assign]
    app.run()


if __name__ == "__main__":
    main()
