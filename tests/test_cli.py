"""The command a user types, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent / "assured"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_help_lists_the_commands() -> None:
    done = run("--help")
    assert done.returncode == 0
    assert "demo" in done.stdout


def test_demo_says_what_it_runs_and_partitions_like_java() -> None:
    done = run("demo", "--partitions", "4")
    assert done.returncode == 0, done.stderr
    assert "not built yet" in done.stdout  # honest about what is missing
    assert "acct-0042" in done.stdout


def test_bad_flag_is_a_usage_error_without_traceback() -> None:
    done = run("demo", "--partitions", "0")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
