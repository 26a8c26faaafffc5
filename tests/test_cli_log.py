"""The log CLI driven as a user drives it (subprocesses), on both backends; on Kafka, round
trips with kcat agree byte for byte."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from assured.cli import app
from assured.log import open_log

BIN = str(Path(sys.executable).parent / "assured")
KCAT = shutil.which("kcat") or "kcat"
LINES = "".join(f"acct-{i % 7}:charge-{i:04d}\n" for i in range(1000))


def cli(*args: str, stdin: str | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [BIN, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )
    if ok:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "embedded":
        return f"embedded://{tmp_path}/cli.db"
    return f"kafka://{request.getfixturevalue('kafka_bootstrap')}"


def lag(url: str, group: str) -> int:
    desc = json.loads(cli("group", "describe", group, "-b", url, "--json").stdout)
    return sum(p["lag"] for p in desc["partitions"])


def test_topic_produce_consume_group(url: str) -> None:
    topic = f"cli-{uuid.uuid4().hex[:8]}"
    group = f"g-{uuid.uuid4().hex[:8]}"
    cli("topic", "create", topic, "--partitions", "3", "-b", url)
    assert topic in cli("topic", "list", "-b", url).stdout.split()
    cli(
        "produce",
        "-b",
        url,
        "-t",
        topic,
        "-K",
        ":",
        "-H",
        "origin=cli",
        "-H",
        "batch=7",
        stdin=LINES,
    )
    described = cli("topic", "describe", topic, "-b", url).stdout
    assert "3 partitions" in described

    first = cli(
        "consume",
        "-b",
        url,
        "-t",
        topic,
        "-G",
        group,
        "-o",
        "beginning",
        "-c",
        "400",
        "-f",
        "%k:%s|%h\\n",
    )
    got = first.stdout.splitlines()
    assert len(got) == 400
    assert all(line.endswith("|origin=cli,batch=7") for line in got)
    assert lag(url, group) == 600, "committed what it printed, no more"

    rest = cli(
        "consume", "-b", url, "-t", topic, "-G", group, "-o", "stored", "-e", "-f", "%k:%s\\n"
    )
    everything = sorted(line.split("|")[0] for line in got) + rest.stdout.splitlines()
    assert sorted(everything) == sorted(LINES.splitlines())
    assert lag(url, group) == 0
    assert group in cli("group", "list", "-b", url).stdout.split()

    envelopes = cli("consume", "-b", url, "-t", topic, "-J", "-c", "1").stdout.splitlines()
    envelope = json.loads(envelopes[0])
    assert envelope["topic"] == topic
    assert envelope["headers"] == ["origin", "cli", "batch", "7"]
    cli("topic", "delete", topic, "-b", url)


def test_user_errors_are_one_line_and_exit_2(url: str) -> None:
    for args in (
        ["consume", "-b", url, "-t", "no-such-topic", "-e"],
        ["topic", "create", "bad topic name", "-b", url],
        ["consume", "-b", url, "-t", "x", "--isolation", "dirty"],
        ["topic", "list", "-b", "redis://nowhere"],
        ["run", "not_a_module_anywhere:app"],
    ):
        done = cli(*args, ok=False)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert "error" in done.stderr.lower()


@pytest.mark.kafka
def test_kcat_round_trips_byte_for_byte(kafka_bootstrap: str) -> None:
    url = f"kafka://{kafka_bootstrap}"
    one, two = f"rt-{uuid.uuid4().hex[:8]}", f"rt-{uuid.uuid4().hex[:8]}"
    for topic in (one, two):
        cli("topic", "create", topic, "-b", url)
    cli("produce", "-b", url, "-t", one, "-K", ":", stdin=LINES)
    by_kcat = subprocess.run(
        [KCAT, "-C", "-b", kafka_bootstrap, "-t", one, "-e", "-q", "-f", "%k:%s\n"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert by_kcat == LINES

    subprocess.run(
        [KCAT, "-P", "-b", kafka_bootstrap, "-t", two, "-K", ":"],
        input=LINES,
        text=True,
        timeout=60,
        check=True,
    )
    by_assured = cli("consume", "-b", url, "-t", two, "-e", "-f", "%k:%s\\n").stdout
    assert by_assured == LINES


# -- no silent no-ops (issue 13) ------------------------------------------------------------------


def invoke(*args: str, stdin: bytes = b"") -> Result:
    """The command in-process: stdout and stderr apart, no traceback let through."""
    result = CliRunner().invoke(app, list(args), input=stdin, env={"ASSURED_LOG": None})
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result


def test_readers_never_create_a_log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "typo.db"
    for args in (
        ["consume", "-b", f"embedded://{typo}", "-t", "t", "-e"],
        ["topic", "list", "-b", f"embedded://{typo}"],
        ["topic", "describe", "t", "-b", f"embedded://{typo}"],
        ["group", "list", "-b", f"embedded://{typo}"],
        ["group", "describe", "g", "-b", f"embedded://{typo}"],
        ["produce", "-b", f"embedded://{typo}", "-t", "t"],
        ["topic", "list"],  # the default, ./assured.db
    ):
        result = invoke(*args, stdin=b"a\n")
        assert result.exit_code == 2, args
        assert "does not exist" in result.stderr
        assert "topic create" in result.stderr
        assert list(tmp_path.iterdir()) == [], args
    # embedded:/x once made /x at the root, and '' silently meant ./assured.db
    stray = f"/tmp/assured-typo-{uuid.uuid4().hex}.db"
    for url, says in ((f"embedded:{stray}", "lacks the '//'"), ("", "empty")):
        result = invoke("topic", "create", "t", "-b", url)
        assert result.exit_code == 2
        assert says in result.stderr
    assert not Path(stray).exists()
    assert list(tmp_path.iterdir()) == []
    # a writer makes it; then the readers read it
    assert invoke("topic", "create", "t", "-b", f"embedded://{typo}").exit_code == 0
    assert invoke("topic", "list", "-b", f"embedded://{typo}").stdout.split() == ["t"]


def test_consume_past_the_end_waits_there_as_kcat_does(tmp_path: Path) -> None:
    url = f"embedded://{tmp_path}/x.db"
    cli("topic", "create", "t", "-b", url)
    cli("produce", "-b", url, "-t", "t", stdin="old-1\nold-2\n")

    at_once = invoke("consume", "-b", url, "-t", "t", "-o", "99999", "-e")
    assert at_once.exit_code == 0
    assert at_once.stdout == ""  # not the old records from the beginning
    assert "past the end of t [0] (next offset 2): reading from the end" in at_once.stderr

    waiting = subprocess.Popen(
        [BIN, "consume", "-b", url, "-t", "t", "-o", "99999", "-c", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiting.stderr is not None
        assert "past the end" in waiting.stderr.readline()  # said before it waits
        time.sleep(0.3)
        with open_log(url).producer() as producer:
            producer.send("t", b"new", partition=0)
            producer.flush()
        out, _ = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
    assert out == "new\n"
    assert waiting.returncode == 0


def test_produce_into_a_damaged_file_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    url = f"embedded://{path}"
    cli("topic", "create", "t", "-b", url)
    cli("produce", "-b", url, "-t", "t", stdin="".join(f"{i}\n" for i in range(50)))
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE batches SET data = x'0102' WHERE id = (SELECT max(id) FROM batches)")
    before = path.read_bytes()
    result = invoke("produce", "-b", url, "-t", "t", stdin=b"more\n")
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1
    assert "refusing to write" in result.stderr
    assert "damaged" in result.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]


def test_record_limit_shown_is_the_one_enforced(tmp_path: Path) -> None:
    url = f"embedded://{tmp_path}/x.db"
    assert invoke("topic", "create", "t", "-b", url).exit_code == 0
    shown = invoke("topic", "describe", "t", "-b", url).stdout
    limit = int(shown.split("max.message.bytes=")[1].split()[0])
    assert limit == 1_000_000
    # key "k" + ":" split off by -K, so the record is key + value bytes
    exact = b"k:" + b"v" * (limit - 1) + b"\n"
    assert invoke("produce", "-b", url, "-t", "t", "-K", ":", stdin=exact).exit_code == 0
    over = b"k:" + b"v" * limit + b"\n"
    refused = invoke("produce", "-b", url, "-t", "t", "-K", ":", stdin=over)
    assert refused.exit_code == 2
    assert f"record of {limit + 1} bytes for topic 't' is over the limit of {limit}" in (
        refused.stderr
    )
    got = invoke("consume", "-b", url, "-t", "t", "-e", "-f", "%K %S\\n")
    assert got.stdout == f"1 {limit - 1}\n"  # only the record at the limit


def test_naming_what_does_not_exist_is_exit_2(tmp_path: Path) -> None:
    url = f"embedded://{tmp_path}/x.db"
    cli("topic", "create", "t", "-b", url)
    for args, says in (
        (["group", "describe", "nope", "-b", url], "consumer group 'nope' does not exist"),
        (["topic", "delete", "nope", "-b", url], "topic 'nope' does not exist"),
        (["topic", "describe", "nope", "-b", url], "topic 'nope' does not exist"),
        (["consume", "-t", "t", "-p", "3", "-b", url, "-e"], "there is no partition 3"),
    ):
        result = invoke(*args)
        assert result.exit_code == 2, args
        assert says in result.stderr


def test_help_shows_escapes_not_raw_characters() -> None:
    shown = invoke("produce", "--help").stdout
    assert "[default: \\n]" in shown
    assert "[default: \n]" not in shown
