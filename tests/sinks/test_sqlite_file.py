"""A SQLite sink whose file is deleted or replaced stops at the next commit (issue 18, item 10);
one whose write lock is held by a stopped process gives up with a clear error (item 4)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from assured import App, Message, TopicPartition
from assured.sinks import SinkLostError, SinkTransaction, SinkUnreachableError, SqliteSink
from tests.sinks.conftest import charges_log


def make(path: Path) -> SqliteSink:
    sink = SqliteSink(path)
    sink.setup()
    with sink.transaction() as tx:
        tx.execute("CREATE TABLE effects (n INTEGER)")
        tx.execute("INSERT INTO effects VALUES (1)")
    return sink


def test_a_deleted_file_stops_the_next_commit(tmp_path: Path) -> None:
    path = tmp_path / "effects.db"
    sink = make(path)
    path.unlink()
    with pytest.raises(SinkLostError, match="deleted") as info, sink.transaction() as tx:
        tx.execute("INSERT INTO effects VALUES (2)")
    assert "nothing was committed" in str(info.value)
    assert info.value.fatal
    with pytest.raises(SinkLostError), sink.transaction():
        pass  # and every later transaction: the sink does not start a new, empty file
    assert not path.exists()


def test_a_replaced_file_stops_the_next_commit(tmp_path: Path) -> None:
    path = tmp_path / "effects.db"
    sink = make(path)
    copy = tmp_path / "copy.db"
    with closing(sqlite3.connect(path)) as src, closing(sqlite3.connect(copy)) as dst:
        src.backup(dst)
    os.replace(copy, path)
    with pytest.raises(SinkLostError, match="replaced"), sink.transaction() as tx:
        tx.execute("INSERT INTO effects VALUES (2)")
    with closing(sqlite3.connect(path)) as check:
        assert check.execute("SELECT count(*) FROM effects").fetchone() == (1,)
    sink.close()


def test_an_app_stops_when_its_sink_file_is_deleted(tmp_path: Path) -> None:
    log = charges_log(tmp_path, 10)
    path = tmp_path / "effects.db"
    make(path).close()
    app = App(log=log, group="g", guarantee="exactly-once", max_poll_records=2)

    @app.handler("charges", sink=SqliteSink(path))
    def charge(msg: Message, db: SinkTransaction) -> None:
        db.execute("INSERT INTO effects VALUES (?)", (int(msg.value),))
        if msg.offset == 4 and path.exists():
            path.unlink()

    with pytest.raises(SinkLostError):
        app.run(until_idle=1.0)
    log.close()


def test_has_offsets_tells_a_database_that_lost_them(tmp_path: Path) -> None:
    tp = TopicPartition("charges", 0)
    with SqliteSink(tmp_path / "effects.db") as sink:
        (_, epoch) = sink.claim("g", [tp])[tp]
        with sink.transaction(group="g") as tx:
            sink.store_offsets(tx, "g", {tp: 5}, {tp: epoch})
        assert sink.has_offsets("g")
    with SqliteSink(tmp_path / "new.db") as fresh:
        assert not fresh.has_offsets("g")


_HOLD = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO effects VALUES (99)")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def hold_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding the sink's write lock (``BEGIN IMMEDIATE``) for ``seconds``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_stopped_process_holding_the_lock_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "effects.db"
    make(path).close()
    holder = hold_lock(path, 60)
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        sink = SqliteSink(path, lock_timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(SinkUnreachableError) as info:
            sink.claim("g", [TopicPartition("charges", 0)])
        waited = time.monotonic() - started
        assert 1.0 <= waited < 5.0
        message = str(info.value)
        assert str(path) in message
        assert "SIGSTOP" in message
        assert "fuser" in message
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.communicate()
    tp = TopicPartition("charges", 0)
    assert sink.claim("g", [tp]) == {tp: (None, 1)}, "the lock died with its holder"
    sink.close()


def test_a_lock_released_within_the_deadline_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "effects.db"
    make(path).close()
    holder = hold_lock(path, 1.5)
    try:
        sink = SqliteSink(path, lock_timeout_s=20)
        with sink.transaction() as tx:
            assert tx.execute("SELECT count(*) FROM effects").fetchone() == (2,)
        sink.close()
    finally:
        holder.communicate(timeout=30)
