"""The io bench (issue 14): handlers that wait, side by side.

Each record's handler awaits ``handler_ms`` (a payment gateway, an HTTP API), then sends one
output stamped with the time its call began. Per log, for every guarantee and each
``concurrency``: assured (an ``async def`` handler, ``ordering="key"``), and beside it a bare
asyncio loop bounded by a semaphore (the same wait, no order, no guarantee: offsets
auto-committed, or on the embedded engine committed as polled). A read_committed reader of the
outputs takes receive time minus stamp: the handler's wait plus what the guarantee adds.

On Kafka, with ``faststream_python`` (a Python that has ``faststream[confluent]``; ``make
bench-io`` makes ``.venv-faststream``), FastStream runs the same handler at its own setting for
calls side by side, ``max_workers``. It takes that setting only with ``AckPolicy.ACK_FIRST``
(each record acknowledged before its call, offsets committed automatically): its rows are
labelled ``ack-first``, the nearest of assured's guarantees being at-most-once.

A run handles ``records`` records, or fewer when the concurrency caps the rate: about
``seconds`` worth at the ceiling (``concurrency / handler_ms`` records/s), and at least
``min_records``.

``sinks`` adds rows where the handler's effect is a row in a database instead of an output:
``sqlite`` (a file, ``durability="full"``: every commit fsynced) and ``postgres`` (at
``postgres_dsn``). The handler awaits the same wait, then ``await db.execute(INSERT ...)``;
records side by side share a transaction per connection and step of their window. Their
latency is taken by a reader of the database, in a process of its own (every 2 ms): when a row
became visible minus its stamp. Each run checks that every record left exactly one row.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assured.bench._io_workers import effects_table
from assured.bench.log_suite import machine_facts
from assured.bench.runtime_suite import _Bench, _last_json, _Lines, _run_worker
from assured.log import Log, open_log

__all__ = ["IO_TARGETS", "IoBenchConfig", "judge", "run_io_suite"]

GUARANTEES = ("at-most-once", "at-least-once", "exactly-once")
_FASTSTREAM_WORKER = Path(__file__).with_name("faststream_worker.py")


@dataclass
class IoBenchConfig:
    log: str  # kafka://host:port or embedded:///folder
    records: int = 100_000
    partitions: int = 4
    keys: int = 1000
    handler_ms: float = 20.0
    concurrency: list[int] = field(default_factory=lambda: [1, 50, 200, 1000])
    guarantees: list[str] = field(default_factory=lambda: list(GUARANTEES))
    systems: list[str] = field(default_factory=lambda: ["assured", "bare", "faststream"])
    seconds: float = 15.0  # a run's length at the ceiling rate, when records would take longer
    min_records: int = 300
    max_poll_records: int = 500
    worker_timeout_s: float = 900.0
    faststream_python: str | None = None  # Kafka only: a Python that has faststream[confluent]
    sinks: list[str] = field(default_factory=lambda: ["topic"])  # topic, sqlite, postgres
    postgres_dsn: str | None = None  # for the postgres sink
    db_wait_ms: float = 0.0  # postgres: each INSERT also waits this long on the server

    @property
    def backend(self) -> str:
        return "kafka" if self.log.lower().startswith("kafka://") else "embedded"

    def records_for(self, concurrency: int) -> int:
        ceiling = concurrency * 1000 / self.handler_ms
        return max(self.min_records, min(self.records, int(ceiling * self.seconds)))


def _fill(log: Log, topic: str, records: int, keys: int) -> None:
    with log.producer(batch_size=10_000, linger_ms=20) as producer:
        for i in range(records):
            producer.send(topic, b"x" * 80, key=b"k%05d" % (i % keys))
            if i % 10_000 == 9_999 and log.url.startswith("embedded"):
                producer.flush()
        producer.flush()


@contextlib.contextmanager
def _latency_reader(module: str, role: str, spec: dict[str, Any]) -> Iterator[Callable[[], Any]]:
    """A latency reader in a process of its own (``python -m module role spec``), started and
    ready; gives a call that waits for its end and returns its result. Killed on the way out
    if it still runs."""
    reader = subprocess.Popen(
        [sys.executable, "-m", module, role, json.dumps(spec)], stdout=subprocess.PIPE, text=True
    )
    assert reader.stdout is not None
    lines = _Lines(reader.stdout)

    def result() -> Any:
        reader.wait(timeout=120)
        lines.close()
        return _last_json("\n".join(lines.lines))

    try:
        if not lines.wait_for("ready", 60):
            raise RuntimeError(f"the latency reader ({role}) did not start")
        yield result
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
        lines.close()


def _into_database(
    bench: _Bench,
    config: IoBenchConfig,
    sink: str,
    guarantee: str,
    concurrency: int,
    system: str = "assured",
) -> dict[str, Any]:
    """assured into a database (see the module's docstring), or the bare loop writing the
    same rows (postgres: see ``_io_workers.run_io_bare``): a reader of the database, in a
    process of its own, takes the latency; every record must have left exactly one row."""
    name = f"{system}-{sink}-{guarantee}-c{concurrency}"
    url = bench.url(name)
    log = open_log(url)
    try:
        records = config.records_for(concurrency)
        source = bench.topic(log, f"io-in-{name}")
        _fill(log, source, records, config.keys)
    finally:
        log.close()
    if sink == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="assured-bench-io-db-"))
        db = str(folder / "effects.db")
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as lite:
            lite.execute(effects_table("sqlite"))
    else:
        if not config.postgres_dsn:
            raise RuntimeError("the postgres sink needs postgres_dsn")
        db = config.postgres_dsn
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS io_effects")
            conn.execute(effects_table("postgres"))
    spec = {
        "log": url,
        "input": source,
        "group": f"io-{name}-group",
        "guarantee": guarantee,
        "records": records,
        "concurrency": concurrency,
        "handler_ms": config.handler_ms,
        "max_poll_records": max(config.max_poll_records, concurrency),
        "sink": sink,
        "db": db,
        "db_wait_ms": config.db_wait_ms,
    }
    role = "io-assured" if system == "assured" else "io-bare"
    if system == "bare":
        spec["bootstrap"] = url[len("kafka://") :] if config.backend == "kafka" else None
    cmd = [sys.executable, "-m", "assured.bench._io_workers", role, json.dumps(spec)]
    reading = dict(spec, timeout_s=config.worker_timeout_s)
    try:
        with _latency_reader("assured.bench._io_workers", "io-db-reader", reading) as read:
            result = _run_worker(cmd, config.worker_timeout_s, name)
            latency = read()
    finally:
        if sink == "sqlite":
            shutil.rmtree(folder, ignore_errors=True)
    if latency.get("effects") != records:
        raise RuntimeError(f"{name}: {latency.get('effects')} rows for {records} records")
    row = _row(config, system, guarantee, sink, concurrency, records, result, latency)
    if sink == "postgres":
        row["db_wait_ms"] = config.db_wait_ms
    return row


def _row(
    config: IoBenchConfig,
    system: str,
    guarantee: str,
    sink: str,
    concurrency: int,
    records: int,
    result: dict[str, Any],
    latency: dict[str, Any],
) -> dict[str, Any]:
    """One row of the suite: the worker's ``result`` (rate, CPU, memory) and ``latency``
    (p50 and p99, from whichever reader took them)."""
    return {
        "system": system,
        "guarantee": guarantee,
        "sink": sink,
        "log": config.backend,
        "concurrency": concurrency,
        "ordering": "key" if system == "assured" else "none",
        "handler_ms": config.handler_ms,
        "records": records,
        "records_per_s": result["records_per_s"],
        "ceiling_per_s": round(concurrency * 1000 / config.handler_ms, 1),
        "p50_ms": latency["p50_ms"],
        "p99_ms": latency["p99_ms"],
        "cpu_us_per_record": result.get("cpu_us_per_record"),
        "rss_warm_mb": result.get("rss_warm_mb"),
        "peak_rss_mb": result.get("peak_rss_mb"),
        "others_cores": result.get("others_cores"),
        "max_poll_records": max(config.max_poll_records, concurrency),
    }


def _one(
    bench: _Bench, config: IoBenchConfig, system: str, guarantee: str, concurrency: int
) -> dict[str, Any]:
    name = f"{system}-{guarantee}-c{concurrency}"
    url = bench.url(name)
    log = open_log(url)
    try:
        records = config.records_for(concurrency)
        source = bench.topic(log, f"io-in-{name}")
        sink = bench.topic(log, f"io-out-{name}")
        _fill(log, source, records, config.keys)
        reader_spec = {
            "log": url,
            "topic": sink,
            "group": f"{sink}-reader",
            "expected": records,
            "timeout_s": config.worker_timeout_s,
        }
        with _latency_reader("assured.bench._workers", "read", reader_spec) as read:
            spec = {
                "log": url,
                "bootstrap": url[len("kafka://") :] if config.backend == "kafka" else None,
                "input": source,
                "output": sink,
                "group": f"{sink}-group",
                "guarantee": guarantee,
                "records": records,
                "concurrency": concurrency,
                "handler_ms": config.handler_ms,
                "max_poll_records": max(config.max_poll_records, concurrency),
            }
            if system == "faststream":
                assert config.faststream_python is not None
                cmd = [config.faststream_python, str(_FASTSTREAM_WORKER), json.dumps(spec)]
            else:
                role = "io-assured" if system == "assured" else "io-bare"
                cmd = [sys.executable, "-m", "assured.bench._io_workers", role, json.dumps(spec)]
            result = _run_worker(cmd, config.worker_timeout_s, name)
            latency = read()
    finally:
        log.close()
    if latency["samples"] < records:
        raise RuntimeError(f"{name}: the reader saw {latency['samples']} of {records} outputs")
    row = _row(config, system, guarantee, "topic", concurrency, records, result, latency)
    if system == "faststream":
        row["faststream_version"] = result.get("faststream_version")
    return row


def _assured_rows(
    bench: _Bench, config: IoBenchConfig, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    rows = []
    for sink in config.sinks:
        for g in config.guarantees:
            for c in config.concurrency:
                say(f"assured {g} into {sink}, concurrency {c}")
                if sink == "topic":
                    rows.append(_one(bench, config, "assured", g, c))
                else:
                    rows.append(_into_database(bench, config, sink, g, c))
                say(f"  {rows[-1]['records_per_s']:,.0f} records/s, p99 {rows[-1]['p99_ms']} ms")
    return rows


def run_io_suite(
    config: IoBenchConfig, progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    say = progress or (lambda _m: None)
    bench = _Bench(config)  # type: ignore[arg-type]  # uses .log and .partitions only
    rows: list[dict[str, Any]] = []
    logs: list[Log] = [open_log(config.log)] if config.backend == "kafka" else []
    try:
        if "faststream" in config.systems and config.faststream_python:
            if config.backend != "kafka":
                raise RuntimeError("FastStream runs on Kafka only: give a kafka:// log")
            for c in config.concurrency:
                say(f"FastStream (max_workers, ack-first), concurrency {c}")
                rows.append(_one(bench, config, "faststream", "ack-first", c))
                say(f"  {rows[-1]['records_per_s']:,.0f} records/s")
        if "bare" in config.systems:
            for c in config.concurrency:
                say(f"bare asyncio loop, concurrency {c}")
                rows.append(_one(bench, config, "bare", "none", c))
                say(f"  {rows[-1]['records_per_s']:,.0f} records/s")
                if "postgres" in config.sinks:
                    say(f"bare asyncio loop into postgres (autocommit), concurrency {c}")
                    rows.append(_into_database(bench, config, "postgres", "none", c, "bare"))
                    say(f"  {rows[-1]['records_per_s']:,.0f} records/s")
        if "assured" in config.systems:
            rows += _assured_rows(bench, config, say)
        _ratios(rows)
    finally:
        bench.cleanup(logs)
    facts = machine_facts()
    for r in rows:
        r.update(facts)
    return rows


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's rate over the bare loop's at its concurrency (``vs_bare``: the loop with no
    database, which the targets name) and, into a database, over the bare loop writing the
    same rows there (``vs_bare_sink``: what the guarantee costs beside doing the same work)."""
    bare = {(r["concurrency"], r["sink"]): r for r in rows if r["system"] == "bare"}
    bare = {k: r for k, r in bare.items() if r["records_per_s"]}
    for r in rows:
        if r["system"] == "bare" and r["sink"] == "topic":
            continue
        peer = bare.get((r["concurrency"], "topic"))
        if peer:
            r["vs_bare"] = round(r["records_per_s"] / peer["records_per_s"], 3)
        same = bare.get((r["concurrency"], r["sink"]))
        if r["system"] != "bare" and r["sink"] != "topic" and same:
            r["vs_bare_sink"] = round(r["records_per_s"] / same["records_per_s"], 3)


# (guarantee, sink, concurrency, records/s at least, x bare at least), measured side by side
IO_TARGETS = (
    ("at-least-once", "topic", 200, 5000.0, 0.8),
    ("exactly-once", "topic", 200, 4000.0, 0.8),
    ("at-least-once", "sqlite", 200, 5000.0, 0.8),
    ("exactly-once", "sqlite", 200, 5000.0, 0.8),
    ("at-least-once", "postgres", 200, 5000.0, 0.8),
    ("exactly-once", "postgres", 200, 5000.0, 0.8),
)


def judge(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each target whose row is there."""
    out = []
    for guarantee, sink, c, rate, ratio in IO_TARGETS:
        row = next(
            (
                r
                for r in rows
                if r["system"] == "assured" and r["guarantee"] == guarantee
                and r["concurrency"] == c and r.get("sink", "topic") == sink
            ),
            None,
        )  # fmt: skip
        if row is None:
            continue
        out.append(
            (
                f"assured {guarantee} into {sink}, concurrency {c}: >= {rate:,.0f} records/s",
                f"{row['records_per_s']:,.0f}",
                "met" if row["records_per_s"] >= rate else "MISSED",
            )
        )
        if "vs_bare" in row:
            out.append(
                (
                    f"assured {guarantee} into {sink}, concurrency {c}: >= {ratio} x the bare loop",
                    f"{row['vs_bare']:.2f} x",
                    "met" if row["vs_bare"] >= ratio else "MISSED",
                )
            )
    return out


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    backend = rows[0]["log"] if rows else "?"
    handler = rows[0]["handler_ms"] if rows else 0
    lines = [
        f"# io bench, {backend}: a handler that awaits {handler:g} ms, records side by side",
        "",
        f"`{command}`",
        "",
        "| system | guarantee | sink | concurrency | records | records/s | ceiling/s | x bare | "
        "x bare into the same database | p50 / p99 ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['guarantee']} | {r.get('sink', 'topic')} | {r['concurrency']} "
            f"| {r['records']:,} | {r['records_per_s']:,.0f} | {r['ceiling_per_s']:,.0f} | "
            f"{r.get('vs_bare', '')} | {r.get('vs_bare_sink', '')} | "
            f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f} |"
        )
    lines += [
        "",
        "x bare: over the bare loop with no database (the targets' measure). x bare into the "
        "same database: over the bare loop writing the same rows, each committed on its own "
        "(autocommit), no order, no guarantee.",
    ]
    judged = judge(rows)
    if judged:
        lines += ["", "| target (one run, side by side) | measured | verdict |", "|---|---:|---|"]
        lines += [f"| {t} | {m} | {v} |" for t, m, v in judged]
    return "\n".join(lines) + "\n"
