"""The embedded engine's state transitions: every read and write of the engine file.

One :class:`Engine` wraps one SQLite connection (each client has its own; any number of them,
in any number of processes, share the file). Every method that changes state runs in one
SQLite write transaction, so it happens whole or not at all, whatever crashes.

Kafka's model, table by table (see ``_schema.py``): topics and partitions with dense offsets;
records, stored in batches (``_batches.py``); producers with epochs and per-partition sequences
(idempotence); transactions whose batches carry the transaction's id, with markers that take
an offset on commit and abort;
consumer groups with generations; committed offsets.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import sqlite3
import time
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

from assured.errors import (
    InvalidTopicError,
    LogError,
    ProducerFencedError,
    SequenceError,
    StaleGenerationError,
    TransactionTimedOutError,
    UnknownTopicError,
)
from assured.log._models import Record, TopicPartition, decode_headers, encode_headers
from assured.log._names import check_topic_name, collides
from assured.log.assignors import ASSIGNORS
from assured.log.embedded import _batches
from assured.log.embedded._batches import Row
from assured.log.embedded._schema import (
    OFFSET_BITS,
    Durability,
    _translated,
    connect,
    rid,
    translate,
)

__all__ = [
    "OFFSET_BITS",
    "Engine",
    "GroupView",
    "TopicInfo",
    "check_new_topic",
    "decode_headers",
    "encode_headers",
    "now_ms",
    "rid",
]

DEFAULT_TOPIC_CONFIG = {
    "retention.ms": "604800000",  # 7 days, Kafka's default
    "retention.bytes": "-1",
    # The one record size limit (key + value + headers) unless a producer sets a lower
    # message.max.bytes: what describe shows is what send enforces. Kafka's broker says
    # 1,048,588, but counts a batch's overhead too, and its clients stop at 1,000,000.
    "max.message.bytes": "1000000",
    "cleanup.policy": "delete",
}
_MARKER_COMMIT = b"COMMIT"
_MARKER_ABORT = b"ABORT"
_make_record = functools.partial(tuple.__new__, Record)


def check_new_topic(name: str, partitions: int, config: Mapping[str, str] | None) -> dict[str, str]:
    """A new topic's name, partition count and config checked (an :class:`InvalidTopicError`
    if wrong; no file is needed for that); returns its config with the defaults filled in."""
    check_topic_name(name)
    if partitions < 1:
        raise InvalidTopicError(f"topic {name!r} needs at least one partition, not {partitions}")
    merged = {**DEFAULT_TOPIC_CONFIG, **{k: str(v) for k, v in (config or {}).items()}}
    unknown = set(merged) - set(DEFAULT_TOPIC_CONFIG) - {"min.insync.replicas"}
    if unknown:
        raise InvalidTopicError(
            f"unknown topic config {sorted(unknown)}; the embedded engine knows "
            f"{sorted(DEFAULT_TOPIC_CONFIG)}"
        )
    for key in ("retention.ms", "retention.bytes", "max.message.bytes"):
        try:
            int(merged[key])
        except ValueError:
            raise InvalidTopicError(f"topic config {key}={merged[key]!r} is not a number") from None
    return merged


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class TopicInfo:
    id: int
    name: str
    part_ids: tuple[int, ...]  # index = partition number
    config: dict[str, str]

    @property
    def partitions(self) -> int:
        return len(self.part_ids)


@dataclass(frozen=True, slots=True)
class GroupView:
    """One member's view of its group, read in one transaction."""

    state: str  # empty | preparing | stable
    generation: int
    member_exists: bool
    joined: bool
    member_generation: int
    assignment: tuple[TopicPartition, ...]


class Engine:
    """One connection to an engine file, and every operation on it."""

    def __init__(
        self,
        path: Path,
        durability: Durability = "normal",
        busy_timeout: float = 30.0,
        create: bool = True,
    ):
        self.path = path
        self.conn = connect(path, durability, busy_timeout, create)
        self._busy_ms = int(busy_timeout * 1000)
        self._topics: dict[str, TopicInfo] = {}
        self._depth = 0

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    # -- transactions --------------------------------------------------------------------------

    @contextlib.contextmanager
    def write(self, timeout: float | None = None) -> Iterator[sqlite3.Connection]:
        """One SQLite write transaction (nested calls join the outer one). Waits for the write
        lock up to the busy timeout, or up to ``timeout`` seconds if that is shorter; then
        raises a retriable error, having done nothing."""
        if self._depth:
            self._depth += 1
            try:
                yield self.conn
            finally:
                self._depth -= 1
            return
        self._begin(timeout)
        self._depth = 1
        try:
            yield self.conn
        except BaseException as e:
            self._depth = 0
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                # A statement of the write failed (a full disk, an I/O error): the engine's
                # failure in the project's terms, never a raw error a caller could take for a
                # record's.
                raise _translated(e, self.path) from e
            raise
        self._depth = 0
        try:
            with translate(self.path):
                self.conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise

    def _begin(self, timeout: float | None) -> None:
        wait_ms = self._busy_ms if timeout is None else max(0, int(timeout * 1000))
        # SQLite's busy handler sleeps in steps of up to 100 ms: a wait that close to the
        # connection's own is the connection's own (and costs no PRAGMA).
        if wait_ms > self._busy_ms - 100:
            with translate(self.path):
                self.conn.execute("BEGIN IMMEDIATE")
            return
        # A shorter wait than the connection's, for this BEGIN only: that is where the write
        # lock is waited for.
        with translate(self.path):
            self.conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            finally:
                self.conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """One consistent snapshot for several reads."""
        if self._depth:
            yield self.conn
            return
        with translate(self.path):
            self.conn.execute("BEGIN")
        self._depth = 1
        try:
            with translate(self.path):
                yield self.conn
        finally:
            self._depth = 0
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("COMMIT")

    def data_version(self) -> int:
        """Changes when any other connection commits; cheap (no disk read)."""
        with translate(self.path):
            return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    # -- topics --------------------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int, config: Mapping[str, str] | None) -> None:
        merged = check_new_topic(name, partitions, config)
        with self.write() as c:
            existing = [r[0] for r in c.execute("SELECT name FROM topics")]
            if name in existing:
                raise InvalidTopicError(f"topic {name!r} already exists")
            other = collides(name, existing)
            if other:
                raise InvalidTopicError(
                    f"topic {name!r} collides with existing topic {other!r} "
                    "(Kafka treats '.' and '_' alike in topic names)"
                )
            # A topic's id is never reused, not even for one made again in the same
            # millisecond: it names the topic's incarnation (SQLite would hand the row id of a
            # deleted last topic out again). The highest id ever given is kept in meta.
            (top,) = c.execute("SELECT max(id) FROM topics").fetchone()
            given = c.execute("SELECT value FROM meta WHERE key = 'topic_seq'").fetchone()
            topic_id = max(top or 0, int(given[0]) if given else 0) + 1
            c.execute(
                "INSERT INTO topics (id, name, partitions, config, created_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (topic_id, name, partitions, json.dumps(merged, sort_keys=True), now_ms()),
            )
            c.execute("INSERT OR REPLACE INTO meta VALUES ('topic_seq', ?)", (str(topic_id),))
            c.executemany(
                "INSERT INTO partitions (topic_id, partition) VALUES (?, ?)",
                [(topic_id, p) for p in range(partitions)],
            )

    def delete_topic(self, name: str) -> None:
        with self.write() as c:
            info = self._load_topic(name)
            if info is None:
                raise UnknownTopicError(f"topic {name!r} does not exist")
            for part in info.part_ids:
                c.execute(
                    "DELETE FROM batches WHERE id >= ? AND id < ?", (rid(part, 0), rid(part + 1, 0))
                )
                c.execute("DELETE FROM txn_parts WHERE part = ?", (part,))
                c.execute("DELETE FROM producer_parts WHERE part = ?", (part,))
            c.execute("DELETE FROM partitions WHERE topic_id = ?", (info.id,))
            c.execute("DELETE FROM topics WHERE id = ?", (info.id,))
            c.execute("DELETE FROM offsets WHERE topic = ?", (name,))
            c.execute("DELETE FROM offset_notes WHERE topic = ?", (name,))
        self._topics.pop(name, None)

    def list_topics(self) -> list[str]:
        with translate(self.path):
            return [r[0] for r in self.conn.execute("SELECT name FROM topics ORDER BY name")]

    def topic(self, name: str, refresh: bool = False) -> TopicInfo | None:
        if not refresh and name in self._topics:
            return self._topics[name]
        with translate(self.path):
            info = self._load_topic(name)
        if info is None:
            self._topics.pop(name, None)
        else:
            self._topics[name] = info
        return info

    def require_topic(self, name: str, refresh: bool = False) -> TopicInfo:
        info = self.topic(name, refresh)
        if info is None:
            raise UnknownTopicError(f"topic {name!r} does not exist; create it first")
        return info

    def part_id(self, tp: TopicPartition) -> int:
        info = self.require_topic(tp.topic)
        if not 0 <= tp.partition < info.partitions:
            info = self.require_topic(tp.topic, refresh=True)
            if not 0 <= tp.partition < info.partitions:
                raise UnknownTopicError(
                    f"topic {tp.topic!r} has partitions 0..{info.partitions - 1}; "
                    f"there is no partition {tp.partition}"
                )
        return info.part_ids[tp.partition]

    def _load_topic(self, name: str) -> TopicInfo | None:
        row = self.conn.execute("SELECT id, config FROM topics WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        parts = self.conn.execute(
            "SELECT id FROM partitions WHERE topic_id = ? ORDER BY partition", (row[0],)
        ).fetchall()
        return TopicInfo(row[0], name, tuple(p[0] for p in parts), json.loads(row[1]))

    # -- offsets of a partition ----------------------------------------------------------------

    def watermarks(self, part: int) -> tuple[int, int, int]:
        """(log start, high watermark, last stable offset) of ``part``; aborts transactions on
        it that outlived their timeout first, so a crashed producer never blocks readers."""
        self.abort_expired(part)
        with self.read() as c:
            row = c.execute(
                "SELECT log_start, next_offset FROM partitions WHERE id = ?", (part,)
            ).fetchone()
            if row is None:
                raise UnknownTopicError(f"partition {part} was deleted")
            first_open = c.execute(
                "SELECT MIN(first_offset) FROM txn_parts WHERE part = ?", (part,)
            ).fetchone()[0]
        low, high = row
        return low, high, high if first_open is None else first_open

    def abort_expired(self, part: int | None = None, now: int | None = None) -> int:
        """Abort open transactions past their deadline (on ``part``, or anywhere)."""
        now = now_ms() if now is None else now
        where, args = ("part = ? AND", (part,)) if part is not None else ("", ())
        with translate(self.path):
            expired = self.conn.execute(
                f"SELECT DISTINCT txn FROM txn_parts WHERE {where} deadline_ms < ?",  # noqa: S608
                (*args, now),
            ).fetchall()
        if not expired:
            return 0
        with self.write():
            for (txn,) in expired:
                self._abort_txn(txn, now, timed_out=True)
        return len(expired)

    # -- producing -----------------------------------------------------------------------------

    def new_producer(self, transactional_id: str | None = None) -> int:
        with self.write() as c:
            cur = c.execute(
                "INSERT INTO producers (transactional_id, created_ms) VALUES (?, ?)",
                (transactional_id, now_ms()),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def _check_sequence(self, part: int, producer: tuple[int, int, int], count: int) -> int | None:
        """The base offset if this batch was written already, None if it is the next one;
        fenced or out of order otherwise."""
        pid, epoch, base_seq = producer
        last = self.conn.execute(
            "SELECT epoch, base_seq, count, base_offset FROM producer_parts "
            "WHERE producer = ? AND part = ?",
            (pid, part),
        ).fetchone()
        if last is None:
            if base_seq != 0:
                raise SequenceError(
                    f"producer {pid}'s first batch to partition {part} has sequence {base_seq}"
                )
            return None
        l_epoch, l_base, l_count, l_offset = last
        if epoch < l_epoch:
            raise ProducerFencedError(
                f"producer {pid} epoch {epoch} is older than epoch {l_epoch} that wrote "
                "to this partition last; a newer instance took over"
            )
        if epoch > l_epoch:
            if base_seq != 0:
                raise SequenceError(f"a new epoch must start at sequence 0, not {base_seq}")
            return None
        if base_seq == l_base and count == l_count:
            return int(l_offset)
        if base_seq != l_base + l_count:
            raise SequenceError(
                f"producer {pid} sent sequence {base_seq} to partition {part}, "
                f"expected {l_base + l_count}; records may be missing or reordered"
            )
        return None

    def next_sequence(self, pid: int, epoch: int, part: int) -> int:
        """The base sequence that producer ``pid`` at ``epoch`` writes next to ``part``: the one
        after the last batch the engine holds from it there, or 0 (its first batch, or its first
        at a new epoch; an older epoch than the engine's is fenced by :meth:`append`). Call
        inside :meth:`write`."""
        row = self.conn.execute(
            "SELECT epoch, base_seq, count FROM producer_parts WHERE producer = ? AND part = ?",
            (pid, part),
        ).fetchone()
        if row is None or row[0] != epoch:
            return 0
        return int(row[1] + row[2])

    def append(
        self,
        part: int,
        rows: Sequence[Row],
        producer: tuple[int, int, int] | None = None,
        txn: int | None = None,
        size: int | None = None,
    ) -> tuple[int, bool]:
        """Append ``rows`` (ts, key, value, encoded headers) to ``part`` as record batches;
        returns (base offset, duplicate). ``size`` is their bytes (key + value + headers) if the
        caller knows it. ``producer`` = (producer id, epoch, base sequence) turns on
        idempotence: a batch whose sequence was already written returns its first offset and
        appends nothing. Call inside :meth:`write`."""
        c = self.conn
        if not rows:  # nothing to write: the offset the next record will get
            row = c.execute("SELECT next_offset FROM partitions WHERE id = ?", (part,)).fetchone()
            if row is None:
                raise UnknownTopicError(f"the topic of partition {part} was deleted")
            return int(row[0]), False
        if producer is not None:
            written = self._check_sequence(part, producer, len(rows))
            if written is not None:
                return written, True  # a resend of the last batch: already written
        if size is None:
            size = sum(map(_batches.row_size, rows))
        row = c.execute(
            "UPDATE partitions SET next_offset = next_offset + ?, bytes = bytes + ? "
            "WHERE id = ? RETURNING next_offset",
            (len(rows), size, part),
        ).fetchone()
        if row is None:
            raise UnknownTopicError(f"the topic of partition {part} was deleted")
        base = row[0] - len(rows)
        c.executemany(
            "INSERT INTO batches (id, last, max_ts, bytes, txn, data) VALUES (?, ?, ?, ?, ?, ?)",
            _batches.table_rows(rid(part, base), rows, size, txn),
        )
        if producer is not None:
            c.execute(
                "INSERT OR REPLACE INTO producer_parts VALUES (?, ?, ?, ?, ?, ?)",
                (producer[0], part, producer[1], producer[2], len(rows), base),
            )
        return base, False

    def _marker(self, part: int, marker: bytes, now: int) -> None:
        row = self.conn.execute(
            "UPDATE partitions SET next_offset = next_offset + 1 WHERE id = ? "
            "RETURNING next_offset",
            (part,),
        ).fetchone()
        if row is not None:  # a batch of its own, counting for no bytes
            self.conn.executemany(
                "INSERT INTO batches (id, last, max_ts, bytes, txn, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                _batches.table_rows(rid(part, row[0] - 1), [(now, None, marker, None)], 0, 0),
            )

    # -- transactions --------------------------------------------------------------------------

    def init_transactions(self, transactional_id: str, timeout_ms: int) -> tuple[int, int]:
        """(producer id, epoch) for ``transactional_id``. The epoch goes up by one, fencing any
        older instance, and its open transaction is aborted."""
        now = now_ms()
        with self.write() as c:
            row = c.execute(
                "SELECT id, epoch, current_txn FROM producers WHERE transactional_id = ?",
                (transactional_id,),
            ).fetchone()
            if row is None:
                cur = c.execute(
                    "INSERT INTO producers (transactional_id, epoch, txn_timeout_ms, created_ms) "
                    "VALUES (?, 0, ?, ?)",
                    (transactional_id, timeout_ms, now),
                )
                assert cur.lastrowid is not None
                return cur.lastrowid, 0
            pid, epoch, current = row
            if current is not None:
                self._abort_txn(current, now)
            c.execute(
                "UPDATE producers SET epoch = ?, current_txn = NULL, txn_timeout_ms = ? "
                "WHERE id = ?",
                (epoch + 1, timeout_ms, pid),
            )
            return pid, epoch + 1

    def _check_epoch(self, pid: int, epoch: int) -> int | None:
        """The producer's open transaction id; fenced if ``epoch`` is no longer current."""
        row = self.conn.execute(
            "SELECT epoch, current_txn FROM producers WHERE id = ?", (pid,)
        ).fetchone()
        if row is None or row[0] != epoch:
            raise ProducerFencedError(
                f"producer {pid} with epoch {epoch} was fenced: a newer instance with the same "
                "transactional id called init_transactions. Stop this instance."
            )
        current: int | None = row[1]
        return current

    def txn_begin_or_check(self, pid: int, epoch: int, txn: int | None) -> int:
        """The producer's open transaction, started now if ``txn`` is None. Call inside
        :meth:`write`."""
        current = self._check_epoch(pid, epoch)
        if txn is not None:
            if current != txn:
                raise TransactionTimedOutError(
                    f"transaction {txn} ran past its timeout and was aborted; abort_transaction(), "
                    "rewind and begin again"
                )
            return txn
        if current is not None:  # left open by a crash of this same instance: not ours to keep
            self._abort_txn(current, now_ms())
        now = now_ms()
        (timeout,) = self.conn.execute(
            "SELECT txn_timeout_ms FROM producers WHERE id = ?", (pid,)
        ).fetchone()
        cur = self.conn.execute(
            "INSERT INTO txns (producer, epoch, state, started_ms, deadline_ms) "
            "VALUES (?, ?, 'open', ?, ?)",
            (pid, epoch, now, now + timeout),
        )
        assert cur.lastrowid is not None
        self.conn.execute("UPDATE producers SET current_txn = ? WHERE id = ?", (cur.lastrowid, pid))
        return cur.lastrowid

    def txn_add_part(self, txn: int, part: int, first_offset: int) -> None:
        """Note that ``txn`` wrote to ``part`` from ``first_offset`` (the LSO stops there)."""
        self.conn.execute(
            "INSERT OR IGNORE INTO txn_parts (part, txn, first_offset, deadline_ms) "
            "SELECT ?, ?, ?, deadline_ms FROM txns WHERE id = ?",
            (part, txn, first_offset, txn),
        )

    def txn_add_offsets(
        self,
        txn: int,
        group_id: str,
        generation: int,
        member_id: str,
        offsets: Mapping[TopicPartition, int],
    ) -> None:
        self._check_generation(group_id, generation, member_id)
        self.conn.executemany(
            "INSERT OR REPLACE INTO txn_offsets VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (txn, group_id, tp.topic, tp.partition, off, generation, member_id)
                for tp, off in offsets.items()
            ],
        )

    def commit_txn(self, pid: int, epoch: int, txn: int, timeout: float | None = None) -> None:
        """Commit ``txn``: markers on its partitions, and its consumer offsets, at once. All or
        nothing; committing a transaction that already committed does nothing more, so a
        commit whose outcome was not heard may be tried again."""
        now = now_ms()
        with self.write(timeout) as c:
            try:
                self.txn_begin_or_check(pid, epoch, txn)
            except TransactionTimedOutError:
                if self._txn_state(pid, epoch, txn) == "committed":
                    return
                raise
            pending = c.execute(
                "SELECT DISTINCT group_id, generation, member_id FROM txn_offsets WHERE txn = ?",
                (txn,),
            ).fetchall()
            for group_id, generation, member_id in pending:
                self._check_generation(group_id, generation, member_id)
            for (part,) in c.execute("SELECT part FROM txn_parts WHERE txn = ?", (txn,)).fetchall():
                self._marker(part, _MARKER_COMMIT, now)
            c.execute(
                "INSERT OR REPLACE INTO offsets (group_id, topic, partition, off, commit_ms) "
                "SELECT group_id, topic, partition, off, ? FROM txn_offsets WHERE txn = ?",
                (now, txn),
            )
            self._end_txn(txn, "committed", now)

    def _txn_state(self, pid: int, epoch: int, txn: int) -> str | None:
        row = self.conn.execute(
            "SELECT state FROM txns WHERE id = ? AND producer = ? AND epoch = ?", (txn, pid, epoch)
        ).fetchone()
        return None if row is None else str(row[0])

    def abort_txn(self, pid: int, epoch: int, txn: int, timeout: float | None = None) -> None:
        with self.write(timeout):
            current = self._check_epoch(pid, epoch)
            if current == txn:
                self._abort_txn(txn, now_ms())

    def _abort_txn(self, txn: int, now: int, timed_out: bool = False) -> None:
        c = self.conn
        for part, first in c.execute(
            "SELECT part, first_offset FROM txn_parts WHERE txn = ?", (txn,)
        ).fetchall():
            c.execute(
                "UPDATE batches SET txn = -txn WHERE id >= ? AND id < ? AND txn = ?",
                (rid(part, first), rid(part + 1, 0), txn),
            )
            self._marker(part, _MARKER_ABORT, now)
        self._end_txn(txn, "timed-out" if timed_out else "aborted", now)

    def _end_txn(self, txn: int, state: str, now: int) -> None:
        c = self.conn
        c.execute("DELETE FROM txn_parts WHERE txn = ?", (txn,))
        c.execute("DELETE FROM txn_offsets WHERE txn = ?", (txn,))
        c.execute("UPDATE txns SET state = ?, ended_ms = ? WHERE id = ?", (state, now, txn))
        c.execute("UPDATE producers SET current_txn = NULL WHERE current_txn = ?", (txn,))

    # -- fetching ------------------------------------------------------------------------------

    def fetch(
        self,
        tp: TopicPartition,
        part: int,
        position: int,
        upper: int,
        limit: int,
        committed_only: bool,
    ) -> tuple[list[Record], int]:
        """Up to ``limit`` records of ``part`` (``tp``) from offset ``position`` up to
        ``upper``, and the position after them. Markers, and with ``committed_only`` aborted
        records, take offsets but are never returned. Call inside :meth:`read`."""
        visible = "(txn IS NULL OR txn > 0)" if committed_only else "(txn IS NULL OR txn <> 0)"
        batches = self._batches_from(part, position, "data", f"AND {visible}", end=upper)
        out: list[Record] = []
        topic, partition = tp
        # Thousands of new tuples would wake the cyclic collector again and again: it is
        # paused while they are built.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for first, last, data in batches:
                ts, keys, values, headers = _batches.decode(data, tp, first, last - first + 1)
                skip = position - first if first < position else 0
                take = min(last - first + 1 - skip, limit - len(out))
                end = skip + take
                out += map(
                    _make_record,
                    zip(
                        repeat(topic),
                        repeat(partition),
                        range(first + skip, first + end),
                        ts[skip:end],
                        repeat(None) if keys is None else keys[skip:end],
                        values[skip:end],
                        repeat(None) if headers is None else headers[skip:end],
                    ),
                )
                if len(out) >= limit:
                    return out, first + end
        finally:
            if collecting:
                gc.enable()
            batches.close()
        return out, upper  # everything below `upper` was read

    def _holding(self, base: int, start: int) -> int:
        """The id of the batch that holds row id ``start`` (the last one that begins at or
        before it), or ``start`` if none does."""
        (held,) = self.conn.execute(
            "SELECT max(id) FROM batches WHERE id >= ? AND id <= ?", (base, start)
        ).fetchone()
        return start if held is None else int(held)

    def bounds(self, part: int) -> tuple[int, int, int, int | None]:
        """(log start, high watermark, LSO, earliest open-transaction deadline) of ``part``.
        Call inside :meth:`read`."""
        row = self.conn.execute(
            "SELECT log_start, next_offset FROM partitions WHERE id = ?", (part,)
        ).fetchone()
        if row is None:
            raise UnknownTopicError(f"partition {part} was deleted")
        first_open, deadline = self.conn.execute(
            "SELECT MIN(first_offset), MIN(deadline_ms) FROM txn_parts WHERE part = ?", (part,)
        ).fetchone()
        return row[0], row[1], row[1] if first_open is None else first_open, deadline

    # -- retention -----------------------------------------------------------------------------

    def enforce_retention(self, now: int | None = None, wait: float | None = None) -> int:
        """Delete records past their topic's retention.ms or retention.bytes, oldest first and
        never at or above the LSO. Returns how many records went. Each partition is one write,
        which waits for the write lock up to the busy timeout, or up to ``wait`` seconds if
        given; past that a retriable error, with the partitions done so far done."""
        now = now_ms() if now is None else now
        removed = 0
        for name in self.list_topics():
            info = self.topic(name, refresh=True)
            if info is None:
                continue
            ms, max_bytes = int(info.config["retention.ms"]), int(info.config["retention.bytes"])
            if ms < 0 and max_bytes < 0:
                continue
            for part in info.part_ids:
                removed += self._retain(part, now - ms if ms >= 0 else None, max_bytes, wait)
        return removed

    def _retain(
        self, part: int, oldest_ts: int | None, max_bytes: int, wait: float | None = None
    ) -> int:
        """Move ``part``'s log start past what its retention lets go, record by record (a
        batch's row goes once its last record has); returns how many offsets went. Whole
        batches are judged by their row's ``max_ts`` and ``bytes``; only a batch that a cut
        falls inside is decoded."""
        with self.write(wait) as c:
            low, _high, lso, _ = self.bounds(part)
            cut = low
            if oldest_ts is not None:  # up to the first record that is recent enough
                cut = self._first_recent(part, low, oldest_ts, lso)
            if max_bytes >= 0:
                (total,) = c.execute(
                    "SELECT bytes FROM partitions WHERE id = ?", (part,)
                ).fetchone()
                over = total - self._bytes_between(part, low, cut) - max_bytes
                if over > 0:
                    cut = self._cut_by_bytes(part, cut, over)
            cut = min(cut, lso)
            if cut <= low:
                return 0
            gone_bytes = self._bytes_between(part, low, cut)
            c.execute(  # whole batches only: one that straddles the cut stays, read from `cut`
                "DELETE FROM batches WHERE id >= ? AND id < ? AND last < ?",
                (rid(part, 0), rid(part, cut), rid(part, cut)),
            )
            c.execute(
                "UPDATE partitions SET log_start = ?, bytes = bytes - ? WHERE id = ?",
                (cut, gone_bytes, part),
            )
            return cut - low

    def _batches_from(
        self,
        part: int,
        offset: int,
        columns: str,
        where: str = "",
        *args: int,
        end: int | None = None,
    ) -> Generator[Any, None, None]:
        """(first offset, last offset, ``columns``...) of ``part``'s batches that hold
        ``offset`` or come after it, up to offset ``end`` if given (``where`` with ``args``
        adds a condition), in order, one by one: blobs are read only as far as the caller
        goes. The first batch may begin before ``offset``: the scan starts at the batch that
        holds it (an index lookup)."""
        base = rid(part, 0)
        start = base + offset
        cursor = self.conn.execute(
            f"SELECT id - ?, last - ?, {columns} FROM batches "  # noqa: S608 - our own columns
            f"WHERE id >= ? AND id < ? AND last >= ? {where} ORDER BY id",
            (
                base,
                base,
                self._holding(base, start),
                rid(part + 1, 0) if end is None else base + end,
                start,
                *args,
            ),
        )
        try:
            yield from cursor
        finally:
            cursor.close()

    def _first_recent(self, part: int, low: int, oldest_ts: int, default: int) -> int:
        """The offset of ``part``'s first record at or after ``low`` with a timestamp of
        ``oldest_ts`` or later; ``default`` if there is none."""
        for first, _last, data in self._batches_from(
            part, low, "data", "AND max_ts >= ?", oldest_ts
        ):
            for off, row in enumerate(_batches.iter_rows(data, f"partition {part}", first), first):
                if off >= low and row[0] >= oldest_ts:
                    return off
        return default

    def _cut_by_bytes(self, part: int, cut: int, over: int) -> int:
        """``cut`` moved on, record by record from ``cut``, until ``over`` bytes are gone."""
        for first, last, size, txn, data in self._batches_from(part, cut, "bytes, txn, data"):
            if first >= cut and size < over:  # the whole batch goes, undecoded
                over -= size
                cut = last + 1
                continue
            for off, row in enumerate(_batches.iter_rows(data, f"partition {part}", first), first):
                if off < cut:
                    continue
                if over <= 0:
                    return cut
                over -= 0 if txn == 0 else _batches.row_size(row)
                cut = off + 1
            if over <= 0:
                return cut
        return cut

    def _bytes_between(self, part: int, start: int, end: int) -> int:
        """The bytes of ``part``'s records from offset ``start`` up to ``end``: the batches
        wholly inside by their rows' sums, the (at most two) that the bounds cut by decoding."""
        if end <= start:
            return 0
        base = rid(part, 0)
        lo, hi = base + start, base + end
        (total,) = self.conn.execute(
            "SELECT ifnull(sum(bytes), 0) FROM batches WHERE id >= ? AND id < ? AND last < ?",
            (lo, hi, hi),
        ).fetchone()
        cut_batches = self.conn.execute(
            "SELECT id - ?, data FROM batches "
            "WHERE id >= ? AND id < ? AND last >= ? AND (id < ? OR last >= ?) "
            "AND (txn IS NULL OR txn <> 0)",  # markers count for no bytes
            (base, self._holding(base, lo), hi, lo, lo, hi),
        ).fetchall()
        for first, data in cut_batches:
            rows = enumerate(_batches.iter_rows(data, f"partition {part}", first), first)
            total += sum(_batches.row_size(row) for off, row in rows if start <= off < end)
        return int(total)

    # -- consumer groups -----------------------------------------------------------------------

    def join_group(
        self,
        group_id: str,
        member_id: str,
        client_id: str,
        topics: Sequence[str],
        session_timeout_ms: int,
        rebalance_timeout_ms: int,
        assignor: str,
    ) -> None:
        now = now_ms()
        with self.write() as c:
            c.execute(
                "INSERT OR IGNORE INTO groups (id, generation, state, assignor) "
                "VALUES (?, 0, 'empty', ?)",
                (group_id, assignor),
            )
            c.execute(
                "INSERT INTO members VALUES (?, ?, ?, ?, ?, ?, ?, 1, -1, '[]')",
                (
                    group_id,
                    member_id,
                    client_id,
                    json.dumps(sorted(topics)),
                    session_timeout_ms,
                    rebalance_timeout_ms,
                    now,
                ),
            )
            self._prepare_rebalance(group_id, now)
            self._try_complete(group_id, now)

    def leave_group(self, group_id: str, member_id: str) -> None:
        now = now_ms()
        with self.write() as c:
            gone = c.execute(
                "DELETE FROM members WHERE group_id = ? AND member_id = ?", (group_id, member_id)
            ).rowcount
            if gone:
                self._prepare_rebalance(group_id, now)
                self._try_complete(group_id, now)

    def heartbeat(self, group_id: str, member_id: str) -> bool:
        """Keep ``member_id`` alive; expel members past their session timeout (or, while
        rebalancing, past the rebalance timeout). False if this member itself is gone."""
        now = now_ms()
        with self.write() as c:
            alive = c.execute(
                "UPDATE members SET heartbeat_ms = ? WHERE group_id = ? AND member_id = ?",
                (now, group_id, member_id),
            ).rowcount
            self._expire(group_id, now)
            return bool(alive)

    def rejoin(self, group_id: str, member_id: str) -> None:
        """This member has revoked its partitions and waits for the next generation."""
        now = now_ms()
        with self.write() as c:
            c.execute(
                "UPDATE members SET joined = 1, heartbeat_ms = ? "
                "WHERE group_id = ? AND member_id = ?",
                (now, group_id, member_id),
            )
            self._try_complete(group_id, now)

    def group_view(self, group_id: str, member_id: str) -> GroupView:
        with self.read() as c:
            g = c.execute(
                "SELECT state, generation FROM groups WHERE id = ?", (group_id,)
            ).fetchone()
            m = c.execute(
                "SELECT joined, generation, assignment FROM members "
                "WHERE group_id = ? AND member_id = ?",
                (group_id, member_id),
            ).fetchone()
        if g is None or m is None:
            return GroupView(g[0] if g else "empty", g[1] if g else 0, False, False, -1, ())
        assignment = tuple(TopicPartition(t, p) for t, p in json.loads(m[2]))
        return GroupView(g[0], g[1], True, bool(m[0]), m[1], assignment)

    def try_complete(self, group_id: str) -> None:
        now = now_ms()
        with self.write():
            self._expire(group_id, now)
            self._try_complete(group_id, now)

    def _expire(self, group_id: str, now: int) -> None:
        c = self.conn
        gone = c.execute(
            "DELETE FROM members WHERE group_id = ? AND heartbeat_ms + session_timeout_ms < ?",
            (group_id, now),
        ).rowcount
        g = c.execute(
            "SELECT state, rebalance_deadline_ms FROM groups WHERE id = ?", (group_id,)
        ).fetchone()
        if g is not None and g[0] == "preparing" and g[1] < now:
            gone += c.execute(
                "DELETE FROM members WHERE group_id = ? AND joined = 0", (group_id,)
            ).rowcount
        if gone:
            self._prepare_rebalance(group_id, now)
        self._try_complete(group_id, now)

    def _prepare_rebalance(self, group_id: str, now: int) -> None:
        c = self.conn
        row = c.execute("SELECT state FROM groups WHERE id = ?", (group_id,)).fetchone()
        if row is None:
            return
        state = row[0]
        (count, timeout) = c.execute(
            "SELECT count(*), ifnull(MAX(rebalance_timeout_ms), 0) FROM members WHERE group_id = ?",
            (group_id,),
        ).fetchone()
        if count == 0:
            c.execute("UPDATE groups SET state = 'empty' WHERE id = ?", (group_id,))
            return
        if state != "preparing":
            c.execute(
                "UPDATE groups SET state = 'preparing', rebalance_deadline_ms = ? WHERE id = ?",
                (now + timeout, group_id),
            )
            # Everyone already in the group must revoke before the next generation starts.
            c.execute(
                "UPDATE members SET joined = 0 WHERE group_id = ? AND generation >= 0",
                (group_id,),
            )

    def _try_complete(self, group_id: str, now: int) -> None:
        """If every member has rejoined, compute the next generation's assignment."""
        c = self.conn
        g = c.execute(
            "SELECT state, generation, assignor FROM groups WHERE id = ?", (group_id,)
        ).fetchone()
        if g is None or g[0] != "preparing":
            return
        members = c.execute(
            "SELECT member_id, topics, joined, assignment FROM members WHERE group_id = ?",
            (group_id,),
        ).fetchall()
        if not members or not all(m[2] for m in members):
            return
        subscriptions = {m[0]: json.loads(m[1]) for m in members}
        previous = {m[0]: [TopicPartition(t, p) for t, p in json.loads(m[3])] for m in members}
        counts: dict[str, int] = {}
        for topic in {t for ts in subscriptions.values() for t in ts}:
            row = c.execute("SELECT partitions FROM topics WHERE name = ?", (topic,)).fetchone()
            if row is not None:
                counts[topic] = row[0]
        plan = ASSIGNORS.get(g[2], ASSIGNORS["range"])(subscriptions, counts, previous)
        generation = g[1] + 1
        c.execute(
            "UPDATE groups SET state = 'stable', generation = ? WHERE id = ?",
            (generation, group_id),
        )
        c.executemany(
            "UPDATE members SET generation = ?, joined = 1, assignment = ?, heartbeat_ms = ? "
            "WHERE group_id = ? AND member_id = ?",
            [
                (generation, json.dumps([list(tp) for tp in tps]), now, group_id, m)
                for m, tps in plan.items()
            ],
        )

    def _check_generation(self, group_id: str, generation: int, member_id: str) -> None:
        """Refuse a commit from a member or generation the group has moved past."""
        c = self.conn
        g = c.execute("SELECT generation FROM groups WHERE id = ?", (group_id,)).fetchone()
        if not member_id:  # a consumer with hand-assigned partitions (Kafka's generation -1)
            active = c.execute(
                "SELECT count(*) FROM members WHERE group_id = ?", (group_id,)
            ).fetchone()[0]
            if active:
                raise StaleGenerationError(
                    f"group {group_id!r} has active members; a consumer outside the group "
                    "cannot commit for it"
                )
            return
        m = c.execute(
            "SELECT generation FROM members WHERE group_id = ? AND member_id = ?",
            (group_id, member_id),
        ).fetchone()
        if g is None or m is None:
            raise StaleGenerationError(
                f"member {member_id} is no longer in group {group_id!r} (expelled after its "
                "session or rebalance timeout); nothing was committed. Rejoin the group."
            )
        if generation != g[0] or m[0] != g[0]:
            raise StaleGenerationError(
                f"group {group_id!r} is at generation {g[0]}, the commit came from generation "
                f"{generation}: the group rebalanced; nothing was committed"
            )

    def commit_offsets(
        self,
        group_id: str,
        generation: int,
        member_id: str,
        offsets: Mapping[TopicPartition, int],
        metadata: Mapping[TopicPartition, str] | None = None,
    ) -> None:
        now = now_ms()
        notes = metadata or {}
        with self.write() as c:
            c.execute(
                "INSERT OR IGNORE INTO groups (id, generation, state, assignor) "
                "VALUES (?, 0, 'empty', 'range')",
                (group_id,),
            )
            self._check_generation(group_id, generation, member_id)
            c.executemany(
                "INSERT OR REPLACE INTO offsets VALUES (?, ?, ?, ?, ?)",
                [(group_id, tp.topic, tp.partition, off, now) for tp, off in offsets.items()],
            )
            # A commit without metadata for a partition leaves none behind for it.
            c.executemany(
                "DELETE FROM offset_notes WHERE group_id = ? AND topic = ? AND partition = ?",
                [(group_id, tp.topic, tp.partition) for tp in offsets if not notes.get(tp)],
            )
            c.executemany(
                "INSERT OR REPLACE INTO offset_notes VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (group_id, tp.topic, tp.partition, off, now, notes[tp])
                    for tp, off in offsets.items()
                    if notes.get(tp)
                ],
            )

    def committed(
        self, group_id: str, topics: Iterable[str] | None = None
    ) -> dict[TopicPartition, int]:
        found = self.committed_metadata(group_id, topics)
        return {tp: off for tp, (off, _) in found.items()}

    def committed_metadata(
        self, group_id: str, topics: Iterable[str] | None = None
    ) -> dict[TopicPartition, tuple[int, str]]:
        with translate(self.path):
            # Metadata counts only beside the very commit that wrote it (an older assured
            # sharing the file commits offsets without touching it).
            rows = self.conn.execute(
                "SELECT o.topic, o.partition, o.off, "
                "CASE WHEN n.off = o.off AND n.commit_ms = o.commit_ms THEN n.metadata "
                "ELSE '' END FROM offsets o LEFT JOIN offset_notes n ON n.group_id = o.group_id "
                "AND n.topic = o.topic AND n.partition = o.partition WHERE o.group_id = ?",
                (group_id,),
            ).fetchall()
        wanted = set(topics) if topics is not None else None
        return {
            TopicPartition(t, p): (off, meta)
            for t, p, off, meta in rows
            if wanted is None or t in wanted
        }

    def groups(self) -> list[str]:
        with translate(self.path):
            rows = self.conn.execute(
                "SELECT id FROM groups UNION SELECT group_id FROM offsets ORDER BY 1"
            ).fetchall()
        return [r[0] for r in rows]

    def describe_group(self, group_id: str) -> tuple[str, int, list[tuple[str, str, str]]]:
        with self.read() as c:
            g = c.execute(
                "SELECT state, generation FROM groups WHERE id = ?", (group_id,)
            ).fetchone()
            members = c.execute(
                "SELECT member_id, client_id, assignment FROM members WHERE group_id = ? "
                "ORDER BY member_id",
                (group_id,),
            ).fetchall()
        if g is None:
            known = self.committed(group_id)
            if not known:
                raise LogError(f"consumer group {group_id!r} does not exist")
            return "empty", 0, []
        return g[0], g[1], members
