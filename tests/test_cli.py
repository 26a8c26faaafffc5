"""The command a user types, run as a user runs it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from assured.cli import app

BIN = Path(sys.executable).parent / "assured"


def run(
    *args: str, cwd: Path | None = None, timeout: float = 120, tmp: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TMPDIR=str(tmp)) if tmp is not None else None
    return subprocess.run(
        [str(BIN), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=env,
    )


def test_help_lists_the_commands_and_the_exit_codes() -> None:
    done = run("--help")
    assert done.returncode == 0
    for command in ("demo", "audit", "bench"):
        assert command in done.stdout
    said = " ".join(done.stdout.replace("│", " ").split())
    assert "Exit codes: 0 done; 1 the log or its data failed" in said
    assert "2 the command is wrong" in said


def test_demo_shows_each_guarantee_holding_under_crashes(tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    done = run("demo", "--messages", "600", "--kills", "4", cwd=tmp_path, timeout=300, tmp=temp)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(temp.iterdir()) == [], "the demo's work folder was left behind"
    out = done.stdout
    assert "payments under crashes" in out
    report = json.loads((tmp_path / "assured-demo-report" / "audit.json").read_text())
    by = {row["guarantee"]: row for row in report}
    assert set(by) == {"at-most-once", "at-least-once", "exactly-once"}
    assert by["at-most-once"]["lost"] > 0
    assert by["at-most-once"]["duplicated"] == 0
    assert by["at-least-once"]["lost"] == 0
    assert by["at-least-once"]["duplicated"] > 0
    assert by["exactly-once"]["lost"] == by["exactly-once"]["duplicated"] == 0
    for row in report:  # every planned crash landed mid-stream, half SIGKILLs, half crash points
        assert row["faults"] == {"sigkill": 2, "crash-points": 2}, row["guarantee"]
    assert f"at-most-once: {by['at-most-once']['lost']} charges lost, none charged twice." in out
    assert "exactly-once: no charges lost, none charged twice." in out
    assert (tmp_path / "assured-demo-report" / "audit.png").stat().st_size > 10_000


def test_bad_flag_is_a_usage_error_without_traceback() -> None:
    done = run("audit", "--guarantee", "twice")
    assert done.returncode == 2
    assert "twice" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    done = run("audit", "--faults", "meteor")
    assert done.returncode == 2
    assert "unknown fault" in done.stderr


def test_audit_checks_every_option_before_it_runs(tmp_path: Path) -> None:
    """A bad option after good ones, or a report path that is a file, is said at once: one
    line, no progress bar, no audit run first."""
    report = tmp_path / "report"
    report.write_text("an earlier report, kept\n")
    for args, says in (
        (["--sink", "carrier-pigeon"], "sink 'carrier-pigeon'"),
        (["--messages", "50", "--report", str(report)], "a file is there"),
        (["--faults", "sigkill,meteor"], "unknown fault(s) meteor"),
    ):
        result = CliRunner().invoke(app, ["audit", *args])
        assert result.exit_code == 2, args
        assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
        assert says in result.stderr
    assert report.read_text() == "an earlier report, kept\n"


def test_the_audit_leaves_the_kafka_clients_logger_as_it_found_it() -> None:
    """`assured audit` quiets the Kafka client's logger (brokers die on purpose there) for its
    own run only. Called in-process, it left that logger at CRITICAL for the rest of the
    process: a later test's consumer warnings never reached it."""
    kafka_log = logging.getLogger("assured.log.kafka")
    before = kafka_log.level
    kafka_log.setLevel(logging.INFO)
    try:
        result = CliRunner().invoke(app, ["audit", "--faults", "meteor"])
        assert result.exit_code == 2
        assert kafka_log.level == logging.INFO
    finally:
        kafka_log.setLevel(before)


@pytest.mark.parametrize("keep", [False, True])
def test_audit_cleans_up_its_work_folder_unless_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = ["audit", "--guarantee", "at-most-once", "--messages", "20", "--kills", "0"]
    result = CliRunner().invoke(app, [*args, "--processes", "1", *(["--keep"] * keep)])
    assert result.exit_code == 0, result.stderr
    left = [p.name for p in tmp_path.iterdir()]
    if keep:
        assert len(left) == 1
        assert left[0].startswith("assured-audit-")
        assert (tmp_path / left[0] / "audit.db").exists()
        assert f"kept in {tmp_path / left[0]}" in result.stderr
    else:
        assert left == []
