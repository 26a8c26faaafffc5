"""The engine file: opening it safely, and the tables that hold Kafka's model.

One SQLite file in WAL mode is the whole state; copy it (with its ``-wal``) and you have a
backup. Opening refuses, with a message that says why and leaves the file untouched: a path in
a missing or read-only folder, a file that is not SQLite, a SQLite file that is not an engine
file, a corrupt file, and a file written by a newer schema.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from assured.errors import AssuredError, ConfigError, EngineFileError, LogError, RetriableError
from assured.log.embedded._batches import MAX_BATCH_RECORDS, Row, row_size, table_rows

__all__ = ["FORMAT", "OFFSET_BITS", "SCHEMA_VERSION", "Durability", "connect", "rid", "translate"]

FORMAT = "assured-embedded"
SCHEMA_VERSION = 2  # 1 stored one row per record; 2 stores record batches
Durability = Literal["normal", "full"]
OFFSET_BITS = 40  # 10^12 offsets per partition; 2^23 partitions per file

# Metadata committed with an offset, in a table of its own, so that a file opened by an older
# assured still works with it (it neither reads nor writes it). A row counts only while the
# offsets row it was written with (same offset and commit time) is the group's committed one.
_NOTES_DDL = """
CREATE TABLE IF NOT EXISTS offset_notes (
    group_id TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
    off INTEGER NOT NULL, commit_ms INTEGER NOT NULL, metadata TEXT NOT NULL,
    PRIMARY KEY (group_id, topic, partition)) WITHOUT ROWID
"""


def rid(part: int, offset: int) -> int:
    """The row id of ``offset`` in partition ``part`` (``batches.id`` and ``batches.last``)."""
    return (part << OFFSET_BITS) | offset


# Record batches (see ``_batches.py``): `id` is (partition id << 40) | the batch's first offset,
# so a partition's batches are one range of SQLite's rowid, its fastest key for appends and
# scans; `last` is the same for the batch's last offset. `txn` is NULL for plain records, the
# transaction's id (> 0) while it is open or once it committed, minus that id once it aborted,
# and 0 for a transaction marker. So read_committed is `txn IS NULL OR txn > 0` below the LSO, and
# read_uncommitted is `txn IS NULL OR txn <> 0`. `bytes` is what the batch counts for in
# retention.bytes, `max_ts` its largest timestamp.

_DDL = (
    """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE topics (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, partitions INTEGER NOT NULL,
    config TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE partitions (
    id INTEGER PRIMARY KEY, topic_id INTEGER NOT NULL, partition INTEGER NOT NULL,
    log_start INTEGER NOT NULL DEFAULT 0, next_offset INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0, UNIQUE (topic_id, partition));
CREATE TABLE batches (
    id INTEGER PRIMARY KEY, last INTEGER NOT NULL, max_ts INTEGER NOT NULL,
    bytes INTEGER NOT NULL, txn INTEGER, data BLOB NOT NULL);
CREATE TABLE producers (
    id INTEGER PRIMARY KEY AUTOINCREMENT, transactional_id TEXT UNIQUE,
    epoch INTEGER NOT NULL DEFAULT 0, txn_timeout_ms INTEGER, current_txn INTEGER,
    created_ms INTEGER NOT NULL);
CREATE TABLE producer_parts (
    producer INTEGER NOT NULL, part INTEGER NOT NULL, epoch INTEGER NOT NULL,
    base_seq INTEGER NOT NULL, count INTEGER NOT NULL, base_offset INTEGER NOT NULL,
    PRIMARY KEY (producer, part)) WITHOUT ROWID;
CREATE TABLE txns (
    id INTEGER PRIMARY KEY AUTOINCREMENT, producer INTEGER NOT NULL, epoch INTEGER NOT NULL,
    state TEXT NOT NULL, started_ms INTEGER NOT NULL, deadline_ms INTEGER NOT NULL,
    ended_ms INTEGER);
CREATE TABLE txn_parts (
    part INTEGER NOT NULL, txn INTEGER NOT NULL, first_offset INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL, PRIMARY KEY (part, txn)) WITHOUT ROWID;
CREATE INDEX txn_parts_by_txn ON txn_parts (txn);
CREATE TABLE txn_offsets (
    txn INTEGER NOT NULL, group_id TEXT NOT NULL, topic TEXT NOT NULL,
    partition INTEGER NOT NULL, off INTEGER NOT NULL, generation INTEGER NOT NULL,
    member_id TEXT NOT NULL, PRIMARY KEY (txn, group_id, topic, partition)) WITHOUT ROWID;
CREATE TABLE groups (
    id TEXT PRIMARY KEY, generation INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL,
    assignor TEXT NOT NULL, rebalance_deadline_ms INTEGER NOT NULL DEFAULT 0);
CREATE TABLE members (
    group_id TEXT NOT NULL, member_id TEXT NOT NULL, client_id TEXT NOT NULL,
    topics TEXT NOT NULL, session_timeout_ms INTEGER NOT NULL,
    rebalance_timeout_ms INTEGER NOT NULL, heartbeat_ms INTEGER NOT NULL,
    joined INTEGER NOT NULL, generation INTEGER NOT NULL, assignment TEXT NOT NULL,
    PRIMARY KEY (group_id, member_id)) WITHOUT ROWID;
CREATE TABLE offsets (
    group_id TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
    off INTEGER NOT NULL, commit_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic, partition)) WITHOUT ROWID;
"""
    + _NOTES_DDL
)


@contextlib.contextmanager
def translate(path: Path | str) -> Iterator[None]:
    """SQLite's errors in the project's terms: busy, a full disk and an I/O error are
    retriable (nothing of the write landed); corrupt, not-a-database and
    read-only are :class:`EngineFileError`; anything else a :class:`LogError`."""
    try:
        yield
    except sqlite3.Error as e:
        raise _translated(e, path) from e


_BY_CODE: dict[int, tuple[type[AssuredError], str]] = {
    5: (RetriableError, "engine file {path} is busy ({e}); retry"),  # SQLITE_BUSY
    6: (RetriableError, "engine file {path} is locked ({e}); retry"),  # SQLITE_LOCKED
    8: (EngineFileError, "engine file {path} is read-only ({e}); make it writable"),
    11: (  # SQLITE_CORRUPT
        EngineFileError,
        "engine file {path} is corrupt ({e}). Nothing more was written to it; restore it "
        "from a copy, or move it aside and start a new one.",
    ),
    # The storage's failures, not a record's: what was being written was rolled back whole,
    # and is written again once there is room (retriable, within the runtime's deadline).
    10: (RetriableError, "engine file {path}: I/O error ({e}); the write was rolled back"),
    13: (
        RetriableError,
        "the disk holding {path} is full ({e}); the write was rolled back, to be retried once "
        "there is room",
    ),
    14: (EngineFileError, "cannot open engine file {path} ({e}); check the path"),
    26: (  # SQLITE_NOTADB
        EngineFileError,
        "{path} is not an assured engine file (it is not a SQLite database at all). "
        "It was left untouched; give the engine another path.",
    ),
}


def _translated(e: sqlite3.Error, path: Path | str) -> Exception:
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF
    cls, template = _BY_CODE.get(code, (LogError, "engine file {path}: {e}"))
    return cls(template.format(path=path, e=e))


def _check_path(path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise EngineFileError(
            f"folder {folder} does not exist; create it, or give the engine another path"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EngineFileError(
            f"folder {folder} is read-only; the engine writes its file and the -wal/-shm files "
            "beside it there. Choose a writable folder."
        )
    if path.is_dir():
        raise EngineFileError(f"{path} is a folder, not an engine file")
    # The header is not read here with open()/close(): closing any descriptor of the file
    # drops every POSIX lock this process holds on it, under the feet of SQLite's other
    # connections, which corrupts the database. SQLite itself says "not a database".


def connect(
    path: Path, durability: Durability = "normal", busy_timeout: float = 30.0, create: bool = True
) -> sqlite3.Connection:
    """A connection to the engine file at ``path``, creating the file if new (with
    ``create=False``, a missing or empty file is refused and nothing is made)."""
    if not create and not path.exists():
        raise ConfigError(
            f"engine file {path} does not exist; check the path, or make a log there first "
            f"(assured topic create NAME -b embedded://{path}, or an App)"
        )
    _check_path(path)
    # mode=rw: SQLite itself will not create the file, even if it vanished since the look.
    target = path if create else f"file:{quote(str(path))}?mode=rw"
    with translate(path):
        conn = sqlite3.connect(
            target,
            timeout=busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            uri=not create,
        )
    try:
        with translate(path):
            _validate_or_create(conn, path, create)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
            conn.execute("PRAGMA cache_size=-32768")  # 32 MiB
            conn.execute("PRAGMA temp_store=MEMORY")
            # Reads come straight from the OS page cache instead of being copied into
            # SQLite's own: consumers read ~1.5x faster.
            conn.execute("PRAGMA mmap_size=268435456")
    except BaseException:
        conn.close()
        raise
    return conn


def _validate_or_create(conn: sqlite3.Connection, path: Path, create: bool = True) -> None:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables and not create:
        raise EngineFileError(
            f"{path} is empty, not an assured engine file. It was left untouched; check the "
            "path, or make a log there first (assured topic create, or an App)."
        )
    if not tables:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have created it between our look and our lock.
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                for statement in filter(str.strip, _DDL.split(";")):
                    conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("format", FORMAT), ("schema_version", str(SCHEMA_VERSION))],
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return
    if "meta" not in tables:
        raise EngineFileError(
            f"{path} is a SQLite database, but not an assured engine file. "
            "It was left untouched; give the engine another path."
        )
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("format") != FORMAT:
        raise EngineFileError(
            f"{path} is a SQLite database, but not an assured engine file "
            f"(format {meta.get('format')!r}). It was left untouched."
        )
    version = int(meta.get("schema_version", "0"))
    if version > SCHEMA_VERSION:
        raise EngineFileError(
            f"{path} was written by a newer assured (schema {version}; this one reads up to "
            f"{SCHEMA_VERSION}). Upgrade assured to open it; the file was not modified."
        )
    if version < SCHEMA_VERSION:
        _upgrade(conn)
    if "offset_notes" not in tables:  # a file made before offset metadata
        conn.execute(_NOTES_DDL)


def _upgrade(conn: sqlite3.Connection) -> None:
    """Schema 1 (a row per record) to 2 (record batches), in one transaction: every record
    keeps its offset, timestamp, key, value, headers and transaction state."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if int(version) == 1:  # not upgraded by another process meanwhile
            conn.execute(_DDL[_DDL.index("CREATE TABLE batches") :].split(";", maxsplit=1)[0])
            rows = conn.execute("SELECT id, ts, key, value, headers, txn FROM records ORDER BY id")
            conn.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?)", _as_batches(rows))
            # Counted afresh: schema 1's retention subtracted markers' bytes it never added.
            conn.execute(
                "UPDATE partitions SET bytes = (SELECT ifnull(sum(b.bytes), 0) FROM batches b "
                "WHERE b.id >= partitions.id << ? AND b.id < (partitions.id + 1) << ?)",
                (OFFSET_BITS, OFFSET_BITS),
            )
            conn.execute("DROP TABLE records")
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _as_batches(rows: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """Schema 1's record rows, in id order, as schema 2's batch rows: runs of consecutive
    offsets of one partition in one transaction state (each marker alone), stored as
    :func:`~assured.log.embedded._batches.table_rows` stores an append."""
    run: list[Row] = []
    first = txn = 0
    for row_id, ts, key, value, headers, row_txn in rows:
        if run and (
            row_id != first + len(run)
            or row_txn != txn
            or row_txn == 0
            or len(run) >= MAX_BATCH_RECORDS
            or row_id >> OFFSET_BITS != first >> OFFSET_BITS
        ):
            yield from _stored(first, txn, run)
            run = []
        if not run:
            first, txn = row_id, row_txn
        run.append((ts, key, value, headers))
    if run:
        yield from _stored(first, txn, run)


def _stored(first: int, txn: int | None, run: list[Row]) -> Iterator[tuple[Any, ...]]:
    size = 0 if txn == 0 else sum(map(row_size, run))  # markers count for no bytes
    return table_rows(first, run, size, txn)
