"""A SQLite database as a sink: effects and offsets in one SQLite transaction."""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from assured.errors import ConfigError
from assured.sinks._base import Sink, SinkTransaction

__all__ = ["SqliteSink"]

_DDL = (
    "CREATE TABLE IF NOT EXISTS assured_offsets (group_id TEXT NOT NULL, topic TEXT NOT NULL, "
    "partition INTEGER NOT NULL, next_offset INTEGER, epoch INTEGER NOT NULL DEFAULT 0, "
    "PRIMARY KEY (group_id, topic, partition))",
    "CREATE TABLE IF NOT EXISTS assured_inbox (message_id TEXT PRIMARY KEY)",
)


class _SqliteTransaction(SinkTransaction):
    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        return self._conn.execute(sql, params)

    @property
    def connection(self) -> sqlite3.Connection:
        return self._conn

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        name = f"sp_{uuid.uuid4().hex[:8]}"
        self._conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self._conn.execute(f"ROLLBACK TO {name}")
            self._conn.execute(f"RELEASE {name}")
            raise
        self._conn.execute(f"RELEASE {name}")

    def first_delivery(self, message_id: str) -> bool:
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO assured_inbox (message_id) VALUES (?)", (message_id,)
        )
        return cur.rowcount == 1


class SqliteSink(Sink):
    """Effects in the SQLite database at ``path``. ``durability='full'`` fsyncs every commit."""

    def __init__(self, path: str | Path, durability: str = "full"):
        self.path = Path(path)
        if durability not in ("normal", "full"):
            raise ConfigError(f"durability={durability!r}: 'normal' or 'full'")
        self._durability = durability
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            if not self.path.parent.is_dir():
                raise ConfigError(f"folder {self.path.parent} for the SQLite sink does not exist")
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._durability.upper()}")
            self._conn = conn
        return self._conn

    def setup(self) -> None:
        conn = self._connect()
        for statement in _DDL:
            conn.execute(statement)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SinkTransaction]:
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield _SqliteTransaction(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
