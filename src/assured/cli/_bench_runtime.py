"""``assured bench --suite runtime``: the table, the targets, and the files in the repo."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

__all__ = ["markdown", "table", "targets"]

Row = dict[str, Any]


def _find(rows: Sequence[Row], system: str, guarantee: str, run: str = "throughput") -> Row | None:
    for r in rows:
        if (r["system"], r["guarantee"], r["run"]) == (system, guarantee, run):
            return r
    return None


def targets(rows: Sequence[Row]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for every target the issue sets that this run can judge."""
    out: list[tuple[str, str, str]] = []

    def judge(label: str, value: float | None, ok: Callable[[float], bool], fmt: str) -> None:
        if value is None:
            return
        out.append((label, fmt.format(value), "met" if ok(value) else "MISSED"))

    backend = rows[0]["backend"] if rows else ""
    for guarantee, floor in (("at-least-once", 0.9), ("exactly-once", 0.85)):
        row = _find(rows, "assured", guarantee)
        if row is None:
            continue
        if backend == "kafka":  # the targets are set against bare confluent-kafka loops
            label = f"assured {guarantee} >= {floor} x bare"
            judge(label, row.get("vs_bare"), floor.__le__, "{:.2f} x")
        judge(
            f"assured {guarantee} >= 1.5 x Quix Streams",
            row.get("vs_quixstreams"),
            lambda v: v >= 1.5,
            "{:.2f} x",
        )
    eos = _find(rows, "assured", "exactly-once")
    alo = _find(rows, "assured", "at-least-once")
    fixed = _find(rows, "assured-fixed", "exactly-once")
    # Exactly-once at at-least-once's latency; and the floor under it: a bare loop with no
    # runtime on top, built for latency (whether the targets can be met at all here).
    pipelined = _find(rows, "bare-pipelined", "exactly-once")
    for who, row in (
        ("assured exactly-once", eos),
        ("floor: a bare exactly-once loop built for latency,", pipelined),
    ):
        for name, most in (("p50_ms", 2.0), ("p99_ms", 3.0)):
            if row is not None and alo is not None and row.get(name) and alo.get(name):
                judge(
                    f"{who} {name[:3]} <= {most:g} x at-least-once's",
                    row[name] / alo[name],
                    most.__ge__,
                    "{:.2f} x",
                )
    if eos is not None and fixed is not None and fixed.get("records_per_s"):
        judge(
            "assured exactly-once >= 0.95 x its fixed-interval commits",
            eos["records_per_s"] / fixed["records_per_s"],
            lambda v: v >= 0.95,
            "{:.2f} x",
        )
    if backend == "embedded" and eos is not None:
        judge(
            "embedded exactly-once >= 100,000 records/s",
            eos["records_per_s"],
            lambda v: v >= 100_000,
            "{:,.0f}/s",
        )
    for r in rows:
        if r["run"] == "memory":
            over = f" over {r['records']:,} records" if r.get("records") else ""
            judge(
                f"RSS growth{over} < 50 MB ({r['guarantee']})",
                r.get("rss_growth_mb"),
                lambda v: v < 50,
                "{:.1f} MB",
            )
    return out


def _num(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) else "-"


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("records_per_s", "records/s", "{:,.0f}"),
    ("vs_bare", "x bare", "{:.2f}"),
    ("vs_quixstreams", "x Quix", "{:.2f}"),
    ("p50_ms", "p50 ms", "{:.1f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("latency_rate_per_s", "latency load/s", "{:,.0f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.1f}"),
)


def table(rows: Sequence[Row]) -> Table:
    first = rows[0]
    t = Table(
        title=f"runtime on {first['backend']}: {first['records']:,} records of "
        f"{first['record_size']} bytes over {first['partitions']} partitions, "
        f"commit every {first['commit_interval_ms']} ms"
    )
    for name in ("system", "guarantee", "run"):
        t.add_column(name)
    for _, label, _ in _COLUMNS:
        t.add_column(label, justify="right")
    for r in rows:
        t.add_row(
            r["system"], r["guarantee"], r["run"], *(_num(r.get(k), f) for k, _, f in _COLUMNS)
        )
    t.caption = "; ".join(
        f"{label}: {value} ({verdict})" for label, value, verdict in targets(rows)
    )
    return t


_DISCLOSED = (
    "records",
    "record_size",
    "partitions",
    "commit_interval_ms",
    "commit_every",
    "max_poll_records",
    "rounds",
    "producer",
    "isolation",
    "latency_seconds",
    "latency_warmup_s",
    "memory_records",
    "memory_guarantee",
)
_VERSIONS = (
    "assured_version",
    "confluent_kafka_version",
    "librdkafka_version",
    "quixstreams_version",
    "quixstreams_librdkafka_version",
    "python_version",
    "sqlite_version",
    "cpu_count",
    "memory_gib",
    "platform",
)


def markdown(rows: Sequence[Row], command: str) -> str:
    first = rows[0]
    head = ["system", "guarantee", "run", *(label for _, label, _ in _COLUMNS)]
    lines = [
        f"# Runtime benchmark: {first['backend']}",
        "",
        f"Consume, upper-case the value, produce with the same key; made by `{command}`.",
        "Throughput from each processor's first record to the end of its run (flushed, "
        "committed, closed); latency end to end (send stamp to a read_committed reader) at half "
        "that processor's measured rate; peak RSS is the kernel's high-water mark (VmHWM).",
        *(
            [
                "On the embedded engine, *bare* is the same two loops written against the "
                "`assured.log` API: what the engine allows with no runtime on top."
            ]
            if first["backend"] == "embedded"
            else []
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * len(_COLUMNS)) + "|",
    ]
    for r in rows:
        cells = [
            r["system"],
            r["guarantee"],
            r["run"],
            *(_num(r.get(k), f) for k, _, f in _COLUMNS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Every throughput run, records/s (the table shows the median run):", ""]
    lines += [
        f"- {r['system']} {r['guarantee']} ({r['run']}): "
        + ", ".join(f"{v:,.0f}" for v in r.get("runs_per_s", []))
        for r in rows
    ]
    lines += ["", "| target | measured | verdict |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in targets(rows)]
    lines += ["", "Settings: " + "; ".join(f"{k} {first.get(k)}" for k in _DISCLOSED) + "."]
    lines += [
        "",
        "Versions and machine: "
        + "; ".join(f"{k} {first[k]}" for k in _VERSIONS if first.get(k) is not None)
        + ".",
    ]
    loads = ", ".join(f"{r['system']}/{r['guarantee']} {r.get('load_avg_1m')}" for r in rows)
    lines += [
        "",
        f"1-minute load average as each row was written (other work skews the numbers): {loads}.",
    ]
    return "\n".join(lines) + "\n"


def write(out: Path, backend: str, rows: Sequence[Row], command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, text in (
        (out / f"runtime-{backend}.json", json.dumps(list(rows), indent=2) + "\n"),
        (out / f"runtime-{backend}.md", markdown(rows, command)),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written
