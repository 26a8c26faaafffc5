"""Several independent runs of the runtime bench, as one set of figures that reproduces: per
system and guarantee, the median over the runs with its range, every ratio computed from those
medians (never from one lucky run), and runs that were not steady (a busy machine, rounds that
disagreed) left out and counted.

python -m assured.bench.combine RUN.json [RUN.json ...] --out benchmarks/results/runtime-kafka
writes ``runtime-kafka.json`` (the combined rows, each with ``runs`` and ``from_files``) and
``runtime-kafka.md`` (the table the README quotes).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from assured.bench.runtime_suite import peer_ratios

__all__ = ["FIGURES", "combine", "main", "markdown"]

Row = dict[str, Any]
# What is combined: the median over the runs, with the lowest and the highest.
FIGURES = (
    "records_per_s", "cpu_us_per_record", "p50_ms", "p99_ms", "peak_rss_mb", "rss_growth_mb",
    "latency_commit_ms_mean",
)  # fmt: skip
_LABELS = {
    ("bare", "kafka"): "bare confluent-kafka loop",
    ("bare", "embedded"): "bare loop over `assured.log`",
    ("quixstreams", "kafka"): "Quix Streams",
    ("assured", "kafka"): "assured",
    ("assured", "embedded"): "assured",
    ("assured-fixed", "kafka"): "assured, fixed-interval commits (baseline)",
    ("assured-fixed", "embedded"): "assured, fixed-interval commits (baseline)",
    ("bare-pipelined", "kafka"): "bare loop built for exactly-once latency (floor)",
}


def combine(runs: Sequence[Sequence[Row]], min_runs: int = 3) -> list[Row]:
    """One row per (system, guarantee, run kind) over every run that has it. A row measured while
    the machine was busy or with rounds that disagreed (``steady`` false) is left out; a
    combined row from fewer than ``min_runs`` steady runs says so (``enough_runs`` false)."""
    order: list[tuple[str, str, str]] = []
    groups: dict[tuple[str, str, str], list[Row]] = {}
    left_out: dict[tuple[str, str, str], int] = {}
    backends = {row["backend"] for run in runs for row in run}
    if len(backends) > 1:
        raise ValueError(f"runs of different backends cannot be combined: {sorted(backends)}")
    for run in runs:
        for row in run:
            key = (row["system"], row["guarantee"], row.get("run", "throughput"))
            if key not in groups:
                order.append(key)
                groups[key], left_out[key] = [], 0
            if row.get("steady", True) is False:
                left_out[key] += 1
            else:
                groups[key].append(row)
    out: list[Row] = []
    for key in order:
        rows = groups[key]
        system, guarantee, kind = key
        combined: Row = {
            "system": system,
            "guarantee": guarantee,
            "run": kind,
            "backend": next(iter(backends)),
            "runs": len(rows),
            "unsteady_runs_left_out": left_out[key],
            "enough_runs": len(rows) >= min_runs,
        }
        for name in FIGURES:
            values = [float(r[name]) for r in rows if r.get(name) is not None]
            if values:
                combined[name] = round(statistics.median(values), 2)
                combined[f"{name}_range"] = [min(values), max(values)]
        if rows and rows[0].get("records") is not None:  # what each run measured over
            combined["records"] = max(int(r["records"]) for r in rows)
        for name in ("assured_version", "librdkafka_version", "quixstreams_version", "cpu"):
            seen = {str(r[name]) for r in rows if r.get(name) is not None}
            if seen:
                combined[name] = ", ".join(sorted(seen))
        out.append(combined)
    peer_ratios(out, digits=2)
    return out


def _k(value: float) -> str:
    return f"{value / 1000:.0f}k" if value >= 10_000 else f"{value / 1000:.1f}k"


def _with_range(row: Row, name: str, fmt: Callable[[float], str]) -> str:
    if name not in row:
        return ""
    low, high = row[f"{name}_range"]
    if low == high:
        return fmt(row[name])
    return f"{fmt(row[name])} ({fmt(low)}-{fmt(high)})"


def markdown(rows: Sequence[Row], command: str) -> str:
    """The table the README quotes: medians, ranges in brackets, ratios from the medians."""
    backend = rows[0]["backend"] if rows else "?"
    runs = max((r["runs"] for r in rows), default=0)
    lines = [
        f"# Runtime bench, {backend}: the median of {runs} independent runs (range in brackets)",
        "",
        f"`{command}`",
        "",
        "| system | guarantee | records/s | x bare | x Quix | CPU us/record | CPU x bare | "
        "p50 / p99 ms | peak RSS MB | runs (left out) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["run"] != "throughput":
            continue
        label = _LABELS.get((r["system"], backend), r["system"])
        latency = (
            f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f}" if "p50_ms" in r and "p99_ms" in r else ""
        )
        note = "" if r["enough_runs"] else " (too few)"
        lines.append(
            f"| {label} | {r['guarantee']} | {_with_range(r, 'records_per_s', _k)} | "
            f"{r.get('vs_bare', '')} | {r.get('vs_quixstreams', '')} | "
            f"{_with_range(r, 'cpu_us_per_record', lambda v: f'{v:.1f}')} | "
            f"{r.get('cpu_vs_bare', '')} | {latency} | "
            f"{_with_range(r, 'peak_rss_mb', lambda v: f'{v:.0f}')} | "
            f"{r['runs']} ({r['unsteady_runs_left_out']}){note} |"
        )
    from assured.cli._bench_runtime import targets  # here: assured.cli loads the whole CLI

    judged = targets(rows)
    if judged:
        lines += ["", "| target (from the medians) | measured | verdict |", "|---|---:|---|"]
        lines += [f"| {label} | {value} | {verdict} |" for label, value, verdict in judged]
    for r in rows:
        if r["system"] == "assured" and r.get("latency_commit_ms_mean") is not None:
            lines += [
                "",
                f"assured {r['guarantee']}: a commit took "
                f"{_with_range(r, 'latency_commit_ms_mean', lambda v: f'{v:.1f}')} ms on average "
                "in the latency run (median of the runs' means).",
            ]
        if r["run"] == "memory":
            lines += [
                "",
                f"Memory: {r['guarantee']} over a long run grew "
                f"{_with_range(r, 'rss_growth_mb', lambda v: f'{v:.1f}')} MB after its first "
                f"tenth (median of {r['runs']}).",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m assured.bench.combine")
    parser.add_argument("runs", nargs="+", type=Path, help="runtime-<backend>.json of each run")
    parser.add_argument("--out", type=Path, required=True, help="path without suffix")
    parser.add_argument("--min-runs", type=int, default=3)
    parser.add_argument("--command", default="make bench")
    args = parser.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in args.runs]
    rows = combine(runs, args.min_runs)
    for row in rows:
        row["from_files"] = [str(p) for p in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, args.command))
    print(markdown(rows, args.command))
    return 0 if all(r["enough_runs"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
