"""The PostgreSQL server is real: a rolled-back transaction leaves nothing."""

from __future__ import annotations

import psycopg
import pytest

pytestmark = pytest.mark.postgres


def test_rollback_leaves_nothing_and_commit_is_read_back(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE charges (id text PRIMARY KEY, cents bigint NOT NULL)")

    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("INSERT INTO charges VALUES ('c-1', 500), ('c-2', 700)")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM charges").fetchone() == (0,)

        with conn.transaction():
            conn.execute("INSERT INTO charges VALUES ('c-3', 900)")

    with psycopg.connect(postgres_dsn) as other:  # a fresh session sees only the commit
        rows = other.execute("SELECT id, cents FROM charges ORDER BY id").fetchall()
    assert rows == [("c-3", 900)]
