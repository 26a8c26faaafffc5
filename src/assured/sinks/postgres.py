"""A PostgreSQL database as a sink (psycopg 3): effects and offsets in one transaction."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg

from assured.errors import ServiceError
from assured.sinks._base import Sink, SinkTransaction

__all__ = ["PostgresSink"]

_DDL = (
    "CREATE TABLE IF NOT EXISTS assured_offsets (group_id text NOT NULL, topic text NOT NULL, "
    "partition integer NOT NULL, next_offset bigint, epoch bigint NOT NULL DEFAULT 0, "
    "PRIMARY KEY (group_id, topic, partition))",
    "CREATE TABLE IF NOT EXISTS assured_inbox (message_id text PRIMARY KEY)",
)


class _PostgresTransaction(SinkTransaction):
    def __init__(self, conn: psycopg.Connection[Any]):
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        return self._conn.execute(sql, params)

    @property
    def connection(self) -> psycopg.Connection[Any]:
        return self._conn

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        with self._conn.transaction():  # nested: a SAVEPOINT
            yield

    def first_delivery(self, message_id: str) -> bool:
        cur = self._conn.execute(
            "INSERT INTO assured_inbox (message_id) VALUES (%s) ON CONFLICT DO NOTHING",
            (message_id,),
        )
        return cur.rowcount == 1


class PostgresSink(Sink):
    """Effects in the PostgreSQL database at ``dsn`` (``postgresql://user@host:port/db``)."""

    placeholder = "%s"

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(self.dsn, autocommit=True)
            except psycopg.OperationalError as e:
                raise ServiceError(
                    f"cannot connect to PostgreSQL ({e}); check the DSN and that the server runs"
                ) from None
        return self._conn

    def setup(self) -> None:
        conn = self._connect()
        for statement in _DDL:
            conn.execute(statement)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SinkTransaction]:
        conn = self._connect()
        with conn.transaction():
            yield _PostgresTransaction(conn)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
