"""Exactly-once with a trickle of input: the transaction commits as soon as the consumer has
caught up, so an output is visible to a read_committed reader well before the commit interval
(``commit_mode="adaptive"``, the default); ``"fixed"`` holds it for the interval."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from assured import App, Message, Output
from assured.log import Log, TopicPartition, open_log

INTERVAL_MS = 6000  # long, so that "well before the interval" is unmistakable


@pytest.fixture(params=["embedded", pytest.param("kafka", marks=pytest.mark.kafka)])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Log]:
    if request.param == "kafka":
        from tests.conftest import known_topics

        bootstrap = request.getfixturevalue("kafka_bootstrap")
        opened = open_log(f"kafka://{bootstrap}")
        opened.topics = known_topics(opened, bootstrap, 2)  # type: ignore[attr-defined]
    else:
        opened = open_log(f"embedded://{tmp_path}/log.db")
        with opened.admin() as admin:
            admin.create_topic("in", 1)
            admin.create_topic("out", 1)
        opened.topics = ("in", "out")  # type: ignore[attr-defined]
    yield opened
    opened.close()


def first_output_after(log: Log, mode: str, wait_s: float) -> float | None:
    """Seconds from sending one input to its output being readable (read_committed), or None
    if it was not within ``wait_s``."""
    source, sink = log.topics  # type: ignore[attr-defined]
    app = App(
        log=log,
        group=f"g-{mode}-{time.monotonic_ns()}",
        guarantee="exactly-once",
        commit_interval_ms=INTERVAL_MS,
        commit_mode=mode,
        session_timeout_ms=6000,
    )

    @app.handler(source, output=sink)
    def copy(msg: Message, out: Output) -> None:
        out.send(msg.value, key=msg.key)

    assigned = threading.Event()

    class Assigned(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("assigned"):
                assigned.set()

    watcher, runtime_log = Assigned(), logging.getLogger("assured.runtime")
    level = runtime_log.level
    runtime_log.addHandler(watcher)
    runtime_log.setLevel(logging.INFO)
    runner = threading.Thread(target=app.run, daemon=True)
    runner.start()
    try:
        with log.consumer(isolation="read_committed") as reader:
            reader.assign([TopicPartition(sink, 0)])
            assert assigned.wait(60), "the App was never assigned its partition"
            time.sleep(0.5)  # the App is waiting at the end: the input trickles in now
            with log.producer() as producer:
                producer.send(source, f"one-{mode}".encode(), key=b"k")
                producer.flush()
            sent = time.monotonic()
            while time.monotonic() - sent < wait_s:
                if any(r.value == f"one-{mode}".encode() for r in reader.poll(timeout=0.05)):
                    return time.monotonic() - sent
            return None
    finally:
        runtime_log.removeHandler(watcher)
        runtime_log.setLevel(level)
        app.stop()
        runner.join(timeout=30)
        assert not runner.is_alive()


def test_adaptive_commit_shows_a_trickle_well_before_the_interval(log: Log) -> None:
    seen = first_output_after(log, "adaptive", wait_s=INTERVAL_MS / 1000 / 2)
    assert seen is not None, "the output waited for the commit interval"
    assert seen < 1.0


def test_fixed_commit_holds_it_for_the_interval(log: Log) -> None:
    # The same App with the fixed interval: the output is not visible a second and a half on.
    assert first_output_after(log, "fixed", wait_s=1.5) is None
