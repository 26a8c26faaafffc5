"""Combining independent bench runs: medians with ranges, ratios from the medians, unsteady runs
left out and counted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from assured.bench.combine import combine, main


def row(system: str, guarantee: str, rate: float, cpu: float, **extra: Any) -> dict[str, Any]:
    return {
        "system": system,
        "guarantee": guarantee,
        "run": "throughput",
        "backend": "kafka",
        "records_per_s": rate,
        "cpu_us_per_record": cpu,
        "p50_ms": 10.0,
        "p99_ms": 40.0,
        "peak_rss_mb": 120.0,
        "steady": True,
        **extra,
    }


def runs() -> list[list[dict[str, Any]]]:
    # Run 2 is the bare loop's lucky one and assured's unlucky one: a ratio from any single
    # run would say 0.5 or 1.5; the medians say 1.0.
    rates = [(100_000, 100_000), (200_000, 50_000), (90_000, 90_000), (110_000, 110_000)]
    out = []
    for bare, mine in rates:
        out.append(
            [row("bare", "exactly-once", bare, 8.0), row("assured", "exactly-once", mine, 10.0)]
        )
    out[3][1]["steady"] = False  # assured's fourth run was measured on a busy machine
    return out


def test_medians_ranges_and_ratios_from_the_medians() -> None:
    bare, mine = combine(runs())
    assert bare["records_per_s"] == 105_000  # median of 100k, 200k, 90k, 110k
    assert bare["records_per_s_range"] == [90_000, 200_000]
    assert bare["runs"] == 4
    assert mine["runs"] == 3  # the unsteady run is left out ...
    assert mine["unsteady_runs_left_out"] == 1  # ... and counted
    assert mine["records_per_s"] == 90_000  # median of 100k, 50k, 90k
    assert mine["vs_bare"] == pytest.approx(90_000 / 105_000, abs=0.01)
    assert mine["cpu_vs_bare"] == pytest.approx(10 / 8, abs=0.01)
    assert mine["enough_runs"]


def test_too_few_runs_and_mixed_backends_are_said() -> None:
    only_two = combine(runs()[:2])
    assert not any(r["enough_runs"] for r in only_two)
    mixed = runs()
    mixed[0][0]["backend"] = "embedded"
    with pytest.raises(ValueError, match="different backends"):
        combine(mixed)


def test_command_line_writes_json_and_table(tmp_path: Path) -> None:
    files = []
    for i, run in enumerate(runs()):
        run[1]["latency_commit_ms_mean"] = [9.0, 30.0, 11.0, 50.0][i]  # the fourth left out
        memory = row("assured", "exactly-once", 100_000, 9.0, run="memory", records=5_000_000)
        run.append({**memory, "rss_growth_mb": 4.0 + i})
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps(run))
        files.append(str(path))
    assert main([*files, "--out", str(tmp_path / "out" / "runtime-kafka")]) == 0
    rows = json.loads((tmp_path / "out" / "runtime-kafka.json").read_text())
    assert [(r["system"], r["run"]) for r in rows] == [
        ("bare", "throughput"),
        ("assured", "throughput"),
        ("assured", "memory"),
    ]
    table = (tmp_path / "out" / "runtime-kafka.md").read_text()
    assert "| assured | exactly-once | 90k (50k-100k) | 0.86 |" in table
    assert "3 (1)" in table
    # The targets, judged from the medians (the memory row's growth: median of 4, 5, 6, 7).
    assert "| assured exactly-once >= 0.85 x bare | 0.86 x | met |" in table
    assert "| RSS growth over 5,000,000 records < 50 MB (exactly-once) | 5.5 MB | met |" in table
    # What a commit cost in the latency runs: the median of the steady runs' means.
    assert "assured exactly-once: a commit took 11.0 (9.0-30.0) ms on average" in table
    assert "bare exactly-once: a commit" not in table
    assert main([*files[:2], "--out", str(tmp_path / "few")]) == 1  # too few runs: exit 1


def test_the_floor_under_exactly_once_latency_is_judged_beside_assured() -> None:
    """bare-pipelined's latency, over assured at-least-once's, says whether the latency
    targets can be met at all on the machine: judged like assured exactly-once's."""
    from assured.cli._bench_runtime import targets

    rows = [
        row("assured", "at-least-once", 100_000, 5.0, p50_ms=6.0, p99_ms=20.0),
        row("assured", "exactly-once", 100_000, 5.0, p50_ms=13.8, p99_ms=50.0),
        row("bare-pipelined", "exactly-once", 120_000, 2.0, p50_ms=11.4, p99_ms=90.0),
    ]
    judged = {label: (value, verdict) for label, value, verdict in targets(rows)}
    assert judged["assured exactly-once p50 <= 2 x at-least-once's"] == ("2.30 x", "MISSED")
    assert judged["assured exactly-once p99 <= 3 x at-least-once's"] == ("2.50 x", "met")
    floor = "floor: a bare exactly-once loop built for latency,"
    assert judged[f"{floor} p50 <= 2 x at-least-once's"] == ("1.90 x", "met")
    assert judged[f"{floor} p99 <= 3 x at-least-once's"] == ("4.50 x", "MISSED")
