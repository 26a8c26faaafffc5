"""``assured run`` of the README's payments example (tests/apps/payments.py), as a user runs it,
in a process of its own: what it says on a terminal, and as JSON for machines."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from assured import open_log

BIN = Path(sys.executable).parent / "assured"
APPS = Path(__file__).parent / "apps"


def setup_log(tmp_path: Path, charges: int) -> str:
    url = f"embedded://{tmp_path}/pay.db"
    log = open_log(url)
    with log.admin() as admin:
        admin.create_topic("charges", 2)
        admin.create_topic("receipts", 2)
    add_charges(url, charges)
    return url


def add_charges(url: str, n: int, start: int = 0) -> None:
    with open_log(url).producer() as producer:
        for i in range(start, start + n):
            producer.send("charges", json.dumps({"id": i}).encode(), key=f"acct-{i % 7}".encode())
        producer.send("charges", b"not json", key=b"acct-0")  # its dead letter
        producer.flush()


def on_a_terminal(*args: str) -> tuple[int, str]:
    """Run ``assured *args`` from tests/apps with stderr on a pseudo-terminal; its exit code
    and what the terminal showed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [str(BIN), *args], cwd=APPS, stdout=subprocess.DEVNULL, stderr=follower, stdin=None
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal's other end is closed: the process is done
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return proc.wait(timeout=60), shown.decode().replace("\r\n", "\n")


def test_the_payments_example_says_what_it_does_on_a_terminal(tmp_path: Path) -> None:
    url = setup_log(tmp_path, 300)

    code, shown = on_a_terminal(
        "run", "payments:app", "-b", url, "--until-idle", "1", "--progress-every", "0.3"
    )

    assert code == 0, shown
    lines = shown.splitlines()
    assert all(" assured.runtime: " in line for line in lines), shown

    def said(piece: str) -> list[str]:
        return [line for line in lines if piece in line]

    assert said(f"INFO assured.runtime: running exactly-once for group 'payments' on {url} ")
    assert said("assigned charges[0], charges[1]")
    (dead,) = said("WARNING assured.runtime: dead letter: charges[")
    assert "to charges.dlq after 1 attempt(s) of handler charge: DecodeError:" in dead
    assert said("records/s, lag "), "a summary every --progress-every seconds on a terminal"
    assert said("stopped (idle) after ")
    assert "301 record(s) processed" in said("stopped (idle)")[0]
    assert not said("DEBUG"), "commits only at --log-level debug"


def test_json_log_lines_are_one_object_each(tmp_path: Path) -> None:
    url = setup_log(tmp_path, 100)
    done = subprocess.run(
        [str(BIN), "run", "payments:app", "-b", url, "--until-idle", "1", "--log-format", "json",
         "--log-level", "debug", "--progress", "--progress-every", "0.3"],
        cwd=APPS, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    assert lines
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    events = {line.get("event") for line in lines}
    assert {"start", "assigned", "dead_letter", "summary", "commit", "stop"} <= events, events
    (start,) = [line for line in lines if line.get("event") == "start"]
    assert (start["guarantee"], start["group"], start["log"]) == ("exactly-once", "payments", url)
    (dead,) = [line for line in lines if line.get("event") == "dead_letter"]
    assert (dead["topic"], dead["dead_letter_topic"], dead["attempts"]) == (
        "charges",
        "charges.dlq",
        1,
    )
    assert dead["error_type"] == "DecodeError"
    assert isinstance(dead["partition"], int)
    assert isinstance(dead["offset"], int)


def test_run_flags_override_the_apps_own_settings(tmp_path: Path) -> None:
    """The example names /var/lib/pay/log.db and group 'payments'; -b, --group and --guarantee
    replace them (were -b ignored, the run would fail on the missing folder)."""
    url = setup_log(tmp_path, 20)
    done = subprocess.run(
        [str(BIN), "run", "payments:app", "-b", url, "--group", "billing", "--guarantee",
         "at-least-once", "--max-messages", "21", "--log-level", "warning"],
        cwd=APPS, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if "dead letter" not in line] == []
    with open_log(url).admin() as admin:
        assert sum(admin.committed_offsets("billing", ["charges"]).values()) == 21
        assert admin.committed_offsets("payments", ["charges"]) == {}


def test_run_help_explains_every_option() -> None:
    done = subprocess.run(
        [str(BIN), "run", "--help"], capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0
    for flag in ("--log", "-b", "--group", "--guarantee", "--max-messages", "--until-idle",
                 "--log-level", "--log-format", "--progress", "--progress-every"):  # fmt: skip
        assert flag in done.stdout, flag
    text = " ".join(done.stdout.replace("│", " ").split())
    assert "(time spent waiting for the group does not count)" in text
    assert "MODULE:APP" in text
