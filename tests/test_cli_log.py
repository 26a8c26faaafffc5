"""The log CLI driven as a user drives it (subprocesses), on both backends; on Kafka, round
trips with kcat agree byte for byte."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

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
