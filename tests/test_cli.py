"""The command a user types, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent / "assured"


def run(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )


def test_help_lists_the_commands() -> None:
    done = run("--help")
    assert done.returncode == 0
    for command in ("demo", "audit", "bench"):
        assert command in done.stdout


def test_demo_shows_each_guarantee_holding_under_crashes(tmp_path: Path) -> None:
    done = run("demo", "--messages", "600", "--kills", "4", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
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
