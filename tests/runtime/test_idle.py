"""``run(until_idle=...)`` after a real crash: the dead member holds the group until its session
expires, and that wait is not idle. Before, a restart right after a SIGKILL stopped "idle"
having processed nothing (exit 0, the backlog untouched)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from assured import App, Message, Output, TopicPartition, open_log
from assured.log import Log
from assured.runtime._settings import Guarantee

APPS = Path(__file__).parent.parent / "apps"
SESSION_MS = 3000
N = 1500


def fill(log: Log, topic: str, partitions: int) -> list[bytes]:
    values = [f"m{i}".encode() for i in range(N)]
    with log.producer() as producer:
        for i, v in enumerate(values):
            producer.send(topic, v, partition=i % partitions)
        producer.flush()
    return values


def read_all(log: Log, topic: str, partitions: int) -> list[bytes]:
    """Every committed value of ``topic``: read until each partition's position reaches its
    last stable offset (20 s at most)."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    got: list[bytes] = []
    with log.consumer(isolation="read_committed") as reader, log.admin() as admin:
        reader.assign(tps)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            got += [r.value or b"" for r in reader.poll(timeout=0.2)]
            if all(reader.position(tp) >= admin.watermarks(tp).lso for tp in tps):
                break
    return got


def committed(log: Log, group: str, topic: str) -> int:
    with log.admin() as admin:
        return sum(admin.committed_offsets(group, [topic]).values())


def crash_a_copier(log: Log, url: str, src: str, out: str, group: str, g: Guarantee) -> None:
    """Start tests/apps/copier.py in a process of its own, let it commit part of ``src``, and
    SIGKILL it: its membership stays in the group until its session times out."""
    env = {
        **os.environ,
        "ASSURED_LOG": url,
        "ASSURED_GROUP": group,
        "ASSURED_GUARANTEE": g,
        "ASSURED_SESSION_TIMEOUT_MS": str(SESSION_MS),
        "ASSURED_TRANSACTION_TIMEOUT_MS": "2000",
        "ASSURED_COMMIT_INTERVAL_MS": "50",
        "COPIER_IN": src,
        "COPIER_OUT": out,
        "COPIER_DELAY_MS": "5",
    }
    proc = subprocess.Popen(
        [sys.executable, str(APPS / "copier.py")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while committed(log, group, src) < 50:
            assert proc.poll() is None, "the copier died by itself"
            assert time.monotonic() < deadline, "the copier committed nothing in 60 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def restart(
    log: Log, src: str, out: str, group: str, g: Guarantee, caplog: pytest.LogCaptureFixture
) -> tuple[int, float]:
    app = App(log=log, group=group, guarantee=g, session_timeout_ms=SESSION_MS)

    @app.handler(src, output=out)
    def copy(msg: Message, o: Output) -> None:
        o.send(msg.value, key=msg.key)

    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="assured.runtime"):
        stats = app.run(until_idle=1)
    assert stats.stopped_by == "idle"
    waiting = [r for r in caplog.records if "waiting for the group" in r.getMessage()]
    assert waiting, "the wait for the dead member's session was said"
    assert "session may take up to 3 s" in waiting[0].getMessage()
    return stats.processed, time.monotonic() - started


def test_a_restart_after_a_sigkill_waits_for_the_group_and_processes_the_backlog(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"embedded://{tmp_path}/log.db"
    log = open_log(url)
    with log.admin() as admin:
        admin.create_topic("in", 2)
        admin.create_topic("out", 2)
    values = fill(log, "in", 2)
    crash_a_copier(log, url, "in", "out", "g", "exactly-once")
    before = committed(log, "g", "in")
    assert 0 < before < N, "the crash left a backlog"

    processed, seconds = restart(log, "in", "out", "g", "exactly-once", caplog)

    assert processed == N - before, "the backlog was processed, not skipped as idle"
    assert committed(log, "g", "in") == N
    assert seconds >= 1.0
    # Exactly once across the crash: the killed copier's open transaction never shows.
    assert sorted(read_all(log, "out", 2)) == sorted(values)


def test_idle_needs_every_assigned_partition_read_to_its_end(tmp_path: Path) -> None:
    """``until_idle=0`` stopped after the first polled batch (nothing came since it); now it
    stops once the positions reach the partitions' ends, the whole backlog handled."""
    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        admin.create_topic("in", 1)
    fill(log, "in", 1)
    app = App(log=log, group="g", max_poll_records=500)
    seen: list[int] = []

    @app.handler("in")
    def handle(msg: Message) -> None:
        seen.append(msg.offset)

    stats = app.run(until_idle=0)
    assert stats.stopped_by == "idle"
    assert sorted(seen) == list(range(N))


@pytest.mark.kafka
def test_on_kafka_a_restart_after_a_sigkill_waits_for_the_group(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.conftest import create_topic

    url = f"kafka://{kafka_bootstrap}"
    log = open_log(url)
    src, out = create_topic(kafka_bootstrap, 2), create_topic(kafka_bootstrap, 2)
    group = f"g-{src}"
    values = fill(log, src, 2)
    crash_a_copier(log, url, src, out, group, "at-least-once")
    before = committed(log, group, src)
    assert 0 < before < N, "the crash left a backlog"

    processed, _ = restart(log, src, out, group, "at-least-once", caplog)

    assert processed >= N - before
    assert committed(log, group, src) == N
    assert set(read_all(log, out, 2)) == set(values), "at least once: nothing lost"
