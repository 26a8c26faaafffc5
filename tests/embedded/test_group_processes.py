"""Consumer groups across real processes: a SIGKILLed member's partitions move to the others
after its session timeout; no committed offset goes backwards; no record is skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from assured.log import TopicPartition, open_log

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 6
RECORDS = 3000


class Worker:
    def __init__(self, url: str, topic: str, group: str, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.embedded._group_worker", url, topic, group, str(out)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.assigned: list[int] = []
        self.events: list[dict[str, object]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            self.events.append(event)
            if event["event"] == "assigned":
                parts = event["partitions"]
                assert isinstance(parts, list)
                self.assigned = [int(p) for p in parts]
            else:
                self.assigned = []

    def processed(self) -> set[tuple[int, int]]:
        if not self.out.exists():
            return set()
        rows = self.out.read_text().split("\n")
        return {(int(p), int(o)) for p, o in (r.split() for r in rows if r.strip())}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def wait_for(condition: object, timeout: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("members", [2, 4])
def test_sigkilled_member_partitions_move_and_nothing_is_skipped(
    tmp_path: Path, members: int
) -> None:
    url = f"embedded://{tmp_path}/log.db"
    log = open_log(url)
    with log.admin() as admin:
        admin.create_topic("work", PARTITIONS)
    with log.producer() as producer:
        for i in range(RECORDS):
            producer.send("work", f"{i}".encode(), key=f"k{i}".encode())
        producer.flush()
    with log.admin() as admin:
        ends = {p: admin.watermarks(TopicPartition("work", p)).high for p in range(PARTITIONS)}

    workers = [Worker(url, "work", "g", tmp_path / f"w{i}.txt") for i in range(members)]
    regressions: list[str] = []
    stop_watch = threading.Event()

    def watch_commits() -> None:
        last: dict[TopicPartition, int] = {}
        with log.admin() as watcher:
            while not stop_watch.is_set():
                for tp, off in watcher.committed_offsets("g").items():
                    if off < last.get(tp, -1):
                        regressions.append(f"{tp}: {last[tp]} -> {off}")
                    last[tp] = off
                time.sleep(0.02)

    watcher = threading.Thread(target=watch_commits, daemon=True)
    watcher.start()
    try:
        # Every worker joined (each holds a partition): no later join can move them again.
        wait_for(
            lambda: (
                all(w.assigned for w in workers)
                and sorted(p for w in workers for p in w.assigned) == list(range(PARTITIONS))
            ),
            60,
            "every partition assigned to exactly one worker, every worker holding some",
        )
        victim = workers[0]
        wait_for(
            lambda: len(victim.processed()) >= 50 and bool(victim.assigned),
            60,
            "the victim to process something",
        )
        orphaned = list(victim.assigned)
        assert orphaned
        os.kill(victim.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        survivors = workers[1:]
        wait_for(
            lambda: sorted(p for w in survivors for p in w.assigned) == list(range(PARTITIONS)),
            60,
            "the survivors to take over the victim's partitions",
        )
        moved_after = time.monotonic() - killed_at
        wait_for(
            lambda: (
                log.admin().committed_offsets("g")
                == {TopicPartition("work", p): ends[p] for p in range(PARTITIONS)}
            ),
            120,
            "the group to commit the end of every partition",
        )
    finally:
        stop_watch.set()
        watcher.join(timeout=5)
        for w in workers:
            w.stop()

    processed = set().union(*(w.processed() for w in workers))
    expected = {(p, o) for p in range(PARTITIONS) for o in range(ends[p])}
    assert processed == expected, f"skipped: {sorted(expected - processed)[:10]}"
    assert regressions == [], "a committed offset went backwards"
    # The victim's partitions moved only once its session (2 s) timed out.
    assert moved_after >= 1.0
