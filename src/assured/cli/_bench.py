"""``assured bench``: run a benchmark suite, print its numbers and keep them in the repo."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NoReturn
from urllib.parse import unquote, urlsplit

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["bench"]

_SUITES = ("log", "runtime", "io")
_DURABILITIES = ("both", "normal", "full")

# (result key, label, format, target: (description, check) or None)
_Target = tuple[str, Callable[[float], bool]]
_ROWS: Sequence[tuple[str, str, str, _Target | None]] = (
    ("produce_per_s", "produce, idempotent (records/s)", "{:,.0f}", None),
    ("sqlite_raw_per_s", "plain sqlite3 executemany (records/s)", "{:,.0f}", None),
    ("produce_vs_raw", "produce / plain sqlite3", "{:.2f}", (">= 0.5", lambda v: v >= 0.5)),
    (
        "consume_per_s",
        "consume, read_committed (records/s)",
        "{:,.0f}",
        (">= 500,000", lambda v: v >= 500_000),
    ),
    ("sqlite_raw_select_per_s", "plain sqlite3 select (records/s)", "{:,.0f}", None),
    ("consume_vs_raw_select", "consume / plain sqlite3 select", "{:.2f}", None),
    ("txn_produce_per_s", "produce, transactional (records/s)", "{:,.0f}", None),
    ("idle_cpu_percent", "idle consumer (% of one core)", "{:.2f}", ("< 2", lambda v: v < 2)),
    ("wake_latency_ms_p50", "wake-up latency p50 (ms)", "{:.2f}", None),
    ("wake_latency_ms_p99", "wake-up latency p99 (ms)", "{:.2f}", None),
)
_FACTS = ("cpu_count", "memory_gib", "python_version", "sqlite_version", "platform")
_LOAD = ("load_avg_1m_before", "load_avg_1m_after")


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _embedded_dir(url: str) -> Path:
    """The folder named by ``embedded:///DIR``; anything else is a usage error."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "embedded":
        _fail(
            f"--log {url!r}: the log suite benchmarks the embedded engine only; give it a "
            "folder for its files, as --log embedded:///tmp/assured-bench"
        )
    if not url[len(parts.scheme) + 1 :].startswith("//"):
        _fail(f"--log {url!r} lacks the '//' after 'embedded:'; write embedded:///absolute/folder")
    if parts.netloc not in ("", ".", "..") and not parts.netloc.startswith("~"):
        _fail(
            f"--log {url!r} is ambiguous: write embedded:///{parts.netloc}{parts.path} for an "
            f"absolute folder or embedded://./{parts.netloc}{parts.path} for a relative one"
        )
    if parts.query:
        _fail(f"--log {url!r}: no options here; choose durability with --durability")
    raw = unquote(parts.netloc + parts.path)
    if not raw or raw == "/":
        _fail(f"--log {url!r} names no folder; write embedded:///absolute/folder")
    folder = Path(raw).expanduser()
    if folder.exists() and not folder.is_dir():
        _fail(f"--log {url!r}: {folder} is a file; the benchmark needs a folder for its files")
    return folder


def _cell(result: dict[str, object], key: str, fmt: str) -> str:
    value = result.get(key)
    return fmt.format(value) if isinstance(value, int | float) else "-"


def _verdict(results: Sequence[dict[str, object]], key: str, target: _Target | None) -> str:
    if target is None:
        return ""
    text, check = target
    missed = [
        str(r["durability"])
        for r in results
        if not (isinstance(v := r.get(key), int | float) and check(float(v)))
    ]
    if not missed:
        return f"{text}: met"
    if len(missed) == len(results):
        return f"{text}: MISSED"
    return f"{text}: MISSED by {', '.join(missed)}"


def _table(results: Sequence[dict[str, object]]) -> Table:
    first = results[0]
    table = Table(
        title=f"embedded log: {first['records']:,} records of {first['record_size']} bytes, "
        f"batches of {first['batch']}"
    )
    table.add_column("measure")
    for r in results:
        table.add_column(f"durability={r['durability']}", justify="right")
    table.add_column("target")
    for key, label, fmt, target in _ROWS:
        table.add_row(label, *(_cell(r, key, fmt) for r in results), _verdict(results, key, target))
    table.caption = "1-min load average before/after: " + ", ".join(
        f"{r['durability']} {r.get(_LOAD[0])}/{r.get(_LOAD[1])}" for r in results
    )
    return table


def _markdown(results: Sequence[dict[str, object]], command: str) -> str:
    first = results[0]
    head = ["measure", *(f"durability={r['durability']}" for r in results), "target"]
    lines = [
        "# Log benchmark: the embedded engine",
        "",
        f"{first['records']:,} records of {first['record_size']} bytes, batches of "
        f"{first['batch']}, {first['partitions']} partitions; made by `{command}`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", *("---:" for _ in results), "---"]) + "|",
    ]
    for key, label, fmt, target in _ROWS:
        cells = [label, *(_cell(r, key, fmt) for r in results), _verdict(results, key, target)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Machine: " + ", ".join(f"{k} {first.get(k)}" for k in _FACTS) + "."]
    loads = "; ".join(
        f"durability={r['durability']}: " + ", ".join(f"{k} {r.get(k)}" for k in _LOAD)
        for r in results
    )
    lines += ["", f"Load on the machine while measuring (other work skews every number): {loads}."]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def bench(
    log: str = typer.Option(
        "embedded:///tmp/assured-bench",
        "--log",
        "-b",
        help="Where to run: embedded:///FOLDER (fresh engine files are made there).",
    ),
    suite: str = typer.Option("log", "--suite", help=f"The suite: {', '.join(_SUITES)}."),
    json_out: bool = typer.Option(
        False, "--json", help="Print the results as a JSON list instead of a table."
    ),
    records: int | None = typer.Option(
        None, "--records", min=1, help="Records per measurement (log: 200,000; runtime: 1M)."
    ),
    durability: str = typer.Option(
        "both", "--durability", help="normal, full, or both (one run each)."
    ),
    results_dir: str = typer.Option(
        "benchmarks/results",
        "--results-dir",
        help="Where the results are written (log-embedded.*, runtime-<backend>.*).",
    ),
    latency_seconds: float = typer.Option(
        10.0, "--latency-seconds", min=0.5, help="runtime: seconds of paced load per system."
    ),
    memory_records: int = typer.Option(
        5_000_000, "--memory-records", min=0, help="runtime: records of the memory run (0: none)."
    ),
    quix_python: str | None = typer.Option(
        None,
        "--quix-python",
        help="runtime on Kafka: a Python that has quixstreams (make bench makes .venv-quix).",
    ),
    faststream_python: str | None = typer.Option(
        None,
        "--faststream-python",
        help="io on Kafka: a Python that has faststream[confluent] (make bench-io makes "
        ".venv-faststream).",
    ),
    commit_mode: str = typer.Option(
        "adaptive",
        "--commit-mode",
        help="runtime: assured exactly-once's commit_mode, adaptive or fixed (the baseline).",
    ),
    retries: int = typer.Option(
        2,
        "--retries",
        min=0,
        help="runtime: how often a run on a busy machine, or a set of rounds that disagree by "
        "over 15%, is measured again.",
    ),
    rounds: int = typer.Option(
        3, "--rounds", min=1, help="runtime: throughput runs per system; the median is reported."
    ),
    concurrency: str = typer.Option(
        "1,50,200,1000",
        "--concurrency",
        help="io: the concurrency settings to measure, comma-separated.",
    ),
    handler_ms: float = typer.Option(
        20.0, "--handler-ms", min=0.0, help="io: how long each handler call awaits."
    ),
    sinks: str = typer.Option(
        "topic",
        "--sinks",
        help="io: where assured's handler writes, comma-separated: topic (an output), sqlite "
        "(a row in a SQLite file), postgres (a row in PostgreSQL).",
    ),
    postgres_dsn: str | None = typer.Option(
        None,
        "--postgres-dsn",
        help="io with --sinks postgres: the server to use (default: a throwaway one is "
        "started, fsync on).",
    ),
    db_wait_ms: float = typer.Option(
        0.0,
        "--db-wait-ms",
        min=0.0,
        help="io with --sinks postgres: each effect's INSERT also waits this long on the "
        "server (pg_sleep), as a database on another host or a slower query would.",
    ),
    systems: str = typer.Option(
        "bare,assured,assured-fixed,quixstreams,bare-pipelined",
        "--systems",
        help="runtime: which systems, comma-separated (quixstreams runs on Kafka only; "
        "assured-fixed is exactly-once with fixed-interval commits, the adaptive commit's "
        "baseline; bare-pipelined, Kafka only, is a bare exactly-once loop built for latency: "
        "the floor under assured's).",
    ),
) -> None:
    """Benchmark the log (produce, consume and transactional throughput against plain SQLite,
    idle CPU, wake-up latency), the runtime (each guarantee against bare confluent-kafka
    loops and Quix Streams: throughput, latency at half load, memory) or io (handlers that
    wait, side by side: each guarantee at several concurrency settings against a bare
    asyncio loop)."""
    if suite not in _SUITES:
        _fail(f"unknown suite {suite!r}; known: {', '.join(_SUITES)}")
    if Path(results_dir).exists() and not Path(results_dir).is_dir():
        _fail(f"--results-dir {results_dir!r} is a file; the results go in a folder")
    if suite == "io":
        _io(
            log, json_out, records or 100_000, Path(results_dir), concurrency, handler_ms,
            faststream_python, sinks, postgres_dsn, db_wait_ms,
        )  # fmt: skip
        return
    if suite == "runtime":
        _runtime(
            log, json_out, records or 1_000_000, Path(results_dir), latency_seconds,
            memory_records, quix_python, systems, rounds, commit_mode, retries,
        )  # fmt: skip
        return
    records = records or 200_000
    if durability not in _DURABILITIES:
        _fail(f"--durability {durability!r}: expected {', '.join(_DURABILITIES)}")
    folder = _embedded_dir(log)
    chosen: list[Literal["normal", "full"]] = ["normal", "full"]
    if durability != "both":
        chosen = ["full"] if durability == "full" else ["normal"]
    out = Path(results_dir)

    from assured.bench.log_suite import run_log_suite
    from assured.errors import AssuredError

    progress = Console(stderr=True)
    results: list[dict[str, object]] = []
    for d in chosen:
        progress.print(f"log suite: {records:,} records, durability={d}, in {folder} ...")
        try:
            results.append(run_log_suite(folder, records=records, durability=d))
        except (AssuredError, OSError, RuntimeError) as e:
            _fail(f"the log suite failed (durability={d}): {e}", code=1)

    command = shlex.join(["assured", *sys.argv[1:]])
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write(out / "log-embedded.json", json.dumps(results, indent=2) + "\n")
        _write(out / "log-embedded.md", _markdown(results, command))
    except OSError as e:
        _fail(f"cannot write the results to {out}: {e}", code=1)

    if json_out:
        typer.echo(json.dumps(results, indent=2))
    else:
        Console().print(_table(results))
        progress.print(f"written: {out / 'log-embedded.json'} and {out / 'log-embedded.md'}")


def _kafka_or_folder(log: str, suite: str) -> str:
    """``--log`` for a suite that runs on Kafka or in a folder of fresh engine files."""
    scheme = urlsplit(log).scheme.lower()
    if scheme == "embedded":
        return f"embedded://{_embedded_dir(log)}"
    if scheme != "kafka":
        _fail(f"--log {log!r}: the {suite} suite runs on kafka://HOST:PORT or embedded:///FOLDER")
    return log


def _io(
    log: str,
    json_out: bool,
    records: int,
    out: Path,
    concurrency: str,
    handler_ms: float,
    faststream_python: str | None,
    sinks: str = "topic",
    postgres_dsn: str | None = None,
    db_wait_ms: float = 0.0,
) -> None:
    from assured.bench.io_suite import IoBenchConfig, markdown, run_io_suite
    from assured.errors import AssuredError

    chosen = [x.strip() for x in sinks.split(",") if x.strip()]
    unknown = sorted(set(chosen) - {"topic", "sqlite", "postgres"})
    if not chosen or unknown:
        _fail(f"--sinks {sinks!r}: comma-separated, from topic, sqlite, postgres")
    if "postgres" in chosen and postgres_dsn is None:
        from assured.testing.postgres import PostgresServer

        with (
            tempfile.TemporaryDirectory(prefix="assured-bench-pg-") as home,
            PostgresServer(Path(home), fsync=True) as server,
        ):
            _io(
                log, json_out, records, out, concurrency, handler_ms, faststream_python,
                sinks, server.dsn, db_wait_ms,
            )  # fmt: skip
        return

    log = _kafka_or_folder(log, "io")
    try:
        levels = sorted({int(c) for c in concurrency.split(",") if c.strip()})
    except ValueError:
        levels = []
    if not levels or levels[0] < 1:
        _fail(f"--concurrency {concurrency!r}: whole numbers of 1 or more, comma-separated")
    if handler_ms <= 0:
        _fail("--handler-ms must be above 0: the io suite measures handlers that wait")
    if faststream_python and not shutil.which(faststream_python):
        _fail(f"--faststream-python {faststream_python!r}: no such program")
    if faststream_python and not log.startswith("kafka://"):
        _fail("--faststream-python: FastStream runs on Kafka only; give --log kafka://HOST:PORT")
    config = IoBenchConfig(
        log=log,
        records=records,
        handler_ms=handler_ms,
        concurrency=levels,
        faststream_python=faststream_python,
        sinks=chosen,
        postgres_dsn=postgres_dsn,
        db_wait_ms=db_wait_ms,
    )
    progress = Console(stderr=True)
    try:
        rows = run_io_suite(config, progress=lambda m: progress.print(f"io: {m}"))
    except (AssuredError, OSError, RuntimeError) as e:
        _fail(f"the io suite failed: {e}", code=1)
    command = shlex.join(["assured", *sys.argv[1:]])
    text = markdown(rows, command)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write(out / f"io-{config.backend}.json", json.dumps(rows, indent=2) + "\n")
        _write(out / f"io-{config.backend}.md", text)
    except OSError as e:
        _fail(f"cannot write the results to {out}: {e}", code=1)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(text)
        progress.print(f"written: {out}/io-{config.backend}.json and .md")


def _runtime(
    log: str,
    json_out: bool,
    records: int,
    out: Path,
    latency_seconds: float,
    memory_records: int,
    quix_python: str | None,
    systems: str,
    rounds: int,
    commit_mode: str = "adaptive",
    retries: int = 2,
) -> None:
    from assured.bench.runtime_suite import SYSTEMS, RuntimeBenchConfig, run_runtime_suite
    from assured.cli import _bench_runtime
    from assured.errors import AssuredError

    log = _kafka_or_folder(log, "runtime")
    chosen = [s.strip() for s in systems.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown or not chosen:
        _fail(f"--systems {systems!r}: choose from {', '.join(SYSTEMS)}")
    if commit_mode not in ("adaptive", "fixed"):
        _fail(f"--commit-mode {commit_mode!r}: choose adaptive or fixed")
    config = RuntimeBenchConfig(
        log=log,
        records=records,
        latency_seconds=latency_seconds,
        memory_records=memory_records,
        quix_python=quix_python,
        systems=chosen,
        rounds=rounds,
        commit_mode=commit_mode,
        retries=retries,
    )
    progress = Console(stderr=True)
    try:
        rows = run_runtime_suite(config, progress=lambda m: progress.print(f"runtime: {m}"))
    except ValueError as e:
        _fail(str(e))
    except (AssuredError, OSError, RuntimeError) as e:
        _fail(f"the runtime suite failed: {e}", code=1)
    command = shlex.join(["assured", *sys.argv[1:]])
    try:
        written = _bench_runtime.write(out, config.backend, rows, command)
    except OSError as e:
        _fail(f"cannot write the results to {out}: {e}", code=1)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
    else:
        Console(width=max(150, Console().width)).print(_bench_runtime.table(rows))
        progress.print("written: " + " and ".join(str(p) for p in written))
