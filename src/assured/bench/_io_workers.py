"""The io bench's processors, each in its own process: assured with an ``async def`` handler
side by side, and a bare asyncio loop bounded by a semaphore. Each handler call awaits
``handler_ms``, then sends one output stamped with the time the call began (the first 20
digits: ns since the epoch, as the latency reader expects), or, into a database, writes one
row with that stamp.

python -m assured.bench._io_workers io-assured|io-bare SPEC_JSON
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from assured.bench._workers import Meter

if TYPE_CHECKING:
    from assured import App

__all__ = ["main"]


def _stamp() -> bytes:
    return b"%020d" % time.time_ns()


def run_io_assured(spec: dict[str, Any]) -> dict[str, Any]:
    from assured import App, Message, Output

    meter = Meter(spec["records"])
    wait = spec["handler_ms"] / 1000
    app = App(
        log=spec["log"],
        group=spec["group"],
        guarantee=spec["guarantee"],
        max_poll_records=spec["max_poll_records"],
    )
    if spec.get("sink", "topic") != "topic":
        return _into_database(app, spec, meter, wait)

    @app.handler(spec["input"], output=spec["output"], concurrency=spec["concurrency"])
    async def call(msg: Message, out: Output) -> None:
        if not meter.seen:
            meter.tick(1)  # the clock starts at the first call
        began = _stamp()
        await asyncio.sleep(wait)
        out.send(began, key=msg.key)

    stats = app.run(max_messages=spec["records"])
    meter.seen = stats.processed
    return meter.result()


_EFFECTS = "CREATE TABLE IF NOT EXISTS io_effects (id {id}, k {blob}, began BIGINT NOT NULL)"


def _into_database(app: App, spec: dict[str, Any], meter: Meter, wait: float) -> dict[str, Any]:
    """The same handler, its effect a row (the key and the stamp) written by an awaited
    ``db.execute``; a reader of the database, in a process of its own (``io-db-reader``),
    takes the latency: the time a row became visible minus its stamp."""
    from assured import Message, PostgresSink, SqliteSink

    schema = effects_table(spec["sink"])
    if spec["sink"] == "sqlite":
        sink: Any = SqliteSink(spec["db"], durability="full", schema=schema)
        insert = "INSERT INTO io_effects (k, began) VALUES (?, ?)"
    else:
        sink = PostgresSink(spec["db"], schema=schema)
        insert = "INSERT INTO io_effects (k, began) VALUES (%s, %s)"
    slow = spec.get("db_wait_ms", 0.0) / 1000
    if slow:  # the server takes a while over each (a remote host, a slower statement)
        insert = "INSERT INTO io_effects (k, began) SELECT %s, %s FROM pg_sleep(%s)"
    sink.setup()

    @app.handler(spec["input"], sink=sink, concurrency=spec["concurrency"])
    async def call(msg: Message, db: Any) -> None:
        if not meter.seen:
            meter.tick(1)  # the clock starts at the first call
        began = time.time_ns()
        await asyncio.sleep(wait)
        await db.execute(insert, (msg.key, began, slow) if slow else (msg.key, began))

    stats = app.run(max_messages=spec["records"])
    meter.seen = stats.processed
    return meter.result()


def effects_table(sink: str) -> str:
    """The effects table's CREATE statement for ``sink`` (sqlite or postgres)."""
    if sink == "sqlite":
        return _EFFECTS.format(id="INTEGER PRIMARY KEY", blob="BLOB")
    return _EFFECTS.format(id="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", blob="BYTEA")


def run_db_reader(spec: dict[str, Any]) -> dict[str, Any]:
    """The latency reader of an io run into a database: says ``ready``, then reads until it
    has seen ``records`` rows (or ``timeout_s`` passed)."""
    reader = _Reader(spec)
    print("ready", flush=True)
    reader.run()
    return reader.result()


class _Reader:
    """Polls the effects table for new rows; each row's latency is when it was first seen
    minus its stamp. Transactions side by side commit out of id order, so an id skipped over
    (not visible yet, or rolled back) is looked for again until it shows up, for 30 s."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.latencies: list[float] = []
        self.rows = 0
        self.total: int | None = None  # the table's rows at the end

    def run(self) -> None:
        if self.spec["sink"] == "sqlite":
            import sqlite3

            conn: Any = sqlite3.connect(self.spec["db"], isolation_level=None)
            mark = "?"
        else:
            import psycopg

            conn = psycopg.connect(self.spec["db"], autocommit=True)
            mark = "%s"
        newer = f"SELECT id, began FROM io_effects WHERE id > {mark}"  # noqa: S608
        last = 0
        missing: dict[int, float] = {}  # ids skipped over -> when first missed
        give_up_at = time.monotonic() + self.spec["timeout_s"]
        try:
            while self.rows < self.spec["records"] and time.monotonic() < give_up_at:
                rows = conn.execute(newer, (last,)).fetchall()
                if missing:
                    wanted = ", ".join(str(i) for i in missing)
                    rows += conn.execute(
                        f"SELECT id, began FROM io_effects WHERE id IN ({wanted})"  # noqa: S608
                    ).fetchall()
                now_ns, now = time.time_ns(), time.monotonic()
                seen: set[int] = set()
                for row_id, began in rows:
                    if row_id in seen:
                        continue
                    seen.add(row_id)
                    self.latencies.append((now_ns - began) / 1e6)
                    if row_id > last:
                        missing.update(dict.fromkeys(range(last + 1, row_id), now))
                        last = row_id
                    missing.pop(row_id, None)
                self.rows += len(seen)
                if missing and now - min(missing.values()) >= 30:
                    missing = {i: t for i, t in missing.items() if now - t < 30}
                time.sleep(0.002)
            self.total = conn.execute("SELECT count(*) FROM io_effects").fetchone()[0]
        finally:
            conn.close()

    def result(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def at(q: float) -> float | None:
            return (
                round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else None
            )

        return {
            "effects": self.total,
            "effects_seen": self.rows,
            "p50_ms": at(0.5),
            "p99_ms": at(0.99),
        }


def run_io_bare(spec: dict[str, Any]) -> dict[str, Any]:
    """Poll without waiting, start a task per record while the semaphore allows (no order, no
    guarantee), send its output when its wait is over; offsets are committed as polled.

    With ``sink`` postgres, the effect is a row instead, as assured's handler writes it (see
    :class:`_BareRows`)."""
    meter = Meter(spec["records"])
    wait = spec["handler_ms"] / 1000
    poll, send, finish = _bare_clients(spec)

    async def loop() -> None:
        gate = asyncio.Semaphore(spec["concurrency"])
        running: set[asyncio.Task[None]] = set()
        done = 0
        db = await _BareRows.open(spec) if spec.get("sink", "topic") == "postgres" else None

        async def one(key: bytes | None) -> None:
            nonlocal done
            try:
                began = time.time_ns()
                await asyncio.sleep(wait)
                if db is not None:
                    await db.write(key, began)
                else:
                    send(b"%020d" % began, key)
                done += 1
            finally:
                gate.release()

        polled = 0
        while polled < spec["records"]:
            batch = poll(min(500, spec["records"] - polled))
            if not batch:
                await asyncio.sleep(0.001)
                continue
            for key in batch:
                await gate.acquire()
                if not meter.seen:
                    meter.tick(1)
                task = asyncio.create_task(one(key))
                running.add(task)
                task.add_done_callback(running.discard)
            polled += len(batch)
        await asyncio.gather(*running)
        meter.seen = done
        if db is not None:
            await db.close()

    asyncio.run(loop())
    finish()
    return meter.result()


class _BareRows:
    """The bare loop's rows in PostgreSQL, written the way such code commonly is: each
    record's INSERT on its own, committed at once (autocommit), on the first free one of as
    many connections as assured's sink opens by default (8). No batching, and nothing ties a
    row to its record's position."""

    def __init__(self, connections: list[Any]):
        self.free: asyncio.Queue[Any] = asyncio.Queue()
        for conn in connections:
            self.free.put_nowait(conn)

    @classmethod
    async def open(cls, spec: dict[str, Any]) -> _BareRows:
        import psycopg

        connect = psycopg.AsyncConnection.connect
        return cls([await connect(spec["db"], autocommit=True) for _ in range(8)])

    async def write(self, key: bytes | None, began: int) -> None:
        conn = await self.free.get()
        try:
            await conn.execute("INSERT INTO io_effects (k, began) VALUES (%s, %s)", (key, began))
        finally:
            self.free.put_nowait(conn)

    async def close(self) -> None:
        while not self.free.empty():
            await self.free.get_nowait().close()


def _bare_clients(
    spec: dict[str, Any],
) -> tuple[
    Callable[[int], list[bytes | None]], Callable[[bytes, bytes | None], None], Callable[[], None]
]:
    """poll(n) -> keys of up to n records, without waiting; send(value, key); finish()."""
    if spec["bootstrap"]:
        from confluent_kafka import Consumer, Producer

        consumer = Consumer(
            {
                "bootstrap.servers": spec["bootstrap"],
                "group.id": spec["group"],
                "auto.offset.reset": "earliest",
                "enable.auto.commit": True,
            }
        )
        consumer.subscribe([spec["input"]])
        producer = Producer(
            {"bootstrap.servers": spec["bootstrap"], "linger.ms": 5, "enable.idempotence": True}
        )

        def poll(n: int) -> list[bytes | None]:
            producer.poll(0)
            return [m.key() for m in consumer.consume(n, 0) if not m.error()]

        def send(value: bytes, key: bytes | None) -> None:
            while True:
                try:
                    producer.produce(spec["output"], value, key)
                    return
                except BufferError:
                    producer.poll(0.01)

        def finish() -> None:
            producer.flush()
            consumer.close()

        return poll, send, finish

    from assured.log import TopicPartition, open_log

    log = open_log(spec["log"])
    log_consumer = log.consumer(group_id=spec["group"])
    log_consumer.subscribe([spec["input"]])
    log_producer = log.producer()

    def log_poll(n: int) -> list[bytes | None]:
        records = log_consumer.poll(n, 0)
        if records:
            last = {TopicPartition(r.topic, r.partition): r.offset + 1 for r in records}
            log_consumer.commit(last, asynchronous=True)
        return [r.key for r in records]

    def log_send(value: bytes, key: bytes | None) -> None:
        log_producer.send(spec["output"], value, key=key)

    def log_finish() -> None:
        log_producer.flush()
        log_producer.close()
        log_consumer.close()
        log.close()

    return log_poll, log_send, log_finish


_ROLES = {"io-assured": run_io_assured, "io-bare": run_io_bare, "io-db-reader": run_db_reader}


def main(argv: list[str]) -> int:
    role, spec = argv[0], json.loads(argv[1])
    print(json.dumps(_ROLES[role](spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
