"""The audit's acceptance matrix, reproducible with one command per cell: every guarantee on one
log (embedded, one broker, three brokers) into one sink (topics or PostgreSQL), 5,000 messages,
30 planned faults, every fault the log supports. It starts what it needs (Kafka brokers from the
project's harness, a throwaway PostgreSQL) and writes the audit's ``--json`` rows, with the
seconds each took, to ``--out``. Rows already in ``--out`` are kept, so an interrupted matrix
resumes.

python -m assured.audit.acceptance --log embedded|kafka|cluster --sink topic|postgres --out FILE
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from assured.audit.supervisor import AuditConfig, run_audit
from assured.runtime._settings import GUARANTEES

__all__ = ["FAULTS", "main", "source_commit"]

BASE = ("sigkill", "crash-points", "handler-errors", "write-stall", "zombie", "slow-handler")
FAULTS = {
    ("embedded", "topic"): BASE,
    ("kafka", "topic"): BASE,
    ("cluster", "topic"): (*BASE, "broker-kill"),
    ("embedded", "postgres"): (*BASE, "db-restart"),
    ("kafka", "postgres"): (*BASE, "db-restart"),
    ("cluster", "postgres"): (*BASE, "broker-kill", "db-restart"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m assured.audit.acceptance")
    parser.add_argument("--log", choices=("embedded", "kafka", "cluster"), required=True)
    parser.add_argument("--sink", choices=("topic", "postgres"), default="topic")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--guarantee", choices=(*GUARANTEES, "all"), default="all")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("assured.log.kafka").setLevel(logging.CRITICAL)
    rows: dict[str, dict[str, Any]] = {}
    if args.out.exists():
        rows = {row["guarantee"]: row for row in json.loads(args.out.read_text())}
    wanted = GUARANTEES if args.guarantee == "all" else (args.guarantee,)
    todo = [g for g in wanted if g not in rows]
    if not todo:
        return _status(rows)
    home = Path(tempfile.mkdtemp(prefix="assured-acceptance-"))
    # PostgreSQL runs as its own user: its folder is a top-level one it is given.
    pg_home = Path(tempfile.mkdtemp(prefix="assured-acceptance-pg-"))
    cluster = server = None
    try:
        if args.log != "embedded":
            from assured.testing.kafka import KafkaCluster

            nodes = 3 if args.log == "cluster" else 1
            cluster = KafkaCluster(workdir=home / "kafka", nodes=nodes).start()
        if args.sink == "postgres":
            from assured.testing.postgres import PostgresServer

            server = PostgresServer(workdir=pg_home).start()
        for guarantee in todo:
            workdir = home / guarantee
            workdir.mkdir()
            url = (
                f"embedded://{workdir}/audit.db"
                if cluster is None
                else f"kafka://{cluster.bootstrap}"
            )
            cfg = AuditConfig(
                log_url=url,
                guarantee=guarantee,
                sink=args.sink,
                messages=args.messages,
                kills=args.kills,
                faults=FAULTS[(args.log, args.sink)],
                seed=args.seed,
                workdir=workdir,
                postgres_dsn=server.dsn if server is not None else None,
                postgres=server,
                session_timeout_ms=1000 if cluster is None else 3000,
                handle_delay_ms=1.0,
                timeout_s=1800,
                broker=cluster,
            )
            found = run_audit(cfg)
            rows[guarantee] = {**found.as_json(), "log_kind": args.log, "commit": source_commit()}
            args.out.write_text(json.dumps(list(rows.values()), indent=2) + "\n")
            logging.warning(
                "%s %s %s: %s, lost %d, duplicated %d, %s",
                args.log, args.sink, guarantee, found.verdict, found.lost, found.duplicated,
                {k: v for k, v in found.as_json()["faults"].items() if v},
            )  # fmt: skip
    finally:
        if server is not None:
            server.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(pg_home, ignore_errors=True)
    return _status(rows)


def source_commit() -> str:
    """The git commit of the assured source that ran (which may be a worktree of it)."""
    import subprocess

    import assured

    where = Path(assured.__file__).resolve().parent
    done = subprocess.run(
        ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def _status(rows: dict[str, dict[str, Any]]) -> int:
    return 1 if any(r["verdict"] != "pass" for r in rows.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
