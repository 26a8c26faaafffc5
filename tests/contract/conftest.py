"""The contract suite runs unchanged against every backend: the ``log`` fixture is each of them
in turn. A backend-specific test has no place here."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from assured.log import Consumer, Log, Record, open_log

BACKENDS = ["embedded", pytest.param("kafka", marks=pytest.mark.kafka)]


@pytest.fixture(params=BACKENDS)
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Log]:
    if request.param == "embedded":
        opened = open_log(f"embedded://{tmp_path}/log.db")
    else:
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        opened = open_log(f"kafka://{bootstrap}")
    yield opened
    opened.close()


@pytest.fixture
def topic(log: Log) -> Callable[..., str]:
    """Make a fresh topic: ``topic(partitions=3)`` returns its name."""

    def make(partitions: int = 1, **config: str) -> str:
        name = f"t-{uuid.uuid4().hex[:10]}"
        with log.admin() as admin:
            admin.create_topic(name, partitions, config or None)
        return name

    return make


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def drain(consumer: Consumer, count: int, timeout: float = 30.0) -> list[Record]:
    """Poll until ``count`` records arrived (then a little longer, to catch extras)."""
    got: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += consumer.poll(max_records=500, timeout=0.5)
    got += consumer.poll(max_records=500, timeout=0.3)
    return got


def poll_until(consumer: Consumer, done: Callable[[], bool], timeout: float = 30.0) -> list[Record]:
    """Poll (running rebalance callbacks) until ``done()``; returns what was read meanwhile."""
    got: list[Record] = []
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached while polling")
        got += consumer.poll(max_records=500, timeout=0.2)
    return got
