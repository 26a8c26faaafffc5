"""SQLite ends a transaction by itself on some errors (a full disk, an I/O error): what a
handler or the sink does next must not run outside it, where each statement commits alone."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from assured import App, Message, SqliteSink, TopicPartition, open_log
from assured.runtime._settings import Guarantee
from assured.sinks import SinkUnavailableError


def rows(path: Path) -> tuple[list[str], list[int], list[tuple[str, int, int]]]:
    with sqlite3.connect(path) as db:
        effects = sorted(r[0][:3] for r in db.execute("SELECT v FROM t"))
        letters = sorted(r[0] for r in db.execute("SELECT source_offset FROM assured_dead_letters"))
        offsets = list(db.execute("SELECT topic, partition, next_offset FROM assured_offsets"))
    return effects, letters, offsets


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_full_disk_is_the_databases_failure_and_commits_nothing(
    tmp_path: Path, guarantee: Guarantee
) -> None:
    """Old code: the disk filled up at m2's insert; SQLite rolled the whole transaction back,
    then m2's retries met "no such savepoint" and were dead-lettered, and the dead letters and
    the positions were written with no transaction open (each committed alone): m0 and m1's
    effects were lost, positions stored past them. Now the batch is redone once the database
    takes writes again, every effect once, nothing dead-lettered."""
    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        admin.create_topic("in", 1)
        admin.create_topic("in.dlq", 1)
    with log.producer() as producer:
        for i in range(4):
            producer.send("in", f"m{i}".encode())
        producer.flush()
    sink = SqliteSink(str(tmp_path / "sink.db"))
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE t (v TEXT)")
    full = Counter[str]()
    app = App(log=log, group="g", guarantee=guarantee)

    @app.handler("in", sink=sink, retries=1, backoff_ms=1)
    def book(msg: Message, db: Any) -> None:
        if msg.value == b"m2" and not full["once"]:
            full["once"] += 1  # the disk fills up, once: the file may not grow
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count={pages}")
        elif full["once"]:
            db.execute("PRAGMA max_page_count=1073741823")  # room again
        db.execute("INSERT INTO t VALUES (?)", (msg.value.decode() + "x" * 20_000,))

    app.run(until_idle=0.5)
    effects, letters, _ = rows(tmp_path / "sink.db")
    assert effects == ["m0x", "m1x", "m2x", "m3x"]
    assert letters == []
    with log.admin() as admin:
        assert admin.committed_offsets("g", ["in"]).get(TopicPartition("in", 0)) == 4


def test_nothing_runs_after_sqlite_ended_the_transaction(tmp_path: Path) -> None:
    sink = SqliteSink(str(tmp_path / "sink.db"))
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE t (v TEXT)")
    with sink, pytest.raises(SinkUnavailableError, match="rolled"), sink.transaction() as tx:  # noqa: PT012
        tx.execute("INSERT INTO t VALUES ('a')")
        with sink._own():  # a handler's ROLLBACK is refused: this is SQLite's own
            tx.connection.rollback()  # as SQLite does on SQLITE_FULL
        tx.execute("INSERT INTO t VALUES ('b')")  # would commit alone
    with sqlite3.connect(tmp_path / "sink.db") as db:
        assert list(db.execute("SELECT v FROM t")) == []


def test_a_handler_that_swallows_the_end_and_writes_on_the_raw_connection_commits_nothing(
    tmp_path: Path,
) -> None:
    """SQLite ended the transaction (a full disk); the handler catches the error and goes on
    through ``db.connection``, the raw connection. Old code: that statement ran with no
    transaction open and committed at once, while the batch was redone: its effect twice.
    Now the sink opens a transaction again as soon as it sees the end, so what follows runs
    inside it, and it is rolled back with the batch."""
    sink = SqliteSink(str(tmp_path / "sink.db"))
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE t (v TEXT)")
    with sink, pytest.raises(SinkUnavailableError, match="rolled"), sink.transaction() as tx:  # noqa: PT012
        tx.execute("INSERT INTO t VALUES ('a')")
        pages = tx.execute("PRAGMA page_count").fetchone()[0]
        tx.execute(f"PRAGMA max_page_count={pages}")
        try:
            for _ in range(50):  # until the disk is full and SQLite gives the transaction up
                tx.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,))
        except SinkUnavailableError:
            pass  # swallowed, as a careless handler would
        tx.connection.execute("PRAGMA max_page_count=1073741823")
        tx.connection.execute("INSERT INTO t VALUES ('after')")  # the raw connection
    with sqlite3.connect(tmp_path / "sink.db") as db:
        assert list(db.execute("SELECT v FROM t")) == []
