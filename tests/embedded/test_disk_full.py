"""A full disk under the embedded engine is the log's failure, never a record's: the writes
that met it are rolled back and made again once there is room; no healthy record is
dead-lettered, none is lost or repeated."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import assured.log.embedded._engine as engine
from assured import App, Message, Output, TopicPartition, open_log
from assured.runtime._settings import Guarantee
from tests.conftest import read_values as read


class Disk:
    """The disk under every engine connection made from now on: ``full()`` lets no file grow
    (SQLite answers SQLITE_FULL, and ends the transaction), ``room()`` lets them grow again."""

    def __init__(self) -> None:
        self.conns: list[sqlite3.Connection] = []

    def _each(self, limit: str | None) -> None:
        for conn in list(self.conns):
            try:
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count={limit or pages}")
            except sqlite3.Error:
                pass  # a connection closed meanwhile

    def full(self) -> None:
        self._each(None)

    def room(self) -> None:
        self._each("1073741823")


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    d = Disk()
    real = engine.connect  # type: ignore[attr-defined]  # the engine's own, from _schema

    def connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = real(*args, **kwargs)  # type: ignore[arg-type]
        d.conns.append(conn)
        return conn

    monkeypatch.setattr(engine, "connect", connect)
    yield d
    d.room()


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_full_disk_dead_letters_nothing_and_loses_nothing(
    tmp_path: Path, disk: Disk, guarantee: Guarantee
) -> None:
    """Old code: SQLITE_FULL was a plain log error, so the runtime took the failed writes for a
    record's fault, redid records one at a time and dead-lettered healthy ones."""
    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        for topic in ("in", "out", "in.dlq"):
            admin.create_topic(topic, 1)
    values = [f"m{i}".encode() for i in range(300)]
    with log.producer() as producer:
        for v in values:
            producer.send("in", v)
        producer.flush()
    filled = threading.Event()
    app = App(log=log, group="g", guarantee=guarantee)

    @app.handler("in", output="out", retries=1, backoff_ms=1)
    def copy(msg: Message, out: Output) -> None:
        if msg.value == b"m100" and not filled.is_set():
            filled.set()
            disk.full()
            threading.Timer(0.5, disk.room).start()
        out.send(msg.value)

    app.run(until_idle=1.0)
    assert filled.is_set()
    written = read(log, "out")
    assert set(written) == set(values)
    if guarantee == "exactly-once":
        assert sorted(written) == sorted(values)  # each once
    assert read(log, "in.dlq") == []
    with log.admin() as admin:
        assert admin.committed_offsets("g", ["in"])[TopicPartition("in", 0)] == 300
