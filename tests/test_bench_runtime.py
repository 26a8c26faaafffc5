"""The runtime benchmark runs end to end, on both backends, and reports every number it
promises; how fast is judged in its output, never here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from assured.bench.runtime_suite import (
    RuntimeBenchConfig,
    _MachineCpu,
    _spread,
    run_runtime_suite,
)

BIN = Path(sys.executable).parent / "assured"
QUIX_PYTHON = Path(__file__).resolve().parents[1] / ".venv-quix" / "bin" / "python"
KEYS = ("system", "guarantee", "backend", "records_per_s", "p50_ms", "p99_ms", "peak_rss_mb")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, timeout=600, check=False, cwd=cwd
    )


def check_rows(rows: list[dict[str, Any]], backend: str, records: int) -> None:
    for row in rows:
        for key in KEYS:
            assert key in row, key
        assert row["backend"] == backend
        assert row["records_per_s"] > 0
        assert 20 < row["peak_rss_mb"] < 2000  # a real measurement of a Python process
        assert row["commit_interval_ms"] == 100
        # The process's own CPU over the measured window: more than nothing, less than the
        # two cores of the machine could give it.
        assert row["cpu_us_per_record"] > 0
        assert 0 < row["cpu_cores"] <= (os.cpu_count() or 1) * 1.05
        assert row["cpu_us_per_record"] == pytest.approx(
            row["cpu_cores"] * 1e6 / row["records_per_s"], rel=0.05, abs=0.5
        )
        if row["run"] == "throughput":
            assert isinstance(row["steady"], bool)
            assert row["steady"] == (row["spread"] <= 0.15 and row["others_cores_max"] <= 0.25)
            assert len(row["runs_cpu_us_per_record"]) == len(row["runs_per_s"])
            assert row["records"] == records
            # Every stamped record sent at half load came through and was timed.
            assert row["latency_samples"] == row["latency_sent"] > 0
            assert 0 < row["p50_ms"] <= row["p99_ms"]
        else:
            assert row["run"] == "memory"
            assert row["rss_growth_mb"] == pytest.approx(
                row["peak_rss_mb"] - row["rss_warm_mb"], abs=0.11
            )


@pytest.mark.slow  # 50 s; `make bench` runs the path in full; make test keeps the io suite's CLI
def test_cli_runs_the_runtime_suite_on_the_embedded_engine(tmp_path: Path) -> None:
    done = run(
        "bench",
        "--suite",
        "runtime",
        "--log",
        f"embedded://{tmp_path}/files",
        "--records",
        "3000",
        "--latency-seconds",
        "0.5",
        "--memory-records",
        "6000",
        "--rounds",
        "2",
        "--retries",  # a busy test machine must not triple the test's time
        "0",
        "--json",
        "--results-dir",
        str(tmp_path / "results"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    seen = [(r["system"], r["guarantee"], r["run"]) for r in rows]
    assert seen == [
        ("bare", "at-least-once", "throughput"),  # bare: the assured.log API, no runtime
        ("assured", "at-least-once", "throughput"),
        ("bare", "exactly-once", "throughput"),
        ("assured", "exactly-once", "throughput"),
        # exactly-once's fixed-interval commits, the adaptive commit's baseline in the same run
        ("assured-fixed", "exactly-once", "throughput"),
        ("assured", "at-most-once", "throughput"),
        ("assured", "exactly-once", "memory"),
    ]
    check_rows(rows[:6], "embedded", 3000)
    for row in rows[:6]:  # two runs each; the one reported is one of them
        assert len(row["runs_per_s"]) == 2
        assert row["records_per_s"] in row["runs_per_s"]
    check_rows(rows[6:], "embedded", 6000)
    assert rows[1]["vs_bare"] == pytest.approx(
        rows[1]["records_per_s"] / rows[0]["records_per_s"], rel=1e-2
    )
    assert rows[3]["vs_assured-fixed"] == pytest.approx(
        rows[3]["records_per_s"] / rows[4]["records_per_s"], rel=1e-2
    )
    # What a commit costs, counted by the App's own metrics in the latency run: exactly-once
    # latency at half load is a few of these.
    for mine in (rows[1], rows[3], rows[4]):
        assert mine["latency_commits"] > 0
        assert mine["latency_commit_ms_mean"] > 0
    assert rows[0]["latency_commit_ms_mean"] is None  # the bare loop has no App to count
    assert json.loads((tmp_path / "results" / "runtime-embedded.json").read_text()) == rows
    table = (tmp_path / "results" / "runtime-embedded.md").read_text()
    assert "embedded exactly-once >= 100,000 records/s" in table
    # The adaptive commit's targets (issue 16), judged from rows of the same run.
    assert "assured exactly-once p50 <= 2 x at-least-once's" in table
    assert "assured exactly-once p99 <= 3 x at-least-once's" in table
    assert "assured exactly-once >= 0.95 x its fixed-interval commits" in table
    assert list((tmp_path / "files").iterdir()) == []  # the run's engine files are gone


@pytest.mark.slow  # 45 s; `make bench` runs this path in full, the embedded test covers the CLI
@pytest.mark.kafka
def test_runtime_suite_on_a_real_broker_with_bare_loops_and_quix(kafka_bootstrap: str) -> None:
    assert QUIX_PYTHON.exists(), "make test builds .venv-quix (make quix-venv)"
    rows = run_runtime_suite(
        RuntimeBenchConfig(
            log=f"kafka://{kafka_bootstrap}",
            records=4000,
            latency_seconds=1.0,
            latency_warmup_s=0.5,
            latency_idle_s=1.5,
            memory_records=0,
            quix_python=str(QUIX_PYTHON),
            systems=["bare", "assured", "quixstreams"],  # the fixed baseline: the embedded test
            rounds=1,
            retries=0,
        )
    )
    seen = [(r["system"], r["guarantee"]) for r in rows]
    assert seen == [
        ("bare", "at-least-once"),
        ("assured", "at-least-once"),
        ("quixstreams", "at-least-once"),
        ("bare", "exactly-once"),
        ("assured", "exactly-once"),
        ("quixstreams", "exactly-once"),
        ("assured", "at-most-once"),
    ]
    check_rows(rows, "kafka", 4000)
    by = {(r["system"], r["guarantee"]): r for r in rows}
    for guarantee in ("at-least-once", "exactly-once"):
        mine = by[("assured", guarantee)]
        for other in ("bare", "quixstreams"):
            expected = mine["records_per_s"] / by[(other, guarantee)]["records_per_s"]
            assert mine[f"vs_{other}"] == pytest.approx(expected, rel=1e-2)
    assert rows[0]["quixstreams_version"]  # what was measured is disclosed
    assert rows[0]["librdkafka_version"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--log", "http://localhost:9092"], "kafka://HOST:PORT or embedded:///FOLDER"),
        (["--log", "embedded:///tmp/x", "--systems", "assured,flink"], "--systems"),
        (["--log", "kafka://127.0.0.1:1"], "quix_python"),
    ],
)
def test_runtime_suite_bad_input_is_a_usage_error(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = run("bench", "--suite", "runtime", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "benchmarks").exists()


def test_other_processes_cpu_is_seen_and_ours_is_not() -> None:
    """A process spinning beside the bench is "others" (it would make a run worthless); work
    done by this process and by its reaped children is not."""
    before = _MachineCpu.now()
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time() + 1.5\nwhile time.time() < t: pass"]
    )
    _, _, usage = os.wait4(spinner.pid, 0)  # reaped: its CPU is now our children's
    spinner.returncode = 0
    after_reaped = _MachineCpu.now()
    assert after_reaped.ours_s - before.ours_s >= 0.95 * (usage.ru_utime + usage.ru_stime)
    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time() + 1.5\nwhile time.time() < t: pass"]
    )
    start = _MachineCpu.now()
    stat = Path(f"/proc/{stranger.pid}/stat")
    ticks = os.sysconf("SC_CLK_TCK")

    def spent() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    spun0 = spent()
    end = start
    while stranger.poll() is None:
        try:
            spun = spent()
        except OSError:
            break
        end = _MachineCpu.now()
        time.sleep(0.1)
    stranger.wait()
    share = (spun - spun0) / (end.at - start.at)
    assert share > 0.05  # it did spin (on a busy machine, with a share of a core)
    assert end.others_since(start) >= 0.8 * share


def test_spread_is_range_over_median() -> None:
    rates = [{"records_per_s": r} for r in (100.0, 110.0, 130.0)]
    assert _spread(rates) == pytest.approx(30 / 110)
    assert _spread(rates[:1]) == 0.0


@pytest.mark.kafka
def test_the_latency_floor_loop_is_exactly_once_and_commits_in_turns(kafka_bootstrap: str) -> None:
    """bare-pipelined, the floor under exactly-once's latency, is only a floor if it is
    exactly-once: every input record's output once, read_committed, in several transactions
    (taken in turns by its two producers); and it is a Kafka system only."""
    from assured.bench.runtime_suite import System, _Bench, _produce_input, _throughput, systems_for
    from assured.log import open_log

    records = 6000
    config = RuntimeBenchConfig(log=f"kafka://{kafka_bootstrap}", records=records, retries=0)
    bench = _Bench(config)
    log = open_log(config.log)
    try:
        source = bench.topic(log, "floor-in")
        _produce_input(log, source, records, config.record_size)
        result = _throughput(
            bench, log, config.log, source, System("bare-pipelined", "exactly-once"), records
        )
        assert result["processed"] == records
        assert result["commits"] >= 2
        sink = next(t for t in bench.topics if t.endswith("out-bare-pipelined-exactly-once"))
        keys: list[bytes] = []
        with log.consumer(group_id=f"{sink}-check", isolation="read_committed") as consumer:
            consumer.subscribe([sink])
            deadline = time.monotonic() + 60
            while len(keys) < records and time.monotonic() < deadline:
                keys += [r.key or b"" for r in consumer.poll(1000, 0.5)]
            time.sleep(1)
            keys += [r.key or b"" for r in consumer.poll(1000, 0.5)]
        assert sorted(keys) == sorted(b"%08d" % i for i in range(records))
    finally:
        bench.cleanup([log])
    embedded = RuntimeBenchConfig(log="embedded:///tmp/x", systems=["assured", "bare-pipelined"])
    assert System("bare-pipelined", "exactly-once") not in systems_for(embedded)
