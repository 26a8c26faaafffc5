"""``assured audit`` and ``assured demo``."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from assured.audit import FAULTS, AuditConfig, Findings, run_audit
from assured.audit.apps import AppPlan, AppTarget
from assured.audit.report import plain_lines, table, write_report
from assured.audit.supervisor import _check as check_audit
from assured.audit.supervisor import check_faults
from assured.errors import AssuredError, ConfigError, UsageError
from assured.log import open_log
from assured.log._open import parse_log_url
from assured.runtime import GUARANTEES
from assured.runtime._handling import ORDERINGS

__all__ = ["audit", "demo"]

# Piped output (CI logs, files) gets a table wide enough to read, not rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 130)
err = Console(stderr=True, soft_wrap=True)  # an error is one line, however long


def _guarantees(choice: str) -> list[str]:
    if choice == "all":
        return list(GUARANTEES)
    if choice not in GUARANTEES:
        raise ConfigError(f"--guarantee {choice!r}: one of {', '.join(GUARANTEES)} or all")
    return [choice]


def _run_all(configs: list[AuditConfig], quiet: bool) -> list[Findings]:
    results: list[Findings] = []
    columns = (
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, disable=quiet, transient=False) as progress:
        for cfg in configs:
            task = progress.add_task(cfg.guarantee, total=cfg.messages)

            def update(done: int, total: int, task: Any = task) -> None:
                progress.update(task, completed=done, total=total)

            cfg.progress = update
            results.append(run_audit(cfg))
    return results


def _check_report(folder: Path) -> None:
    """The report folder can be written, checked before a run rather than after it."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"--report {folder}: a file is there; the report is a folder (audit.json, "
            "audit.png, history.jsonl): give another path"
        )
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--report {folder}: {parent} cannot be written to; give another path")


def _fail(e: BaseException, workdir: Path | None = None) -> NoReturn:
    """One line on stderr: exit 2 for a mistake in the command, 1 for a run that failed."""
    code = 2 if isinstance(e, ConfigError | UsageError) else 1
    message = str(e)
    if workdir is not None and str(workdir) not in message:
        message += f" (the run's files are kept in {workdir})"
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def _finish(workdir: Path, keep: bool) -> None:
    if keep:
        err.print(f"the run's files are kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_checked(
    configs: list[AuditConfig], workdir: Path, keep: bool, quiet: bool
) -> list[Findings]:
    """Every config checked before the first run starts (so a mistake is said before any
    progress bar); then the runs. The work folder goes at the end unless ``keep``; a run that
    fails keeps it, for its processors' logs, and says where it is."""
    try:
        for cfg in configs:
            check_audit(cfg)
    except ConfigError as e:
        shutil.rmtree(workdir, ignore_errors=True)
        _fail(e)
    try:
        results = _run_all(configs, quiet)
    except (AssuredError, TimeoutError) as e:
        _fail(e, workdir)
    except BaseException:
        _finish(workdir, keep)
        raise
    _finish(workdir, keep)
    return results


def _report(results: list[Findings], configs: list[AuditConfig], folder: Path) -> list[Path]:
    try:
        return write_report(results, [e for cfg in configs for e in cfg.events], folder)
    except OSError as e:
        err.print(f"[red]error:[/red] cannot write the report to {escape(str(folder))}: {e}")
        raise typer.Exit(1) from None


KEEP = typer.Option(
    False, "--keep", help="Keep the run's work folder (engine file, processors' logs) in /tmp."
)


def audit(
    ctx: typer.Context,
    log: str = typer.Option("", "--log", "-b", help="Log URL (default: a fresh embedded file)."),
    guarantee: str = typer.Option("all", help="at-most-once, at-least-once, exactly-once or all."),
    sink: str = typer.Option("topic", help="Where effects go: topic, sqlite or postgres."),
    messages: int = typer.Option(5000, min=1),
    processes: int = typer.Option(2, min=1, help="Processor processes in the group."),
    kills: int = typer.Option(10, min=0, help="Faults to inject over each run."),
    faults: str = typer.Option(
        "sigkill,crash-points", help=f"Comma-separated, from: {', '.join(FAULTS)}."
    ),
    seed: int = typer.Option(1, help="The same seed gives the same fault schedule."),
    postgres_dsn: str = typer.Option("", help="PostgreSQL DSN for --sink postgres."),
    cluster_dir: Path = typer.Option(
        Path(".kafka"),
        help="State folder of `make kafka-up` (NODES=3 for broker-kill), for broker-kill and "
        "write-stall on Kafka.",
    ),
    postgres_data: Path | None = typer.Option(
        None, help="The PostgreSQL server's data directory, for db-restart (pg_ctl restart)."
    ),
    marked: int = typer.Option(
        0, min=0, help="handler-errors: messages per kind of failure (0: one in a hundred)."
    ),
    session_timeout_ms: int = typer.Option(0, min=0, help="Processors' session timeout (0: auto)."),
    handle_delay_ms: float | None = typer.Option(
        None,
        min=0.0,
        help="Work per message in each processor, so that a short run lasts long enough for "
        "every planned fault to land mid-stream (default 0; 2 with --app: a pause before each "
        "call of the App's handler).",
        show_default=False,
    ),
    concurrency: int = typer.Option(
        1, min=1, help="Records each processor handles side by side (@app.handler concurrency)."
    ),
    ordering: str = typer.Option(
        "key", help="With --concurrency: which records never overlap: key, partition, unordered."
    ),
    handler_latency_ms: float = typer.Option(
        0.0,
        min=0.0,
        help="An async handler that awaits this long per message (one in ten: ten times as "
        "long), like a payment gateway; 0: a plain def.",
    ),
    timeout: float = typer.Option(600, min=1, help="Give up on a run after this many seconds."),
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
    report: Path | None = typer.Option(None, help="Write audit.json, audit.png, history.jsonl."),
    keep: bool = KEEP,
    app: str = typer.Option(
        "",
        "--app",
        help="Audit your own App (module:attribute, imported from the current folder) instead "
        "of the audit's workload: its handlers and sink run untouched under the faults, and "
        "the verdict is judged against its own guarantee (or --expect).",
        metavar="MODULE:APP",
    ),
    inputs: list[str] = typer.Option(
        [],
        "--input",
        help="With --app: topic=FILE.jsonl (one record per line: key, value, headers) or "
        "topic=module:function (returns such dicts); repeatable.",
        metavar="TOPIC=SOURCE",
    ),
    id_field: str = typer.Option(
        "",
        help="With --app: the field (dotted path) of each input's JSON value that is its id, "
        "and of each output of --effects-topic that names its input. Default: the position.",
    ),
    effects_sql: str = typer.Option(
        "", help='With --app: "SELECT <id> FROM ...", one row per effect, on the sink\'s database.'
    ),
    effects_db: str = typer.Option(
        "",
        help="With --app: where --effects-sql runs (a SQLite file or a postgresql:// DSN), when "
        "the effects are not in the App's sink.",
    ),
    effects_topic: str = typer.Option(
        "", help="With --app: the topic whose records are the effects (see --id-field)."
    ),
    expect: str = typer.Option(
        "",
        help="With --app: the guarantee its effects must show, when not the one it runs under "
        "(an at-least-once App with idempotent effects: exactly-once).",
    ),
    use_postgres: bool = typer.Option(
        False,
        "--use-postgres",
        help="With --app: the App's PostgreSQL sink names a database for tests; the audit may "
        "write there.",
    ),
) -> None:
    """Crash processors on purpose and count what was lost, duplicated or read from aborted
    transactions. Exits 1 when any audited guarantee fails its verdict (3 when none fails and
    one is inconclusive: an audit of an App where no fault landed). Every option is
    checked before the first run; the work folder in /tmp goes afterwards unless --keep.

    With --app, your own App is audited: assured audit --app payments:app --input
    charges=charges.jsonl --id-field id --effects-sql "SELECT charge_id FROM charges"."""
    import json
    import logging

    # Brokers and processors die on purpose here; the client library's complaints about it
    # are expected, and the history in the report tells what happened. For this command only:
    # called in-process (a test, a notebook), the logger is as it was afterwards.
    kafka_log = logging.getLogger("assured.log.kafka")
    ctx.call_on_close(functools.partial(kafka_log.setLevel, kafka_log.level))
    kafka_log.setLevel(logging.CRITICAL)
    try:
        fault_list = check_faults(f.strip() for f in faults.split(",") if f.strip())
        chosen = _guarantees(guarantee)
        if not fault_list and kills:
            raise ConfigError(f"--faults {faults!r} names no fault; give one, or --kills 0")
        kafka = bool(log) and parse_log_url(log).scheme == "kafka"
        if "db-restart" in fault_list and postgres_data is None:
            raise ConfigError("db-restart needs --postgres-data DIR (the server's data directory)")
        if "broker-kill" in fault_list and not kafka:
            raise ConfigError("broker-kill needs a kafka:// log (a three-node cluster)")
        if ordering not in ORDERINGS:
            raise ConfigError(f"--ordering {ordering!r}: one of {', '.join(ORDERINGS)}")
        if report is not None:
            _check_report(report)
        target, chosen, messages = _app_target(
            app, inputs, id_field, effects_sql, effects_db, effects_topic, expect, use_postgres,
            guarantee, sink, log,
        ) or (None, chosen, messages)  # fmt: skip
        broker = None
        if "broker-kill" in fault_list or ("write-stall" in fault_list and kafka):
            from assured.testing.kafka import KafkaCluster

            broker = KafkaCluster.attach(cluster_dir.resolve())
    except AssuredError as e:
        _fail(e)
    workdir = Path(tempfile.mkdtemp(prefix="assured-audit-"))
    url = log or f"embedded://{workdir}/audit.db"
    session = session_timeout_ms or (3000 if kafka else 1000)
    configs = [
        AuditConfig(
            log_url=url,
            guarantee=g,
            sink=sink,
            messages=messages,
            processes=processes,
            kills=kills,
            faults=fault_list,
            seed=seed,
            workdir=workdir,
            postgres_dsn=postgres_dsn or None,
            session_timeout_ms=session,
            handle_delay_ms=_delay(handle_delay_ms, target),
            app=target,
            concurrency=concurrency,
            ordering=ordering,
            handler_latency_ms=handler_latency_ms,
            timeout_s=timeout,
            marked=marked,
            broker=broker,
            postgres=postgres_data.resolve() if postgres_data is not None else None,
        )
        for g in chosen
    ]
    results = _run_checked(configs, workdir, keep, quiet=json_out)
    if report is not None:
        paths = _report(results, configs, report)
        err.print("report: " + ", ".join(str(p) for p in paths))
    if json_out:
        print(json.dumps([f.as_json() for f in results], indent=2))
    else:
        console.print(table(results))
    _exit_for(results)


def _exit_for(results: list[Findings]) -> None:
    """Exit 1 when a verdict failed; 3 when none failed and one is inconclusive (nothing
    failed, and not everything was shown)."""
    if any(f.verdict == "fail" for f in results):
        raise typer.Exit(1)
    if any(f.verdict != "pass" for f in results):
        raise typer.Exit(3)


def _delay(given: float | None, target: AppTarget | None) -> float:
    """--handle-delay-ms: as given; else 2 ms before each call of an App's own handler (its
    run must last long enough for the faults to land), none in the audit's own workload."""
    if given is not None:
        return given
    return 2.0 if target is not None else 0.0


def _app_target(
    app: str,
    inputs: list[str],
    id_field: str,
    effects_sql: str,
    effects_db: str,
    effects_topic: str,
    expect: str,
    use_postgres: bool,
    guarantee: str,
    sink: str,
    log: str,
) -> tuple[AppTarget, list[str], int] | None:
    """``--app`` and its options, checked (the App imported, its input read); the guarantee
    it runs under and the number of inputs. None without --app (when none of its options may
    be given either)."""
    if not app:
        if inputs or id_field or effects_sql or effects_db or effects_topic or expect:
            raise ConfigError(
                "--input, --id-field, --effects-sql, --effects-db, --effects-topic and --expect "
                "are for --app (your own App); the audit's own workload needs none of them"
            )
        return None
    if guarantee != "all":
        raise ConfigError(
            f"--guarantee {guarantee} with --app: the App runs under its own guarantee; "
            "--expect names another one its effects must show"
        )
    if sink != "topic":
        raise ConfigError(f"--sink {sink} with --app: the App's own sink is audited")
    pairs = []
    for item in inputs:
        topic, eq, source = item.partition("=")
        if not eq or not topic or not source:
            raise ConfigError(f"--input {item!r}: topic=FILE.jsonl or topic=module:function")
        pairs.append((topic, source))
    target = AppTarget(
        app=app,
        inputs=pairs,
        id_field=id_field or None,
        effects_sql=effects_sql or None,
        effects_topic=effects_topic or None,
        effects_db=effects_db or None,
        expect=expect or None,
        use_postgres=use_postgres,
    )
    plan = AppPlan(target)
    if log:  # a log of the user's: what is on it already is checked before any run
        with contextlib.closing(open_log(log)) as opened:
            plan.effects_before(opened)
    return target, [plan.guarantee], len(plan.records)


def demo(
    messages: int = typer.Option(2000, min=100, help="Charges per guarantee."),
    kills: int = typer.Option(6, min=1, help="Crashes per guarantee."),
    seed: int = typer.Option(7),
    report: Path = typer.Option(Path("assured-demo-report"), help="Where the report goes."),
    keep: bool = KEEP,
) -> None:
    """The payment example on the embedded engine: a stream of charges, processed under each
    guarantee while processors are SIGKILLed and crash at the point where each is weakest.
    Charging twice and never charging are both bugs; see which guarantee does which. The
    work folder in /tmp goes afterwards unless --keep."""
    try:
        _check_report(report)
    except ConfigError as e:
        _fail(e)
    workdir = Path(tempfile.mkdtemp(prefix="assured-demo-"))
    console.print(
        f"[bold]assured demo[/bold]: {messages} card charges per guarantee, 2 processors, "
        f"{kills} crashes each (SIGKILL, and crash points where each guarantee is weakest), "
        f"on the embedded engine in {workdir}.\n"
    )
    configs = [
        AuditConfig(
            log_url=f"embedded://{workdir}/payments.db",
            guarantee=g,
            messages=messages,
            processes=2,
            kills=kills,
            faults=("sigkill", "crash-points"),
            seed=seed,
            workdir=workdir,
            session_timeout_ms=1000,
            # 1 ms of work per charge: the run lasts long enough for every planned crash to
            # land mid-stream, however fast the runtime gets.
            handle_delay_ms=1.0,
            timeout_s=300,
        )
        for g in GUARANTEES
    ]
    results = _run_checked(configs, workdir, keep, quiet=False)
    console.print(table(results, title="payments under crashes"))
    for f in results:
        for line in plain_lines(f, noun="charges", verb="charged"):
            console.print(line)
    paths = _report(results, configs, report)
    console.print(f"\nreport: {', '.join(str(p) for p in paths)}")
    if any(f.verdict != "pass" for f in results):
        raise typer.Exit(1)
