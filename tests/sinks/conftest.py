"""Fixtures for the sink tests: each sink kind on a database of its own (a SQLite file, or a
PostgreSQL schema of its own on the session's real server), and a way to open more sinks on
the same database, as more processes would."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import psycopg
import pytest

from assured import open_log
from assured.log import Consumer, Log, Record, TopicPartition
from assured.sinks import PostgresSink, Sink, SqliteSink

SinkFactory = Callable[[], Sink]


class Msg(NamedTuple):
    """Where a record sits: what first_delivery needs of a message."""

    topic: str
    partition: int
    offset: int


@pytest.fixture
def pg_dsn(postgres_dsn: str) -> Iterator[str]:
    """A DSN whose tables go to a fresh schema of their own, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{postgres_dsn}?options=-csearch_path%3D{schema}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def charges_log(tmp_path: Path, count: int, topic: str = "charges") -> Log:
    """An embedded log whose one-partition ``topic`` holds the values 0..count-1."""
    opened = open_log(f"embedded://{tmp_path}/log.db")
    with opened.admin() as admin:
        admin.create_topic(topic, 1)
    with opened.producer() as producer:
        for i in range(count):
            producer.send(topic, str(i).encode(), partition=0)
        producer.flush()
    return opened


@pytest.fixture
def log(tmp_path: Path) -> Log:
    """An embedded log with topic ``in``, two partitions."""
    opened = open_log(f"embedded://{tmp_path}/log.db")
    with opened.admin() as admin:
        admin.create_topic("in", 2)
    return opened


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SinkFactory]:
    """``new_sink()``: another sink on this test's database (not yet set up)."""
    made: list[Sink] = []
    if request.param == "sqlite":

        def factory() -> Sink:
            made.append(SqliteSink(tmp_path / "effects.db"))
            return made[-1]

    else:
        dsn = request.getfixturevalue("pg_dsn")

        def factory() -> Sink:
            made.append(PostgresSink(dsn))
            return made[-1]

    yield factory
    for sink in made:
        sink.close()


def read_all(log: Log, topic: str, timeout: float = 30.0) -> list[Record]:
    """Every committed record of ``topic``, read to its end."""
    with log.admin() as admin:
        tps = [TopicPartition(topic, p) for p in range(admin.describe_topic(topic).partitions)]
        ends = {tp: admin.watermarks(tp).high for tp in tps}
    with log.consumer(isolation="read_committed") as reader:
        reader.assign(tps)
        for tp in tps:
            reader.seek(tp, 0)
        return _drain(reader, ends, timeout)


def _drain(reader: Consumer, ends: dict[TopicPartition, int], timeout: float) -> list[Record]:
    import time

    got: list[Record] = []
    deadline = time.monotonic() + timeout
    while any(reader.position(tp) < end for tp, end in ends.items()):
        assert time.monotonic() < deadline, "could not read the topic to its end"
        got += reader.poll(max_records=500, timeout=0.2)
    return got
