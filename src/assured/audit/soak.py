"""The soak: audit rounds, one after another, until every guarantee has taken its share of
processor SIGKILLs (1,000 under exactly-once, 300 under the others), with the other faults mixed
in. Resumable: the results file is rewritten after every round, and a new run continues from it,
so a soak of hours can span sessions. Each row is the sum of one guarantee's rounds, in the
audit's ``--json`` shape, plus ``rounds`` and the seeds and reasons of any round that failed.

python -m assured.audit.soak --log embedded|kafka|cluster --out FILE [--hours H] [--instance K]
python -m assured.audit.soak --merge OUT FILE [FILE ...]
python -m assured.audit.soak --table [DIR]     (the README's table, from DIR/soak-*.json)

A round spends most of its time waiting (session timeouts, frozen zombies, slow handlers), not
computing, so several soaks of one log can run side by side: each ``--instance K`` writes its
own file and draws its own seeds, and ``--merge`` adds their rows up, guarantee by guarantee,
into the file the README quotes (the targets count the sum).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from assured.audit.acceptance import source_commit
from assured.audit.checker import Findings
from assured.audit.supervisor import AuditConfig, run_audit

__all__ = ["TARGET_KILLS", "add_up", "main", "merge", "table"]

TARGET_KILLS = {"exactly-once": 1000, "at-least-once": 300, "at-most-once": 300}
# Faults that end in a processor SIGKILL: what the targets count.
KILLS = ("sigkill", "crash-points")
FAULTS = {
    "embedded": (
        "sigkill", "crash-points", "handler-errors", "write-stall", "zombie", "rebalance",
        "slow-handler",
    ),
    "kafka": (
        "sigkill", "crash-points", "handler-errors", "write-stall", "zombie", "rebalance",
        "slow-handler", "stuck-coordinator",
    ),
    "cluster": (
        "sigkill", "crash-points", "broker-kill", "handler-errors", "zombie", "rebalance",
        "slow-handler", "stuck-coordinator",
    ),
}  # fmt: skip


def kills(row: dict[str, Any]) -> int:
    return sum(int(row.get("faults", {}).get(k, 0)) for k in KILLS)


_SUMS = ("sent", "effects", "dead_lettered", "seconds", "ambiguous_transactions")


def _add(row: dict[str, Any], more: dict[str, Any]) -> None:
    """Add ``more`` (one round's findings, or another soak's row) into ``row``: its counts,
    faults and anomalies; then the figures derived from them."""
    for key in _SUMS:
        row[key] += more[key]
    for name, n in more["faults"].items():
        row["faults"][name] = row["faults"].get(name, 0) + n
    for name, found in more["anomalies"].items():
        kept = row["anomalies"].setdefault(name, {"count": 0, "ids": []})
        kept["count"] += found["count"]
        kept["ids"] = (kept["ids"] + found["ids"])[:20]
    row["lost"] = row["anomalies"].get("lost", {}).get("count", 0)
    row["duplicated"] = row["anomalies"].get("duplicate", {}).get("count", 0)
    row["verdict"] = "fail" if row["failed_rounds"] else "pass"
    row["reasons"] = [r for fr in row["failed_rounds"] for r in fr["reasons"]][:20]


def merge(
    row: dict[str, Any] | None, f: Findings, seed: int, commit: str | None = None
) -> dict[str, Any]:
    """``row`` (the guarantee's rounds so far) with one more round's findings added; ``commit``:
    the source that ran it, kept in the row's ``commits`` (a soak spans sessions and fixes)."""
    new = f.as_json()
    if row is None:
        row = {**new, "rounds": 0, "failed_rounds": [], "anomalies": {}, "faults": {}}
        row.pop("evidence", None)  # a round's own; a failed round keeps it below
        row.update(dict.fromkeys(_SUMS, 0))
    row["rounds"] += 1
    if commit is not None:
        row["commits"] = sorted({*row.get("commits", []), commit})
    if new["verdict"] != "pass":
        failed = {"seed": seed, "reasons": new["reasons"]}
        if new.get("evidence"):
            failed["evidence"] = new["evidence"]
        row["failed_rounds"].append(failed)
    _add(row, new)
    return row


def add_up(files: list[Path]) -> list[dict[str, Any]]:
    """The rows of several soaks' files, added up per guarantee (rounds, messages, faults,
    anomalies; the failed rounds of all of them)."""
    total: dict[str, dict[str, Any]] = {}
    for path in files:
        for row in json.loads(path.read_text()):
            kept = total.get(row["guarantee"])
            if kept is None:
                total[row["guarantee"]] = json.loads(json.dumps(row))
                continue
            kept["rounds"] += row["rounds"]
            kept["failed_rounds"] += row["failed_rounds"]
            kept["commits"] = sorted({*kept.get("commits", []), *row.get("commits", [])})
            _add(kept, row)
    return list(total.values())


_NAMES = {"embedded": "embedded", "kafka": "Kafka, 1 broker", "cluster": "Kafka, 3 brokers"}


def table(folder: Path) -> list[str]:
    """The README's soak table (Markdown) from ``folder``'s ``soak-<log>.json`` and
    ``soak-<log>-<K>.json`` files (side-by-side instances added up): per log and guarantee, the
    rounds, messages, SIGKILLs against their target, the other faults, and every anomaly."""
    lines = [
        "| log | guarantee | rounds | messages | SIGKILLs (target) | other faults | lost | "
        "duplicated | other anomalies |",
        "|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for log_kind, name in _NAMES.items():
        files = sorted(folder.glob(f"soak-{log_kind}.json")) + sorted(
            folder.glob(f"soak-{log_kind}-*.json")
        )
        rows = {r["guarantee"]: r for r in add_up(files)} if files else {}
        for guarantee, target in TARGET_KILLS.items():
            r = rows.get(guarantee)
            if r is None:
                continue
            strong = guarantee == "exactly-once"

            def bold(text: str, strong: bool = strong) -> str:
                return f"**{text}**" if strong else text

            other = ", ".join(f"{k} {v:,}" for k, v in r["faults"].items() if v and k not in KILLS)
            anomalies = ", ".join(
                f"{k} {v['count']:,}"
                for k, v in r["anomalies"].items()
                if v["count"] and k not in ("lost", "duplicate")
            )
            lines.append(
                f"| {name} | {bold(guarantee)} | {r['rounds']} | {r['sent']:,} | "
                f"{kills(r):,} ({target:,}) | {other} | "
                f"{bold(format(r['lost'], ','))} | {bold(format(r['duplicated'], ','))} | "
                f"{bold(anomalies or 'none')} |"
            )
    return lines


def _merge_files(args: list[str]) -> int:
    if len(args) < 2:
        raise SystemExit("usage: python -m assured.audit.soak --merge OUT FILE [FILE ...]")
    rows = add_up([Path(p) for p in args[1:]])
    _save(Path(args[0]), {row["guarantee"]: row for row in rows})
    return 1 if any(r["verdict"] != "pass" for r in rows) else 0


def _save(out: Path, rows: dict[str, dict[str, Any]]) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(list(rows.values()), indent=2) + "\n")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--merge"]:
        return _merge_files(argv[1:])
    if argv[:1] == ["--table"]:
        print("\n".join(table(Path(argv[1]) if len(argv) > 1 else Path("benchmarks/results"))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m assured.audit.soak")
    parser.add_argument("--log", choices=sorted(FAULTS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hours", type=float, default=24.0, help="stop after this long")
    parser.add_argument("--messages", type=int, default=3000, help="messages per round")
    parser.add_argument("--kills", type=int, default=100, help="faults planned per round")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="a fraction of the SIGKILL targets (for tests)"
    )
    parser.add_argument(
        "--instance", type=int, default=0, help="one of several soaks side by side: own seeds"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("assured.log.kafka").setLevel(logging.CRITICAL)
    rows: dict[str, dict[str, Any]] = {}
    if args.out.exists():
        rows = {row["guarantee"]: row for row in json.loads(args.out.read_text())}
    until = time.monotonic() + args.hours * 3600
    cluster = None
    if args.log != "embedded":
        from assured.testing.kafka import KafkaCluster

        home = Path(tempfile.mkdtemp(prefix="assured-soak-kafka-"))
        cluster = KafkaCluster(workdir=home, nodes=3 if args.log == "cluster" else 1).start()
    try:
        while time.monotonic() < until:
            todo = [g for g, n in TARGET_KILLS.items() if kills(rows.get(g, {})) < n * args.scale]
            if not todo:
                break
            for guarantee in todo:
                row = rows.get(guarantee)
                seed = 1000 + 100_000 * args.instance + (row["rounds"] if row else 0)
                workdir = Path(tempfile.mkdtemp(prefix="assured-soak-"))
                url = (
                    f"embedded://{workdir}/soak.db"
                    if cluster is None
                    else f"kafka://{cluster.bootstrap}"
                )
                cfg = AuditConfig(
                    log_url=url,
                    guarantee=guarantee,
                    messages=args.messages,
                    kills=args.kills,
                    faults=FAULTS[args.log],
                    seed=seed,
                    workdir=workdir,
                    session_timeout_ms=1000 if cluster is None else 3000,
                    handle_delay_ms=1.0,
                    # A soak shares its machine; a round that stalls this long is stuck.
                    timeout_s=3600,
                    broker=cluster,
                )
                try:
                    found = run_audit(cfg)
                except TimeoutError as e:
                    logging.warning("round %s %d timed out: %s", guarantee, seed, e)
                    found = Findings(guarantee, url, "topic", args.messages, 0, 0)
                    found.verdict = "fail"
                    found.reasons = [f"round timed out: {str(e)[:200]}"]
                rows[guarantee] = merge(row, found, seed, source_commit())
                _save(args.out, rows)
                shutil.rmtree(workdir, ignore_errors=True)
                r = rows[guarantee]
                logging.warning(
                    "%s round %d: %s; %d SIGKILLs so far (of %d), %s",
                    guarantee, r["rounds"], found.verdict, kills(r), TARGET_KILLS[guarantee],
                    {k: v["count"] for k, v in r["anomalies"].items() if v["count"]},
                )  # fmt: skip
    finally:
        if cluster is not None:
            cluster.stop()
    return 1 if any(r["verdict"] != "pass" for r in rows.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
