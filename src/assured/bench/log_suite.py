"""The log benchmark for the embedded engine, in one run.

Every number comes from fresh files in one folder, so the engine and its baseline, plain
``sqlite3``, write to the same disk with the same pragmas:

- ``produce_per_s``: an idempotent producer sends keyless records to a 4-partition topic and
  flushes every ``batch`` records; records per second over all its batches, flushes included.
- ``consume_per_s``: a read_committed consumer, partitions assigned by hand, polls
  ``max_records=batch`` until it has read every record produced above; a fresh consumer
  does this 5 times (``consume_passes_per_s``) and the median is reported.
- ``sqlite_raw_select_per_s``: plain ``sqlite3`` reading back the rows of its own produce
  baseline (below: one row per record), ``batch`` rows per ``SELECT ... fetchall()``; 5 passes
  interleaved with the consumer's, median. ``consume_vs_raw_select`` is the ratio of the two
  medians: above 1 because the engine stores records in batches, many to a row.
- ``txn_produce_per_s``: a transactional producer; begin, ``batch`` sends, commit, repeated.
- ``sqlite_raw_per_s``: the same rows, ``executemany`` into an ``(id, ts, key, value)`` table
  (``id`` the rowid) in one
  transaction per batch. ``produce_vs_raw`` is ``produce_per_s / sqlite_raw_per_s``. The two
  run interleaved, batch by batch (which goes first alternates), each timed on its own: other
  work on the machine then slows both sides of the ratio alike instead of skewing it.
- ``idle_cpu_percent``: a consumer in another process blocked in ``poll`` on an empty topic;
  that process's CPU time (all its threads) as a percent of one core over the wait.
- ``wake_latency_ms_p50`` / ``_p99``: a consumer process waits in ``poll`` on an empty topic;
  this process sends one record stamped with its send time and flushes; the consumer's receive
  time minus the stamp, over ``wake_samples`` records.

The consumer processes are started with ``spawn``: a fresh interpreter, nothing inherited.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import sqlite3
import statistics
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal

import psutil

from assured.log import TopicPartition
from assured.log.embedded import EmbeddedLog, EmbeddedSettings

__all__ = ["run_log_suite"]

Durability = Literal["normal", "full"]

_PARTITIONS = 4
_CONSUME_PASSES = 5
_TOPIC = "bench"
_IDLE_TOPIC = "bench-idle"
_WAKE_TOPIC = "bench-wake"
_SENT_HEADER = "sent-ns"
_CHILD_TIMEOUT = 60.0  # seconds a child may take to start or answer before the run fails


def _values(count: int, size: int) -> list[bytes]:
    """``count`` distinct values of ``size`` bytes (random, so nothing compresses them)."""
    return [os.urandom(size) for _ in range(count)]


def _chunks(records: int, batch: int) -> Iterator[int]:
    """The sizes of the batches that make up ``records``."""
    left = records
    while left > 0:
        n = min(batch, left)
        yield n
        left -= n


def _fresh(path: Path) -> Path:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


def _open(path: Path, durability: Durability) -> EmbeddedLog:
    return EmbeddedLog(path, EmbeddedSettings(durability=durability))


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


# -- the engine -------------------------------------------------------------------------------


def _consume(log: EmbeddedLog, records: int, batch: int) -> float:
    """One read_committed pass over every record, by a fresh consumer; records per second."""
    with log.consumer(isolation="read_committed") as consumer:
        consumer.assign([TopicPartition(_TOPIC, p) for p in range(_PARTITIONS)])
        seen = 0
        start = time.perf_counter()
        while seen < records:
            got = consumer.poll(max_records=batch, timeout=5.0)
            if not got:
                raise RuntimeError(f"the consumer stopped at {seen} of {records} records")
            seen += len(got)
        elapsed = time.perf_counter() - start
    return _rate(seen, elapsed)


def _raw_select(path: Path, records: int, batch: int) -> float:
    """Plain sqlite3 reading back the rows :class:`_RawSqlite` wrote (as many as the consumer
    reads), ``batch`` rows per query: records per second."""
    conn = sqlite3.connect(path)
    seen, position = 0, 0
    try:
        conn.execute("PRAGMA mmap_size=268435456")  # as the engine reads
        start = time.perf_counter()
        while True:
            rows = conn.execute(
                "SELECT id, ts, key, value FROM records WHERE id >= ? ORDER BY id LIMIT ?",
                (position, batch),
            ).fetchall()
            if not rows:
                break
            seen += len(rows)
            position = rows[-1][0] + 1
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    if seen != records:
        raise RuntimeError(f"plain sqlite3 read {seen} of {records} records")
    return _rate(seen, elapsed)


def _consume_and_raw(
    log: EmbeddedLog, path: Path, records: int, batch: int
) -> tuple[list[float], list[float]]:
    """Passes of :func:`_consume` and :func:`_raw_select`, interleaved (which goes first
    alternates) so that other work on the machine slows both alike."""
    consume: list[float] = []
    select: list[float] = []
    for i in range(_CONSUME_PASSES):
        for side in ("consume", "select") if i % 2 == 0 else ("select", "consume"):
            if side == "consume":
                consume.append(_consume(log, records, batch))
            else:
                select.append(_raw_select(path, records, batch))
    return consume, select


def _txn_produce(log: EmbeddedLog, records: int, batch: int, values: Sequence[bytes]) -> float:
    with log.producer(transactional_id="bench-txn", batch_size=batch) as producer:
        producer.init_transactions()
        start = time.perf_counter()
        for n in _chunks(records, batch):
            producer.begin_transaction()
            for value in values[:n]:
                producer.send(_TOPIC, value)
            producer.commit_transaction()
        elapsed = time.perf_counter() - start
    return _rate(records, elapsed)


# -- the engine's producer against its baseline --------------------------------------------


class _RawSqlite:
    """The baseline: plain ``sqlite3``, the engine's pragmas, one transaction per batch."""

    def __init__(self, path: Path, durability: Durability):
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        self.conn.execute("PRAGMA cache_size=-32768")  # as the engine's connections
        self.conn.execute("PRAGMA temp_store=MEMORY")
        self.conn.execute(
            "CREATE TABLE records (id INTEGER PRIMARY KEY, ts INTEGER, key BLOB, value BLOB)"
        )

    def write(self, values: Sequence[bytes]) -> None:
        rows = [(time.time_ns() // 1_000_000, None, value) for value in values]
        self.conn.execute("BEGIN")
        self.conn.executemany("INSERT INTO records (ts, key, value) VALUES (?, ?, ?)", rows)
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


def _produce_and_raw(
    log: EmbeddedLog,
    raw_path: Path,
    durability: Durability,
    records: int,
    batch: int,
    values: Sequence[bytes],
) -> tuple[float, float]:
    """(produce records/s, plain sqlite3 records/s), measured batch by batch, interleaved."""
    raw = _RawSqlite(raw_path, durability)
    produce_s = raw_s = 0.0
    try:
        with log.producer(batch_size=batch) as producer:
            for i, n in enumerate(_chunks(records, batch)):
                chunk = values[:n]
                for side in ("produce", "raw") if i % 2 == 0 else ("raw", "produce"):
                    start = time.perf_counter()
                    if side == "produce":
                        for value in chunk:
                            producer.send(_TOPIC, value)
                        producer.flush()
                        produce_s += time.perf_counter() - start
                    else:
                        raw.write(chunk)
                        raw_s += time.perf_counter() - start
    finally:
        raw.close()
    return _rate(records, produce_s), _rate(records, raw_s)


# -- consumers in other processes -------------------------------------------------------------


def _idle_child(path: str, durability: Durability, seconds: float, out: Connection) -> None:
    """Block in one ``poll`` on an empty topic; send back (cpu seconds, wall seconds, inotify).
    CPU time is this process's, every thread's, at the clock's full resolution (psutil's
    ``cpu_times`` counts in 10 ms ticks on Linux, too coarse for a mostly idle process)."""
    log = _open(Path(path), durability)
    with log.consumer(isolation="read_committed") as consumer:
        consumer.assign([TopicPartition(_IDLE_TOPIC, 0)])
        consumer.poll(timeout=0)  # positions and statements ready before the clock starts
        out.send("ready")
        cpu0, wall0 = time.process_time(), time.perf_counter()
        left = seconds
        while left > 0:
            if consumer.poll(timeout=left):
                raise RuntimeError("the idle topic is not empty")
            left = seconds - (time.perf_counter() - wall0)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        inotify = consumer._waiter.uses_inotify  # a fact worth reporting
    out.send((cpu, wall, inotify))
    out.close()


def _wake_child(path: str, durability: Durability, samples: int, out: Connection) -> None:
    """Wait in ``poll``; for each record, send back receive time minus its send stamp (ns)."""
    log = _open(Path(path), durability)
    with log.consumer(isolation="read_committed") as consumer:
        consumer.assign([TopicPartition(_WAKE_TOPIC, 0)])
        consumer.poll(timeout=0)
        out.send("ready")
        received = 0
        while received < samples:
            got = consumer.poll(max_records=1, timeout=_CHILD_TIMEOUT)
            now = time.time_ns()
            if not got:
                raise RuntimeError(f"no record within {_CHILD_TIMEOUT} s")
            for record in got:
                stamp = record.header(_SENT_HEADER)
                assert stamp is not None
                out.send(now - int(stamp))
                received += 1
    out.close()


def _expect(conn: Connection, what: str) -> object:
    if not conn.poll(_CHILD_TIMEOUT):
        raise RuntimeError(f"the benchmark's consumer process sent no {what} in time")
    return conn.recv()


def _idle_cpu(path: Path, durability: Durability, seconds: float) -> tuple[float, bool]:
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_idle_child, args=(str(path), durability, seconds, theirs))
    child.start()
    try:
        _expect(mine, "ready signal")
        result = _expect(mine, "idle measurement")
        assert isinstance(result, tuple)
        cpu, wall, inotify = result
        return 100.0 * float(cpu) / float(wall), bool(inotify)
    finally:
        child.join(timeout=_CHILD_TIMEOUT)
        if child.is_alive():
            child.terminate()


def _wake_latency(log: EmbeddedLog, durability: Durability, samples: int) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_wake_child, args=(str(log.path), durability, samples, theirs))
    child.start()
    out: list[float] = []
    try:
        with log.producer() as producer:
            _expect(mine, "ready signal")
            for _ in range(samples):
                time.sleep(0.02)  # the consumer is back inside poll, waiting
                stamp = str(time.time_ns()).encode()
                producer.send(_WAKE_TOPIC, b"wake", headers=[(_SENT_HEADER, stamp)])
                producer.flush()
                latency = _expect(mine, "latency sample")
                assert isinstance(latency, int)
                out.append(latency / 1e6)
    finally:
        child.join(timeout=_CHILD_TIMEOUT)
        if child.is_alive():
            child.terminate()
    return out


def _percentile(samples: Sequence[float], p: int) -> float:
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1]


# -- the suite --------------------------------------------------------------------------------


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not on every platform
        return None


def machine_facts() -> dict[str, object]:
    return {
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python_version": platform.python_version(),
        "sqlite_version": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def run_log_suite(
    path_dir: Path,
    records: int = 200_000,
    batch: int = 1000,
    record_size: int = 100,
    durability: Durability = "normal",
    *,
    idle_seconds: float = 3.0,
    wake_samples: int = 50,
) -> dict[str, object]:
    """Run the whole log benchmark once, on fresh files in ``path_dir``; the result as a dict
    of plain values (JSON-ready). The files are removed afterwards."""
    if records < 1 or batch < 1 or record_size < 0 or wake_samples < 1 or idle_seconds <= 0:
        raise ValueError("records, batch and wake_samples must be positive, idle_seconds too")
    if durability not in ("normal", "full"):
        raise ValueError(f"durability={durability!r}: expected 'normal' or 'full'")
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    load_before = _load()
    values = _values(min(batch, records), record_size)
    files = {
        name: _fresh(path_dir / f"log-{name}-{durability}.db")
        for name in ("produce", "txn", "raw", "wait")
    }
    try:
        log = _open(files["produce"], durability)
        with log.admin() as admin:
            admin.create_topic(_TOPIC, partitions=_PARTITIONS)
        produce, raw = _produce_and_raw(log, files["raw"], durability, records, batch, values)
        # A pass takes well under a second, short enough for one burst of other work on the
        # machine to halve it: the median of several passes is reported, and every pass.
        consume_runs, select_runs = _consume_and_raw(log, files["raw"], records, batch)
        consume, raw_select = statistics.median(consume_runs), statistics.median(select_runs)

        txn_log = _open(files["txn"], durability)
        with txn_log.admin() as admin:
            admin.create_topic(_TOPIC, partitions=_PARTITIONS)
        txn_produce = _txn_produce(txn_log, records, batch, values)

        # The admin stays open through the idle wait, as a running system holds its engine
        # file open; the wake-up measurement's producer then holds it.
        wait_log = _open(files["wait"], durability)
        with wait_log.admin() as admin:
            admin.create_topic(_IDLE_TOPIC, partitions=1)
            admin.create_topic(_WAKE_TOPIC, partitions=1)
            idle_cpu, inotify = _idle_cpu(files["wait"], durability, idle_seconds)
        latencies = _wake_latency(wait_log, durability, wake_samples)
    finally:
        for path in files.values():
            _fresh(path)
    return {
        "suite": "log",
        "backend": "embedded",
        "durability": durability,
        "records": records,
        "batch": batch,
        "record_size": record_size,
        "partitions": _PARTITIONS,
        "produce_per_s": round(produce, 1),
        "consume_per_s": round(consume, 1),
        "consume_passes_per_s": [round(rate, 1) for rate in consume_runs],
        "sqlite_raw_select_per_s": round(raw_select, 1),
        "consume_vs_raw_select": round(consume / raw_select, 3),
        "txn_produce_per_s": round(txn_produce, 1),
        "sqlite_raw_per_s": round(raw, 1),
        "produce_vs_raw": round(produce / raw, 3),
        "idle_cpu_percent": round(idle_cpu, 3),
        "idle_seconds": idle_seconds,
        "idle_wait_uses_inotify": inotify,
        "wake_latency_ms_p50": round(_percentile(latencies, 50), 3),
        "wake_latency_ms_p99": round(_percentile(latencies, 99), 3),
        "wake_samples": len(latencies),
        # Other work on the machine skews every number above; this says how much there was.
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": _load(),
        **machine_facts(),
    }
