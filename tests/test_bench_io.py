"""The io bench (issue 14): handlers that wait, side by side, against a bare asyncio loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assured.bench.io_suite import IoBenchConfig, judge, run_io_suite
from tests.test_cli import run


def test_cli_runs_the_io_suite_on_the_embedded_engine(tmp_path: Path) -> None:
    done = run(
        "bench", "--suite", "io", "--log", f"embedded://{tmp_path}/files", "--records", "400",
        "--concurrency", "20", "--handler-ms", "5", "--json",
        "--results-dir", str(tmp_path / "results"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["system"], r["guarantee"], r["concurrency"]) for r in rows] == [
        ("bare", "none", 20),
        *(("assured", g, 20) for g in ("at-most-once", "at-least-once", "exactly-once")),
    ]
    for r in rows:
        assert r["sink"] == "topic"
        assert r["log"] == "embedded"
        assert r["records_per_s"] > 0
        assert r["p50_ms"] >= 5
        assert r["p99_ms"] >= r["p50_ms"]
        # concurrency 20 at 5 ms: 4,000/s at most; a run of 15 s of that, capped by --records
        assert r["records"] == min(400, max(300, int(r["ceiling_per_s"] * 15)))
        if r["system"] == "assured":
            bare = next(
                b for b in rows if b["system"] == "bare" and b["concurrency"] == r["concurrency"]
            )
            assert r["vs_bare"] == pytest.approx(
                r["records_per_s"] / bare["records_per_s"], rel=1e-2
            )
    assert json.loads((tmp_path / "results" / "io-embedded.json").read_text()) == rows
    table = (tmp_path / "results" / "io-embedded.md").read_text()
    assert "| assured | exactly-once | topic | 20 |" in table
    assert list((tmp_path / "files").iterdir()) == []  # the run's engine files are gone


def test_bad_io_options_are_refused_in_one_line(tmp_path: Path) -> None:
    for args, said in (
        (["--concurrency", "0,5"], "--concurrency '0,5'"),
        (["--concurrency", "many"], "--concurrency 'many'"),
        (["--log", "kafkaa://x:1"], "the io suite runs on"),
        (["--faststream-python", "/no/such/python"], "no such program"),
        (["--faststream-python", "python3"], "FastStream runs on Kafka only"),
    ):
        argv = ["bench", "--suite", "io", "--log", f"embedded://{tmp_path}", *args]
        done = run(*argv, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert said in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_targets_are_judged_from_rows_of_one_run() -> None:
    rows = [
        {"system": "assured", "guarantee": "at-least-once", "concurrency": 200,
         "records_per_s": 6000.0, "vs_bare": 0.9},
        {"system": "assured", "guarantee": "exactly-once", "concurrency": 200,
         "records_per_s": 3000.0, "vs_bare": 0.5},
    ]  # fmt: skip
    rows += [
        {"system": "assured", "guarantee": "exactly-once", "sink": "sqlite", "concurrency": 200,
         "records_per_s": 5200.0, "vs_bare": 0.81},
    ]  # fmt: skip
    verdicts = {t: v for t, _, v in judge(rows)}
    assert (
        verdicts["assured at-least-once into topic, concurrency 200: >= 5,000 records/s"] == "met"
    )
    assert (
        verdicts["assured at-least-once into topic, concurrency 200: >= 0.8 x the bare loop"]
        == "met"
    )
    assert (
        verdicts["assured exactly-once into topic, concurrency 200: >= 4,000 records/s"] == "MISSED"
    )
    assert (
        verdicts["assured exactly-once into topic, concurrency 200: >= 0.8 x the bare loop"]
        == "MISSED"
    )
    assert (
        verdicts["assured exactly-once into sqlite, concurrency 200: >= 5,000 records/s"] == "met"
    )
    # rows that are not there are not judged (no postgres row: no postgres verdict)
    assert not any("postgres" in t for t in verdicts)


@pytest.mark.slow  # 11 s; the io CLI into topics and its rows into databases run by default
def test_cli_runs_the_io_suite_into_databases(tmp_path: Path, postgres_dsn: str) -> None:
    """The handler writes a row instead of an output; a reader of the database takes the
    latency; every record must leave exactly one row (the run fails otherwise)."""
    done = run(
        "bench", "--suite", "io", "--log", f"embedded://{tmp_path}/files", "--records", "300",
        "--concurrency", "20", "--handler-ms", "5", "--sinks", "sqlite,postgres",
        "--postgres-dsn", postgres_dsn, "--json", "--results-dir", str(tmp_path / "results"),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["system"], r["sink"], r["guarantee"]) for r in rows] == [
        ("bare", "topic", "none"),
        ("bare", "postgres", "none"),  # the same rows, each committed on its own
        *(("assured", s, g) for s in ("sqlite", "postgres")
          for g in ("at-most-once", "at-least-once", "exactly-once")),
    ]  # fmt: skip
    for r in rows[1:]:
        assert r["records"] == 300
        assert r["p50_ms"] >= 5  # the handler's own wait, then the commit
        assert r["p99_ms"] >= r["p50_ms"]
        assert r["vs_bare"] > 0
    bare_rows = rows[1]["records_per_s"]
    for r in rows[2:]:  # beside the bare loop into the same database, where there is one
        if r["sink"] == "postgres":
            assert r["vs_bare_sink"] == round(r["records_per_s"] / bare_rows, 3)
        else:
            assert "vs_bare_sink" not in r
    bad = run("bench", "--suite", "io", "--log", f"embedded://{tmp_path}", "--sinks", "mongo",
              cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2
    assert "--sinks 'mongo'" in bad.stderr


FASTSTREAM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-faststream" / "bin" / "python"


@pytest.mark.slow  # make bench-io runs it in full
@pytest.mark.kafka
def test_io_suite_on_a_real_broker_beside_faststream(kafka_bootstrap: str) -> None:
    assert FASTSTREAM_PYTHON.exists(), "make bench-io builds .venv-faststream"
    rows = run_io_suite(
        IoBenchConfig(
            log=f"kafka://{kafka_bootstrap}", records=400, handler_ms=5, concurrency=[20],
            guarantees=["exactly-once"], faststream_python=str(FASTSTREAM_PYTHON),
        )
    )  # fmt: skip
    assert [(r["system"], r["guarantee"], r["concurrency"]) for r in rows] == [
        ("faststream", "ack-first", 20),
        ("bare", "none", 20),
        ("assured", "exactly-once", 20),
    ]
    assert all(r["records"] == 400 and r["p99_ms"] >= 5 for r in rows)
    assert rows[0]["faststream_version"]  # what was measured is disclosed
    fast, bare = rows[0], rows[1]
    assert fast["vs_bare"] == pytest.approx(fast["records_per_s"] / bare["records_per_s"], rel=1e-2)
