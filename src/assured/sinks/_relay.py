"""Dead letters from the database to the log, exactly once.

Under exactly-once into a database, a record's dead letter is a row in ``assured_dead_letters``
written in the same transaction as the effects and offsets, so it exists if and only if the
offsets that skip its record do. This relay publishes those rows to their dead-letter topics:

take over
    Bump the group's relay epoch in the database (every later database write of an older relay
    is refused), then ``init_transactions`` on ``assured-dlq-relay-<group>`` (an older relay
    can no longer commit on the log, and its open transaction is aborted).
recover
    If the database notes a batch in flight, read the dead-letter topics read_committed from
    where that batch started to their end: the batch's records found there (by their headers
    ``assured.dead-letter.group`` and ``assured.dead-letter.id``) were published; mark them.
each batch
    Read pending rows; note the batch (its ids, and each target partition's end offset) in the
    database; publish the rows in one log transaction and commit it; then, in one database
    transaction, mark the rows relayed and clear the note.

A crash at any point leaves either a batch that never committed on the log (the next relay's
``init_transactions`` aborts it; its rows are still pending) or one that did, which recovery
finds and marks. Either way each row is published once.

Rows are marked rather than counted past with a position: PostgreSQL assigns ids when rows are
inserted, not when they commit, so a lower id can commit after a higher one was relayed, and a
position would skip it for ever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Self

from assured.errors import AssuredError, InvalidTopicError, ProducerFencedError, RetriableError
from assured.log import Log, Producer, TopicPartition
from assured.log._models import decode_headers
from assured.sinks._base import Sink, SinkFencedError

__all__ = ["GROUP_HEADER", "ID_HEADER", "RELAY_POINTS", "DeadLetterRelay", "relay_dead_letters"]

log = logging.getLogger("assured.sinks")

GROUP_HEADER = "assured.dead-letter.group"
ID_HEADER = "assured.dead-letter.id"
# Where a test or the audit may stop a relay on purpose (``hook`` is called with the name).
RELAY_POINTS = ("after-note", "inside-transaction", "after-publish-before-mark")

_PENDING = (
    "SELECT id, dead_letter_topic, key, value, headers FROM assured_dead_letters "
    "WHERE group_id = ? AND relayed_ms IS NULL ORDER BY id LIMIT ?"
)


class DeadLetterRelay:
    """Publishes ``group``'s dead letters from ``sink`` to ``log``, exactly once.

    Call :meth:`run_once` after a transaction that wrote dead letters (or now and then), from
    the thread that uses ``sink``; or give the relay a sink of its own to run it elsewhere.
    One relay per group works at a time: a new one takes over from the previous, which then
    publishes nothing more (its :meth:`run_once` returns 0 until it takes over again)."""

    def __init__(
        self,
        sink: Sink,
        log: Log,
        group: str,
        *,
        batch_size: int = 500,
        read_timeout_s: float = 30.0,
        hook: Callable[[str], None] | None = None,
    ):
        self.sink = sink
        self.log = log
        self.group = group
        self.batch_size = batch_size
        self.read_timeout_s = read_timeout_s
        self.transactional_id = f"assured-dlq-relay-{group}"
        self._hook = hook or (lambda point: None)
        self._producer: Producer | None = None
        self._epoch = 0
        self.fenced = False  # another relay took over since this one last did

    def run_once(self) -> int:
        """Publish one batch of pending dead letters; returns how many were published."""
        rows = self._pending()
        if not rows:
            return 0
        try:
            if self._producer is None:
                self._take_over()
                rows = self._pending()  # recovery may have marked some
                if not rows:
                    return 0
            return self._publish(rows)
        except (SinkFencedError, ProducerFencedError) as e:
            log.info("dead-letter relay of group %r: another relay took over (%s)", self.group, e)
            self.fenced = True
            self._drop()
            return 0
        except BaseException:
            self._drop()  # the next run takes over afresh and recovers whatever was in flight
            raise

    def drain(self) -> int:
        """Publish until nothing is pending (or another relay takes over); returns how many."""
        total = 0
        while n := self.run_once():
            total += n
        return total

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- steps ----------------------------------------------------------------------------------

    def _pending(self) -> list[tuple[Any, ...]]:
        with self.sink.transaction(self.group) as tx:
            rows = tx.execute(self.sink._sql(_PENDING), (self.group, self.batch_size)).fetchall()
        return [tuple(r) for r in rows]

    def _take_over(self) -> None:
        upsert = self.sink._sql(
            "INSERT INTO assured_dead_letter_relays (group_id, epoch) VALUES (?, 1) "
            "ON CONFLICT (group_id) DO UPDATE SET epoch = assured_dead_letter_relays.epoch + 1 "
            "RETURNING epoch"
        )
        with self.sink.transaction(self.group) as tx:
            self._epoch = int(tx.execute(upsert, (self.group,)).fetchone()[0])
        producer = self.log.producer(transactional_id=self.transactional_id)
        try:
            producer.init_transactions()  # fences the previous relay, aborts its open batch
        except BaseException:
            producer.close()
            raise
        self._producer = producer
        self.fenced = False
        self._recover()

    def _recover(self) -> None:
        query = self.sink._sql(
            "SELECT epoch, inflight FROM assured_dead_letter_relays WHERE group_id = ?"
        )
        with self.sink.transaction(self.group) as tx:
            epoch, note = tx.execute(query, (self.group,)).fetchone()
        if epoch != self._epoch:
            raise self._fenced()
        if note is None:
            return
        batch = json.loads(note)
        ids = set(batch["ids"])
        found = self._published(ids, [(TopicPartition(t, p), o) for t, p, o in batch["from"]])
        if found and found != ids:
            log.warning(
                "dead-letter relay of group %r: of batch %s only %s reached the log",
                self.group, sorted(ids), sorted(found),
            )  # fmt: skip
        with self.sink.transaction(self.group) as tx:
            self._mark(tx, found)
        log.info(
            "dead-letter relay of group %r recovered a batch in flight: %d of %d were published",
            self.group, len(found), len(ids),
        )  # fmt: skip

    def _published(self, ids: set[int], starts: Sequence[tuple[TopicPartition, int]]) -> set[int]:
        """Which of ``ids`` the dead-letter topics hold (read_committed) from ``starts`` on."""
        with self.log.admin() as admin:
            ends = {tp: admin.watermarks(tp).high for tp, _ in starts}
        found: set[int] = set()
        todo = {tp for tp, start in starts if start < ends[tp]}
        if not todo:
            return found
        mine = self.group.encode()
        deadline = time.monotonic() + self.read_timeout_s
        with self.log.consumer(isolation="read_committed") as reader:
            reader.assign(sorted(todo))
            for tp, start in starts:
                if tp in todo:
                    reader.seek(tp, start)
            while todo and found != ids:
                if time.monotonic() > deadline:
                    raise RetriableError(
                        f"the dead-letter relay of group {self.group!r} could not read "
                        f"{', '.join(map(str, sorted(todo)))} to its end within "
                        f"{self.read_timeout_s:g}s (an open transaction of another producer?); "
                        "nothing was published or marked; it tries again on its next run"
                    )
                for r in reader.poll(max_records=500, timeout=0.2):
                    if r.header(GROUP_HEADER) == mine:
                        found.add(int(r.header(ID_HEADER) or b"-1"))
                todo = {tp for tp in todo if reader.position(tp) < ends[tp]}
        return found & ids

    def _publish(self, rows: list[tuple[Any, ...]]) -> int:
        assert self._producer is not None
        starts: list[tuple[str, int, int]] = []
        with self.log.admin() as admin:
            existing = set(admin.list_topics())
            for topic in sorted({r[1] for r in rows}):
                if topic not in existing:
                    with contextlib.suppress(InvalidTopicError):  # made meanwhile by a peer
                        admin.create_topic(topic, 1)
                for p in range(admin.describe_topic(topic).partitions):
                    starts.append((topic, p, admin.watermarks(TopicPartition(topic, p)).high))
        ids = [int(r[0]) for r in rows]
        note = json.dumps({"ids": ids, "from": starts})
        with self.sink.transaction(self.group) as tx:
            self._check_epoch(tx, note)
        self._hook("after-note")
        producer = self._producer
        producer.begin_transaction()
        refused: dict[int, AssuredError] = {}
        for row_id, topic, key, value, headers in rows:
            try:
                producer.send(
                    topic,
                    None if value is None else bytes(value),
                    key=None if key is None else bytes(key),
                    headers=[
                        *decode_headers(None if headers is None else bytes(headers)),
                        (GROUP_HEADER, self.group.encode()),
                        (ID_HEADER, str(row_id).encode()),
                    ],
                )
            except AssuredError as e:
                if e.retriable or e.abortable or e.fatal or e.fenced:
                    raise
                # This row can never be published (e.g. over the topic's size limit once its
                # headers are added): set it aside rather than block every later dead letter.
                refused[row_id] = e
        self._hook("inside-transaction")
        producer.commit_transaction()
        self._hook("after-publish-before-mark")
        with self.sink.transaction(self.group) as tx:
            self._mark(tx, set(ids) - set(refused))
            self._refuse(tx, refused)
        return len(ids)

    def _refuse(self, tx: Any, refused: dict[int, AssuredError]) -> None:
        """Mark rows the log refused (``relayed_ms = -1``): they stay in the table, with
        their record and error, for a person to look at; later dead letters go on."""
        for row_id, error in sorted(refused.items()):
            tx.execute(
                self.sink._sql(
                    "UPDATE assured_dead_letters SET relayed_ms = -1 WHERE id = ? AND group_id = ?"
                ),
                (row_id, self.group),
            )
            log.error(
                "dead letter %d of group %r cannot be published (%s); it stays in "
                "assured_dead_letters (relayed_ms = -1) with its record and error",
                row_id, self.group, error,
            )  # fmt: skip

    def _mark(self, tx: Any, ids: set[int]) -> None:
        """Mark ``ids`` relayed and clear the note, if this relay still holds the epoch."""
        self._check_epoch(tx, None)
        mark = self.sink._sql(
            "UPDATE assured_dead_letters SET relayed_ms = ? WHERE id = ? AND group_id = ?"
        )
        now = int(time.time() * 1000)
        for row_id in sorted(ids):
            tx.execute(mark, (now, row_id, self.group))

    def _check_epoch(self, tx: Any, note: str | None) -> None:
        """Set the note of the batch in flight, if this relay still holds the epoch."""
        update = self.sink._sql(
            "UPDATE assured_dead_letter_relays SET inflight = ? WHERE group_id = ? AND epoch = ?"
        )
        if tx.execute(update, (note, self.group, self._epoch)).rowcount != 1:
            raise self._fenced()

    def _fenced(self) -> SinkFencedError:
        return SinkFencedError(
            f"another dead-letter relay of group {self.group!r} took over; this one wrote nothing"
        )

    def _drop(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.close()
            self._producer = None


def relay_dead_letters(
    sink: Sink,
    log: Log,
    group: str,
    *,
    batch_size: int = 500,
    read_timeout_s: float = 30.0,
    hook: Callable[[str], None] | None = None,
) -> int:
    """Publish every pending dead letter of ``group`` from ``sink`` to ``log``, exactly once;
    returns how many were published. See :class:`DeadLetterRelay`."""
    with DeadLetterRelay(
        sink, log, group, batch_size=batch_size, read_timeout_s=read_timeout_s, hook=hook
    ) as relay:
        return relay.drain()
