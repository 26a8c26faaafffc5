"""Record batches: the engine stores records many to a SQLite row; every record still reads back
whole, from any offset, and schema-1 files (a row per record) are upgraded on open."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from assured.errors import EngineFileError
from assured.log import Record, TopicPartition, open_log
from assured.log._models import encode_headers
from assured.log.embedded import Engine, _batches
from assured.log.embedded._batches import MAX_BATCH_BYTES, MAX_BATCH_RECORDS
from assured.log.embedded._engine import now_ms, rid
from assured.log.embedded._schema import SCHEMA_VERSION

TP = TopicPartition("t", 0)


def _rows(count: int) -> list[tuple[int, bytes | None, bytes | None, bytes | None]]:
    """Records whose every column varies: None and empty keys, values of different sizes,
    headers on some."""
    rows = []
    for i in range(count):
        key = None if i % 3 == 0 else (b"" if i % 3 == 1 else b"k%d" % i)
        value = None if i % 50 == 7 else b"v%d-" % i + bytes(i % 17)
        headers = encode_headers([("n", b"%d" % i), ("none", None)]) if i % 5 == 0 else None
        rows.append((1_700_000_000_000 + i, key, value, headers))
    return rows


def _read(
    path: Path, start: int, max_records: int, isolation: str = "read_committed"
) -> list[Record]:
    log = open_log(f"embedded://{path}")
    with log.consumer(isolation=isolation) as consumer:  # type: ignore[arg-type]
        consumer.assign([TP])
        consumer.seek(TP, start)
        out: list[Record] = []
        while got := consumer.poll(max_records=max_records, timeout=0.2):
            assert len(got) <= max_records
            out += got
        return out


def test_a_large_append_is_split_and_every_record_reads_back_from_any_offset(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.db"
    engine = Engine(path)
    engine.create_topic("t", 1, {"max.message.bytes": str(2 * MAX_BATCH_BYTES)})
    part = engine.part_id(TP)
    count = 2 * MAX_BATCH_RECORDS + 500
    rows = _rows(count)
    big = [(1, None, bytes(MAX_BATCH_BYTES // 2 + 1), None) for _ in range(3)]
    with engine.write():
        assert engine.append(part, rows) == (0, False)
        assert engine.append(part, big) == (count, False)
    stored = engine.conn.execute(
        "SELECT id - ?, last - ? FROM batches ORDER BY id", (rid(part, 0), rid(part, 0))
    ).fetchall()
    engine.close()
    # By count (1000, 1000, 500), then by size: no two half-megabyte records share a batch.
    assert stored == [
        (0, 999),
        (1000, 1999),
        (2000, count - 1),
        (count, count),
        (count + 1, count + 1),
        (count + 2, count + 2),
    ]

    every = rows + big
    for start in (0, 1, 999, 1000, 1001, 1999, 2000, count - 1, count + 1):
        for max_records in (1, 7, 1000):
            if max_records == 1 and start < count - 5:
                continue  # one at a time over thousands of records says nothing new
            got = _read(path, start, max_records)
            assert [r.offset for r in got] == list(range(start, len(every)))
            for record in got:
                ts, key, value, headers = every[record.offset]
                assert (record.topic, record.partition) == ("t", 0)
                assert (record.timestamp_ms, record.key, record.value) == (ts, key, value)
                if headers is None:
                    assert record.headers == ()
                else:
                    n = record.offset
                    assert record.headers == (("n", b"%d" % n), ("none", None))


def test_retention_inside_a_batch_keeps_exact_offsets_and_byte_counts(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    engine = Engine(path)
    engine.create_topic("t", 1, {"retention.bytes": "1000", "retention.ms": "-1"})
    part = engine.part_id(TP)
    with engine.write():
        engine.append(part, [(1, None, bytes(100), None)] * 25)  # one batch, 2500 bytes
    assert engine.enforce_retention() == 15  # down to 1000 bytes: 10 records stay
    low, high, _lso, _ = engine.bounds(part)
    assert (low, high) == (15, 25)
    (kept_bytes,) = engine.conn.execute(
        "SELECT bytes FROM partitions WHERE id = ?", (part,)
    ).fetchone()
    assert kept_bytes == 1000
    # The batch still holds all 25 records; readers start at the log start all the same.
    assert engine.conn.execute("SELECT count(*) FROM batches").fetchone() == (1,)
    assert [r.offset for r in _read(path, 0, 500)] == list(range(15, 25))

    with engine.write():
        engine.append(part, [(2, None, bytes(100), None)] * 5)
    assert engine.enforce_retention() == 5
    assert engine.bounds(part)[:2] == (20, 30)
    assert engine.conn.execute("SELECT count(*) FROM batches").fetchone() == (2,)
    with engine.write():
        engine.append(part, [(3, None, bytes(100), None)] * 10)
    assert engine.enforce_retention() == 10  # both older batches go whole, rows and all
    assert engine.conn.execute("SELECT count(*) FROM batches").fetchone() == (1,)
    assert engine.conn.execute("SELECT bytes FROM partitions WHERE id = ?", (part,)).fetchone() == (
        1000,
    )
    engine.close()


def test_a_schema_1_file_is_upgraded_on_open_with_every_record_intact(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    engine = Engine(path)
    engine.create_topic("t", 2, None)
    engine.close()
    headers = encode_headers([("h", b"1")])

    def big(off: int) -> bytes:  # two of these are over a batch's byte limit
        return b"other-%d" % off + bytes(MAX_BATCH_BYTES // 2)

    # Schema 1, as assured wrote it: one row per record, id = (partition id << 40) | offset.
    with sqlite3.connect(path) as conn:
        part, other = (p for (p,) in conn.execute("SELECT id FROM partitions ORDER BY id"))
        conn.execute("DROP TABLE batches")
        conn.execute(
            "CREATE TABLE records (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, key BLOB, "
            "value BLOB, headers BLOB, txn INTEGER)"
        )
        old = [
            (0, 10, b"k0", b"plain-0", None, None),
            (1, 11, None, b"plain-1", headers, None),
            (2, 12, b"", b"plain-2", None, None),
            (3, 13, None, b"committed-3", None, 5),
            (4, 14, None, b"committed-4", None, 5),
            (5, 15, None, b"COMMIT", None, 0),
            (6, 16, None, b"aborted-6", None, -6),
            (7, 17, None, b"aborted-7", None, -6),
            (8, 18, None, b"ABORT", None, 0),
            *((off, 19, None, b"plain-%d" % off, None, None) for off in range(9, 2509)),
            (2509, 20, None, b"open-2509", None, 7),  # a transaction still open
            (2510, 21, None, b"open-2510", None, 7),
        ]
        conn.executemany(
            "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)",
            [(rid(part, off), *rest) for off, *rest in old]
            + [(rid(other, off), 30, None, big(off), None, None) for off in range(3)],
        )
        conn.execute("UPDATE partitions SET next_offset = 2511, bytes = 3 WHERE id = ?", (part,))
        conn.execute("UPDATE partitions SET next_offset = 3 WHERE id = ?", (other,))
        conn.execute(
            "INSERT INTO txn_parts VALUES (?, 7, 2509, ?)", (part, 2**62)
        )  # the open transaction holds the LSO at 2509
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")

    committed = _read(path, 0, 500)
    assert [(r.offset, r.timestamp_ms, r.key, r.value) for r in committed] == [
        (off, ts, key, value) for off, ts, key, value, _, txn in old[:-2] if txn is None or txn > 0
    ]
    assert committed[1].headers == (("h", b"1"),)
    uncommitted = _read(path, 0, 500, isolation="read_uncommitted")
    assert [r.offset for r in uncommitted] == [0, 1, 2, 3, 4, 6, 7, *range(9, 2511)]
    log = open_log(f"embedded://{path}")
    with log.consumer() as consumer:
        consumer.assign([TopicPartition("t", 1)])
        assert [r.value for r in consumer.poll(timeout=1)] == [big(0), big(1), big(2)]
    with sqlite3.connect(path) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        (version,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        spans = conn.execute(
            "SELECT id - ?, last - ?, txn FROM batches WHERE id >= ? AND id < ? ORDER BY id",
            (rid(part, 0), rid(part, 0), rid(part, 0), rid(part + 1, 0)),
        ).fetchall()
        other_spans = conn.execute(
            "SELECT id - ?, last - ? FROM batches WHERE id >= ? ORDER BY id",
            (rid(other, 0), rid(other, 0), rid(other, 0)),
        ).fetchall()
        (stored_bytes,) = conn.execute(
            "SELECT bytes FROM partitions WHERE id = ?", (part,)
        ).fetchone()
    assert "records" not in tables
    assert int(version) == SCHEMA_VERSION
    # Runs of one transaction state, markers alone, at most MAX_BATCH_RECORDS to a batch.
    assert spans == [
        (0, 2, None),
        (3, 4, 5),
        (5, 5, 0),
        (6, 7, -6),
        (8, 8, 0),
        (9, 1008, None),
        (1009, 2008, None),
        (2009, 2508, None),
        (2509, 2510, 7),
    ]
    assert other_spans == [(0, 0), (1, 1), (2, 2)]  # split by size
    # The byte count is taken afresh from the records (schema 1's could be off; here it was 3).
    assert stored_bytes == sum(
        len(key or b"") + len(value) + len(h or b"") for _, _, key, value, h, txn in old if txn != 0
    )


def test_an_empty_append_writes_nothing(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "x.db")
    engine.create_topic("t", 1, None)
    part = engine.part_id(TP)
    pid = engine.new_producer()
    with engine.write():
        assert engine.append(part, [(1, None, b"a", None)], (pid, 0, 0)) == (0, False)
        assert engine.append(part, []) == (1, False)
        assert engine.append(part, [], (pid, 0, 1)) == (1, False)
        assert engine.append(part, [(2, None, b"b", None)], (pid, 0, 1)) == (1, False)
    assert engine.bounds(part)[:2] == (0, 2)
    assert engine.conn.execute("SELECT count(*) FROM batches").fetchone() == (2,)
    engine.close()


def test_retention_by_time_inside_a_batch_and_beside_markers(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    log = open_log(f"embedded://{path}")
    with log.admin() as admin:
        admin.create_topic("t", 1, {"retention.ms": "60000"})
    now = now_ms()
    old, new = now - 120_000, now
    engine = Engine(path)
    part = engine.part_id(TP)
    with engine.write():  # one batch: three old records, then two recent ones
        engine.append(part, [(old, None, b"o", None)] * 3 + [(new, None, b"n", None)] * 2)
    assert engine.enforce_retention(now) == 3
    assert engine.bounds(part)[:2] == (3, 5)
    assert [r.value for r in _read(path, 0, 500)] == [b"n", b"n"]

    producer = log.producer(transactional_id="tx")
    producer.init_transactions()
    for end in (producer.abort_transaction, producer.commit_transaction):
        producer.begin_transaction()
        producer.send("t", b"txn", partition=0, timestamp_ms=old)
        producer.flush()
        end()  # its marker takes the next offset, stamped now
    later = now + 600_000
    with log.producer() as plain:
        plain.send("t", b"later", partition=0, timestamp_ms=later)
        plain.send("t", b"later", partition=0, timestamp_ms=later)
    producer.close()
    # 5: aborted record, 6: its marker, 7: committed record, 8: its marker, 9 and 10: later.
    assert engine.enforce_retention(later - 30_000) == 6  # everything before 9, markers too
    assert engine.bounds(part)[:2] == (9, 11)
    assert [r.offset for r in _read(path, 0, 500, "read_uncommitted")] == [9, 10]
    (kept,) = engine.conn.execute("SELECT bytes FROM partitions WHERE id = ?", (part,)).fetchone()
    assert kept == 2 * len(b"later")
    engine.close()


def test_retention_reads_only_the_batches_a_cut_falls_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(tmp_path / "x.db")
    engine.create_topic("t", 1, {"retention.bytes": "-1"})
    part = engine.part_id(TP)
    now = now_ms()
    for _ in range(50):
        with engine.write():
            engine.append(part, [(now, None, bytes(100), None)] * 100)  # 50 batches, 10,000 B each
    decoded: list[int] = []
    real = _batches.decode

    def counting(data: bytes, where: object, offset: int, count: int | None = None) -> Any:
        decoded.append(offset)
        return real(data, where, offset, count)

    monkeypatch.setattr(_batches, "decode", counting)
    assert engine.enforce_retention(now) == 0  # by time (7 days): nothing is old enough
    assert len(decoded) == 1  # the first batch, to find its first recent record
    decoded.clear()
    engine.conn.execute(
        "UPDATE topics SET config = json_set(config, '$.\"retention.bytes\"', '255050')"
    )
    assert engine.enforce_retention(now) == 2450  # 24.5 batches' worth goes
    assert len(decoded) <= 3  # the batch the cut falls in, by the cut and the byte count
    assert engine.bounds(part)[:2] == (2450, 5000)
    engine.close()


def test_a_damaged_batch_is_reported_as_corrupt_and_says_where(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    log = open_log(f"embedded://{path}")
    with log.admin() as admin:
        admin.create_topic("t", 1)
    with log.producer() as producer:
        for i in range(10):
            producer.send("t", b"%d" % i, partition=0)
            producer.flush()  # ten batches of one record
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE batches SET data = x'deadbeef' WHERE id = (SELECT min(id) + 4 FROM batches)"
        )
    with pytest.raises(EngineFileError, match=r"batch at t\[0\] offset 4 is damaged.*corrupt"):
        _read(path, 0, 500)
    assert [r.value for r in _read(path, 5, 500)] == [b"%d" % i for i in range(5, 10)]


def test_offset_metadata_lives_beside_older_processes_sharing_the_file(tmp_path: Path) -> None:
    """A file made before offset metadata gets its table when opened, and keeps its offsets;
    an older assured, which commits offsets as it always did (five columns, never touching
    the metadata), can still write to the file, and metadata left from before its commit no
    longer counts."""
    path = tmp_path / "old.db"
    log = open_log(f"embedded://{path}")
    with log.admin() as admin:
        admin.create_topic("t", 1)
    tp = TopicPartition("t", 0)
    with log.consumer(group_id="g") as consumer:
        consumer.assign([tp])
        consumer.commit({tp: 7})
    log.close()
    with sqlite3.connect(path) as conn:  # as a file made before offset metadata was
        conn.execute("DROP TABLE offset_notes")
    log = open_log(f"embedded://{path}")
    with log.consumer(group_id="g") as consumer:
        assert consumer.committed_metadata([tp]) == {tp: (7, "")}
        consumer.commit({tp: 8}, metadata={tp: "kept"})
        assert consumer.committed_metadata([tp]) == {tp: (8, "kept")}
        with sqlite3.connect(path) as older:  # an older assured commits the same offset
            older.execute("INSERT OR REPLACE INTO offsets VALUES ('g', 't', 0, 8, 1)")
        assert consumer.committed_metadata([tp]) == {tp: (8, "")}
    log.close()
    with sqlite3.connect(path) as conn:
        (version,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert int(version) == SCHEMA_VERSION == 2  # older assured still opens it
