"""The log benchmark runs end to end and reports every number; how fast is judged in its output,
never here (timing thresholds in unit tests only make them flaky)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from assured.bench import run_log_suite

BIN = Path(sys.executable).parent / "assured"

RATES = (
    "produce_per_s",
    "consume_per_s",
    "txn_produce_per_s",
    "sqlite_raw_per_s",
    "sqlite_raw_select_per_s",
)
LATENCIES = ("wake_latency_ms_p50", "wake_latency_ms_p99")
FACTS = ("cpu_count", "python_version", "sqlite_version", "platform")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def check_result(result: dict[str, object], durability: str, records: int) -> None:
    for key in (*RATES, "produce_vs_raw", "consume_vs_raw_select", *LATENCIES):
        value = result[key]
        assert isinstance(value, float), key
        assert value > 0, key
    passes = result["consume_passes_per_s"]
    assert isinstance(passes, list)
    assert len(passes) == 5
    assert sorted(passes)[2] == result["consume_per_s"]  # the median of the passes
    # A blocked consumer may honestly use next to no CPU; the number must exist, not be > 0.
    idle = result["idle_cpu_percent"]
    assert isinstance(idle, float)
    assert idle >= 0
    assert result["durability"] == durability
    assert result["records"] == records
    assert result["batch"] == 1000
    assert result["record_size"] == 100
    samples = result["wake_samples"]
    assert isinstance(samples, int)
    assert samples > 0
    for fact in FACTS:
        assert result[fact], fact


def test_tiny_suite_reports_every_number_and_cleans_up(tmp_path: Path) -> None:
    result = run_log_suite(
        tmp_path, records=5000, durability="full", idle_seconds=1.0, wake_samples=10
    )
    check_result(result, "full", 5000)
    assert result["wake_samples"] == 10
    assert list(tmp_path.iterdir()) == []  # the engine files and the baseline's are gone


def test_cli_runs_the_suite_and_writes_the_results(tmp_path: Path) -> None:
    done = run(
        "bench",
        "--suite",
        "log",
        "--log",
        f"embedded://{tmp_path}/files",
        "--records",
        "2000",
        "--durability",
        "normal",
        "--json",
        "--results-dir",
        str(tmp_path / "results"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert isinstance(results, list)
    assert len(results) == 1
    check_result(results[0], "normal", 2000)
    written = json.loads((tmp_path / "results" / "log-embedded.json").read_text())
    assert written == results
    table = (tmp_path / "results" / "log-embedded.md").read_text()
    assert "| produce / plain sqlite3 |" in table
    assert "durability=normal" in table


def test_unknown_suite_is_a_usage_error_without_traceback(tmp_path: Path) -> None:
    done = run("bench", "--suite", "nope", cwd=tmp_path)
    assert done.returncode == 2
    assert "unknown suite 'nope'" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "benchmarks").exists()  # nothing ran, nothing written


def test_non_embedded_log_is_a_usage_error_without_traceback(tmp_path: Path) -> None:
    done = run("bench", "--log", "kafka://localhost:9092", cwd=tmp_path)
    assert done.returncode == 2
    assert "embedded engine only" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_bad_durability_is_a_usage_error(tmp_path: Path) -> None:
    done = run("bench", "--durability", "sometimes", cwd=tmp_path)
    assert done.returncode == 2
    assert "--durability 'sometimes'" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
