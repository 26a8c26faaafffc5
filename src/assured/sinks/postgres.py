"""A PostgreSQL database as a sink (psycopg 3): effects and offsets in one transaction."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg

from assured.errors import ServiceError
from assured.log import TopicPartition
from assured.sinks._base import Claim, Sink, SinkTransaction, fenced

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

    def claim(self, group: str, partitions: Sequence[TopicPartition]) -> Claim:
        out: Claim = {}
        with self.transaction() as tx:
            for tp in partitions:
                row = tx.execute(
                    "INSERT INTO assured_offsets (group_id, topic, partition, epoch) "
                    "VALUES (%s, %s, %s, 1) ON CONFLICT (group_id, topic, partition) "
                    "DO UPDATE SET epoch = assured_offsets.epoch + 1 RETURNING next_offset, epoch",
                    (group, tp.topic, tp.partition),
                ).fetchone()
                out[tp] = (row[0], row[1])
        return out

    def store_offsets(
        self,
        tx: SinkTransaction,
        group: str,
        offsets: Mapping[TopicPartition, int],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        for tp, offset in offsets.items():
            cur = tx.execute(
                "UPDATE assured_offsets SET next_offset = %s "
                "WHERE group_id = %s AND topic = %s AND partition = %s AND epoch = %s",
                (offset, group, tp.topic, tp.partition, epochs.get(tp, -1)),
            )
            if cur.rowcount != 1:
                raise fenced(tp, group)

    def stored_offsets(self, group: str) -> dict[TopicPartition, int]:
        rows = self._connect().execute(
            "SELECT topic, partition, next_offset FROM assured_offsets "
            "WHERE group_id = %s AND next_offset IS NOT NULL",
            (group,),
        )
        return {TopicPartition(t, p): o for t, p, o in rows}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
