"""The embedded engine's own mechanics: idempotence, retention, durability, wake-ups."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from assured.errors import SequenceError
from assured.log import TopicPartition, open_log
from assured.log.embedded import EmbeddedLog, Engine
from assured.log.embedded._engine import now_ms
from assured.log.embedded._producer import EmbeddedProducer

ROOT = Path(__file__).resolve().parents[2]


def test_resend_of_a_written_sequence_returns_its_offset_and_appends_nothing(
    tmp_path: Path,
) -> None:
    engine = Engine(tmp_path / "x.db")
    engine.create_topic("t", 1, None)
    part = engine.part_id(TopicPartition("t", 0))
    pid = engine.new_producer()
    rows = [(now_ms(), None, b"a", None), (now_ms(), None, b"b", None)]
    with engine.write():
        assert engine.append(part, rows, (pid, 0, 0)) == (0, False)
    with engine.write():  # the same batch again, as after a lost acknowledgement
        assert engine.append(part, rows, (pid, 0, 0)) == (0, True)
    with engine.write():
        assert engine.append(part, rows[:1], (pid, 0, 2)) == (2, False)
    assert engine.watermarks(part) == (0, 3, 3)
    with pytest.raises(SequenceError, match="expected 3"), engine.write():
        engine.append(part, rows, (pid, 0, 7))
    engine.close()


def test_lost_acknowledgement_is_retried_without_a_duplicate(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/x.db")
    with log.admin() as admin:
        admin.create_topic("t", 1)
    producer = log.producer()
    assert isinstance(producer, EmbeddedProducer)
    offsets: list[int] = []
    producer.send("t", b"first", partition=0, on_delivery=lambda r: offsets.append(r.offset))
    producer.lose_next_ack = True  # the write lands; the producer does not hear so, and resends
    producer.flush()
    producer.send("t", b"second", partition=0, on_delivery=lambda r: offsets.append(r.offset))
    producer.flush()
    producer.close()
    assert offsets == [0, 1]
    with log.consumer() as consumer:
        consumer.assign([TopicPartition("t", 0)])
        assert [r.value for r in consumer.poll(timeout=1)] == [b"first", b"second"]


def test_a_non_idempotent_producer_does_duplicate_on_lost_ack(tmp_path: Path) -> None:
    """The control for the test above: without idempotence, the same fault duplicates."""
    log = open_log(f"embedded://{tmp_path}/x.db")
    with log.admin() as admin:
        admin.create_topic("t", 1)
    producer = log.producer(idempotent=False)
    assert isinstance(producer, EmbeddedProducer)
    producer.send("t", b"first", partition=0)
    producer.lose_next_ack = True
    producer.flush()
    producer.close()
    with log.admin() as admin:
        assert admin.watermarks(TopicPartition("t", 0)).high == 2


def test_retention_by_time_and_by_size(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/x.db")
    with log.admin() as admin:
        admin.create_topic("by-time", 1, {"retention.ms": "60000"})
        admin.create_topic("by-size", 1, {"retention.bytes": "1000"})
        admin.create_topic("forever", 1, {"retention.ms": "-1"})
    old = now_ms() - 120_000
    with log.producer() as producer:
        for _ in range(10):
            producer.send("by-time", b"old", partition=0, timestamp_ms=old)
            producer.send("forever", b"old", partition=0, timestamp_ms=old)
        for _ in range(5):
            producer.send("by-time", b"new", partition=0)
        for _ in range(30):
            producer.send("by-size", bytes(100), partition=0)  # 3000 bytes
        producer.flush()
    with log.admin() as admin:
        assert isinstance(log, EmbeddedLog)
        removed = admin.enforce_retention()  # type: ignore[attr-defined]
        assert removed == 10 + 20
        assert admin.watermarks(TopicPartition("by-time", 0)).low == 10
        assert admin.watermarks(TopicPartition("by-size", 0)).low == 20
        assert admin.watermarks(TopicPartition("forever", 0)).low == 0
    with log.consumer(group_id="g") as consumer:
        consumer.assign([TopicPartition("by-time", 0)])
        values = consumer.poll(timeout=1)
        assert [r.value for r in values] == [b"new"] * 5
        assert values[0].offset == 10


def test_retention_never_deletes_an_open_transaction(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/x.db")
    with log.admin() as admin:
        admin.create_topic("t", 1, {"retention.bytes": "0"})
    producer = log.producer(transactional_id="tx")
    producer.init_transactions()
    producer.begin_transaction()
    producer.send("t", b"open", partition=0)
    producer.flush()
    with log.admin() as admin:
        assert admin.enforce_retention() == 0  # type: ignore[attr-defined]
        producer.commit_transaction()
        assert admin.enforce_retention() == 1  # type: ignore[attr-defined]
    producer.close()


@pytest.mark.parametrize(("durability", "pragma"), [("normal", 1), ("full", 2)])
def test_durability_sets_sqlite_synchronous(tmp_path: Path, durability: str, pragma: int) -> None:
    log = open_log(f"embedded://{tmp_path}/x.db?durability={durability}")
    assert isinstance(log, EmbeddedLog)
    engine = log._engine()
    assert engine.conn.execute("PRAGMA synchronous").fetchone()[0] == pragma
    assert engine.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    engine.close()


def test_the_file_is_the_whole_state(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/x.db")
    with log.admin() as admin:
        admin.create_topic("t", 1)
    with log.producer() as producer:
        producer.send("t", b"kept", partition=0)
        producer.flush()
    backup = tmp_path / "copy.db"
    with sqlite3.connect(tmp_path / "x.db") as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    copy = open_log(f"embedded://{backup}")
    with copy.consumer() as consumer:
        consumer.assign([TopicPartition("t", 0)])
        assert [r.value for r in consumer.poll(timeout=1)] == [b"kept"]


def test_a_waiting_consumer_wakes_on_a_write_from_another_process(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/x.db")
    with log.admin() as admin:
        admin.create_topic("t", 1)
    with log.consumer() as consumer:
        consumer.assign([TopicPartition("t", 0)])
        assert consumer.poll(timeout=0.1) == []
        code = (
            "import time\n"
            "from assured.log import open_log\n"
            "time.sleep(0.5)\n"
            f"p = open_log('embedded://{tmp_path}/x.db').producer(linger_ms=0)\n"
            "p.send('t', b'hello', partition=0)\n"
            "p.flush(); p.close()\n"
        )
        writer = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
        started = time.monotonic()
        records = consumer.poll(timeout=20)
        waited = time.monotonic() - started
        writer.wait(timeout=30)
    assert [r.value for r in records] == [b"hello"]
    # Woken by the write, not by the 20 s timeout running out.
    assert waited < 10
