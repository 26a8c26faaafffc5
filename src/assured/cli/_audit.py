"""``assured audit`` and ``assured demo``."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from assured.audit import FAULTS, AuditConfig, Findings, run_audit
from assured.audit.report import plain_lines, table, write_report
from assured.audit.supervisor import check_faults
from assured.errors import AssuredError, ConfigError
from assured.runtime import GUARANTEES

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


def audit(
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
    session_timeout_ms: int = typer.Option(0, help="Processors' session timeout (0: auto)."),
    handle_delay_ms: float = typer.Option(
        0.0,
        min=0.0,
        help="Work per message in each processor, so that a short run lasts long enough for "
        "every planned fault to land mid-stream.",
    ),
    timeout: float = typer.Option(600, help="Give up on a run after this many seconds."),
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
    report: Path | None = typer.Option(None, help="Write audit.json, audit.png, history.jsonl."),
) -> None:
    """Crash processors on purpose and count what was lost, duplicated or read from aborted
    transactions. Exits 1 when any audited guarantee fails its verdict."""
    import json
    import logging

    # Brokers and processors die on purpose here; the client library's complaints about it
    # are expected, and the history in the report tells what happened.
    logging.getLogger("assured.log.kafka").setLevel(logging.CRITICAL)
    try:
        fault_list = check_faults(f.strip() for f in faults.split(",") if f.strip())
        chosen = _guarantees(guarantee)
        if "db-restart" in fault_list and postgres_data is None:
            raise ConfigError("db-restart needs --postgres-data DIR (the server's data directory)")
        workdir = Path(tempfile.mkdtemp(prefix="assured-audit-"))
        url = log or f"embedded://{workdir}/audit.db"
        broker = None
        if "broker-kill" in fault_list and not url.startswith("kafka://"):
            raise ConfigError("broker-kill needs a kafka:// log (a three-node cluster)")
        stall_broker = "write-stall" in fault_list and url.startswith("kafka://")
        if "broker-kill" in fault_list or stall_broker:
            from assured.testing.kafka import KafkaCluster

            broker = KafkaCluster.attach(cluster_dir.resolve())
        session = session_timeout_ms or (1000 if url.startswith("embedded") else 3000)
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
                handle_delay_ms=handle_delay_ms,
                timeout_s=timeout,
                marked=marked,
                broker=broker,
                postgres=postgres_data.resolve() if postgres_data is not None else None,
            )
            for g in chosen
        ]
        results = _run_all(configs, quiet=json_out)
    except (AssuredError, TimeoutError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if report is not None:
        events = [e for cfg in configs for e in cfg.events]
        paths = write_report(results, events, report)
        err.print("report: " + ", ".join(str(p) for p in paths))
    if json_out:
        print(json.dumps([f.as_json() for f in results], indent=2))
    else:
        console.print(table(results))
    if any(f.verdict != "pass" for f in results):
        raise typer.Exit(1)


def demo(
    messages: int = typer.Option(2000, min=100, help="Charges per guarantee."),
    kills: int = typer.Option(6, min=1, help="Crashes per guarantee."),
    seed: int = typer.Option(7),
    report: Path = typer.Option(Path("assured-demo-report"), help="Where the report goes."),
) -> None:
    """The payment example on the embedded engine: a stream of charges, processed under each
    guarantee while processors are SIGKILLed and crash at the point where each is weakest.
    Charging twice and never charging are both bugs; see which guarantee does which."""
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
    try:
        results = _run_all(configs, quiet=False)
    except (AssuredError, TimeoutError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(table(results, title="payments under crashes"))
    for f in results:
        for line in plain_lines(f, noun="charges", verb="charged"):
            console.print(line)
    paths = write_report(results, [e for c in configs for e in c.events], report)
    console.print(f"\nreport: {', '.join(str(p) for p in paths)}")
    if any(f.verdict != "pass" for f in results):
        raise typer.Exit(1)
