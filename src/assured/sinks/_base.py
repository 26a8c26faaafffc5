"""A sink: a database where handlers write effects and the runtime keeps consumed offsets in the
same transaction, so effects and progress commit together or not at all.

Fencing: when a partition is assigned, the new owner *claims* it, bumping an epoch stored beside
its offset. Every later offset write is conditional on that epoch; a zombie (an old owner still
finishing a batch) finds the epoch moved, and its whole transaction, effects included, rolls back.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from assured.errors import StaleGenerationError
from assured.log import TopicPartition

__all__ = ["Claim", "Sink", "SinkFencedError", "SinkTransaction"]

Claim = dict[TopicPartition, tuple[int | None, int]]  # stored next offset (or None), epoch


class SinkFencedError(StaleGenerationError):
    """Another instance claimed this partition in the database since this one did; this
    transaction (effects and offsets) was rolled back."""


class SinkTransaction(abc.ABC):
    """One database transaction, handed to a handler. ``execute`` speaks the database's own SQL
    and parameter style (``?`` for SQLite, ``%s`` for PostgreSQL)."""

    @abc.abstractmethod
    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any: ...

    @property
    @abc.abstractmethod
    def connection(self) -> Any:
        """The raw connection (sqlite3 or psycopg), inside the open transaction."""

    @abc.abstractmethod
    def savepoint(self) -> contextlib.AbstractContextManager[None]:
        """Undo only what happens inside, if it raises (the runtime wraps each handler call)."""

    @abc.abstractmethod
    def first_delivery(self, message_id: str) -> bool:
        """Record ``message_id`` in the inbox table; False if it was there already. For
        at-least-once handlers that want idempotent effects: ``if tx.first_delivery(msg.id): ...``
        (the id and the effects commit together)."""


class Sink(abc.ABC):
    @abc.abstractmethod
    def setup(self) -> None:
        """Create the runtime's tables (offsets, inbox) if missing."""

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[SinkTransaction]: ...

    # The runtime's own SQL, written once; only the placeholder differs between databases.
    placeholder = "?"

    def _sql(self, template: str) -> str:
        return template.replace("?", self.placeholder)

    def claim(self, group: str, partitions: Sequence[TopicPartition]) -> Claim:
        """Take ownership of ``partitions`` for ``group``: bump their epochs; return the stored
        offsets and the new epochs."""
        upsert = self._sql(
            "INSERT INTO assured_offsets (group_id, topic, partition, epoch) VALUES (?, ?, ?, 1) "
            "ON CONFLICT (group_id, topic, partition) DO UPDATE "
            "SET epoch = assured_offsets.epoch + 1 RETURNING next_offset, epoch"
        )
        out: Claim = {}
        with self.transaction() as tx:
            for tp in partitions:
                row = tx.execute(upsert, (group, tp.topic, tp.partition)).fetchone()
                out[tp] = (row[0], row[1])
        return out

    def store_offsets(
        self,
        tx: SinkTransaction,
        group: str,
        offsets: Mapping[TopicPartition, int],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        """Inside ``tx``: store next offsets, if the epochs are still ours, else raise
        :class:`SinkFencedError`."""
        update = self._sql(
            "UPDATE assured_offsets SET next_offset = ? "
            "WHERE group_id = ? AND topic = ? AND partition = ? AND epoch = ?"
        )
        for tp, offset in offsets.items():
            cur = tx.execute(update, (offset, group, tp.topic, tp.partition, epochs.get(tp, -1)))
            if cur.rowcount != 1:
                raise fenced(tp, group)

    def stored_offsets(self, group: str) -> dict[TopicPartition, int]:
        query = self._sql(
            "SELECT topic, partition, next_offset FROM assured_offsets "
            "WHERE group_id = ? AND next_offset IS NOT NULL"
        )
        with self.transaction() as tx:
            rows = tx.execute(query, (group,)).fetchall()
        return {TopicPartition(t, p): o for t, p, o in rows}

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Sink:
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fenced(tp: TopicPartition, group: str) -> SinkFencedError:
    return SinkFencedError(
        f"{tp} of group {group!r} was claimed by another instance in the database; this "
        "transaction (effects and offsets) was rolled back"
    )
