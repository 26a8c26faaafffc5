"""A sink: a database where handlers write effects and the runtime keeps consumed offsets in the
same transaction, so effects and progress commit together or not at all.

Fencing: when a partition is assigned, the new owner *claims* it, bumping an epoch stored beside
its offset. Every later offset write is conditional on that epoch; a zombie (an old owner still
finishing a batch) finds the epoch moved, and its whole transaction, effects included, rolls back.

Who is asking: the runtime opens each transaction with its consumer group and, per topic, an
*incarnation* (the log's id of the topic, which changes when a topic is deleted and created
again). The inbox keys by both, so two groups writing to one database, or a re-created topic
whose offsets start again at 0, never see each other's deliveries; a claim drops an offset that
was stored for an earlier incarnation of the topic.

Dead letters under exactly-once go into ``assured_dead_letters`` inside the same transaction as
the effects and offsets (:meth:`SinkTransaction.dead_letter`); :mod:`assured.sinks._relay`
publishes them to the log afterwards, exactly once.

Errors, beside the log's own::

    SinkFencedError (StaleGenerationError)  a newer owner claimed the partition; rolled back
    SinkUnavailableError (RetriableError)   the connection broke mid-transaction; rolled back
    └── SinkCommitUnknownError              it broke during COMMIT: re-read stored offsets
    SinkUnreachableError (ServiceError)     no connection / write lock within the deadline; stop
    SinkLostError (ServiceError)            the SQLite file was deleted or replaced; stop
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import functools
import logging
import re
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from assured.errors import (
    ConfigError,
    RetriableError,
    ServiceError,
    StaleGenerationError,
    UsageError,
)
from assured.log import Header, Record, TopicPartition
from assured.log._models import encode_headers
from assured.sinks._one_statement import after_comment

__all__ = [
    "Claim",
    "MessageLike",
    "Sink",
    "SinkCommitUnknownError",
    "SinkFencedError",
    "SinkLostError",
    "SinkTransaction",
    "SinkUnavailableError",
    "SinkUnreachableError",
    "SwallowedStatementError",
]

log = logging.getLogger("assured.sinks")

Claim = dict[TopicPartition, tuple[int | None, int]]  # stored next offset (or None), epoch


class SinkFencedError(StaleGenerationError):
    """Another instance claimed this partition in the database since this one did; this
    transaction (effects and offsets) was rolled back. ``partition``: which one, if known."""

    partition: TopicPartition | None = None


class SinkUnavailableError(RetriableError):
    """The connection to the database broke during a transaction. The transaction was rolled
    back (nothing of it committed) and the connection discarded; the next ``transaction()``
    reconnects, with backoff. Redo the work in a new transaction. Not a handler's failure:
    never retry the handler on it nor dead-letter its record."""


class BatchRefusedError(SinkUnavailableError):
    """The database refused a message of several records' first statements whole (one of
    them does not parse): the transaction is aborted, as the sink's failure, and those
    statements go on their own from then on, so that the record whose statement it is meets
    its own error."""


class SinkCommitUnknownError(SinkUnavailableError):
    """The connection broke while the database was committing: the transaction may have
    committed or not, and nobody can tell from here. Before redoing anything, re-read the
    stored offsets (:meth:`Sink.stored_offsets`) and resume from them: what they cover was
    committed, effects included; the rest was not."""


class CommitWaitError(SinkUnavailableError):
    """A connection's commit, made beside others of the same window, waited too long for a
    lock (a deferred constraint checking a row another connection of the window holds): it
    was rolled back. The window goes on with one connection."""


class SwallowedStatementError(Exception):
    """A statement failed inside a handler's savepoint and the handler carried on (PostgreSQL
    had aborted the transaction). The savepoint was rolled back; the record failed, as if the
    handler had raised: retried, then dead-lettered."""


class StrayStatementError(UsageError):
    """A statement from code that is not the running attempt's (a task or thread a record left
    running, a transaction or connection kept past its record, a thread without the handler's
    context) was refused: it did not run. Fatal when it reaches the runtime through a handler:
    a handler whose own statements come from such code (a worker task started once and reused,
    a pool thread) would fail every record alike, and none should be dead-lettered for it."""

    fatal = True


class HandlerEndedTransactionError(UsageError):
    """A handler tried to end the sink's transaction itself through the raw connection
    (``db.connection.commit()``, a library that commits, ``execute("COMMIT")``): the runtime
    commits effects with their positions, or not at all. The database refused it, nothing of
    the transaction committed, and the App stops: every record would do the same."""

    fatal = True


def ended_by_handler(statement: str) -> HandlerEndedTransactionError:
    return HandlerEndedTransactionError(
        f"a handler ran {statement} on the sink's connection (db.connection, or a library "
        "given it): the runtime commits each record's effects with its position, or not at "
        "all, so the statement was refused and nothing of the transaction committed. Return "
        "from the handler to keep its work, raise to undo it; do not commit or roll back"
    )


class SinkUnreachableError(ServiceError):
    """The database could not be used within the sink's deadline (no connection, or its write
    lock held by another process all along). Nothing was written; this instance should stop."""

    fatal = True


class SinkLostError(ServiceError):
    """The SQLite sink file was deleted or replaced while this process had it open. Nothing
    was committed since that was noticed; this instance must stop."""

    fatal = True


class MessageLike(Protocol):
    """Anything that says where a record sits: a :class:`~assured.Message` or a Record."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...


_RECORD_ID = re.compile(r"(?P<topic>[A-Za-z0-9._-]+)\[(?P<partition>\d+)\]@(?P<offset>\d+)")


class Attempt:
    """The mark of one attempt's code: the value of :data:`record_part` while it runs, which
    the tasks it starts inherit. ``over`` once the attempt ended: whatever still runs under
    it (a task or thread left running) may write and send nothing any more."""

    __slots__ = ("over",)

    def __init__(self) -> None:
        self.over = False


# The App's own code: App.run sets it, and the runtime's tasks and callbacks inherit it.
RUNTIME = Attempt()

# Whose code runs in this context: the attempt of a record whose handler code it is (set by the
# runtime for each attempt: side by side its RecordDb, in the record's task; at concurrency 1 a
# fresh Attempt; the tasks a handler starts inherit it), RUNTIME in the App's own, None in code
# of no App: outside App.run, or a thread or callback started without the context of the code
# that started it. A task one record left running is told apart from the code of the record
# whose part is open, and a plain thread from the runtime.
record_part: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "assured_record_part", default=None
)


_WITHOUT_CONTEXT = (
    "from code without the handler's context (a thread it started, or a callback such a thread "
    "handed to the App's loop; contextvars.copy_context().run or asyncio.to_thread keep it)"
)


class SinkTransaction(abc.ABC):
    """One database transaction, handed to a handler. ``execute`` speaks the database's own SQL
    and parameter style (``?`` for SQLite, ``%s`` for PostgreSQL).

    ``group`` is the consumer group the runtime opened it for ('' when not told) and
    ``incarnations`` each topic's incarnation (the log's topic id), where known."""

    def __init__(
        self, sink: Sink, group: str | None = None, incarnations: Mapping[str, str] | None = None
    ):
        self.sink = sink
        self.group = group or ""
        self.incarnations: Mapping[str, str] = incarnations or {}
        self.dead_letters: list[int] = []  # ids written by dead_letter(), for the relay
        self._in_part = False  # a handler's part is open (see _part)
        self._had_parts = False  # one was: handlers run in this transaction
        self._owner: object = None  # the attempt whose part it is (see _owned_by)
        self._thread = threading.get_ident()  # the runtime's, which opened it
        # Opened by an App's runtime, for its handlers: code of no App's (record_part None) is
        # a stray here. A transaction a handler opens for itself is its own business.
        self._in_app = record_part.get() is RUNTIME
        # Held by a statement from its check to its end, and by a part's end: a thread's
        # statement checked inside its part cannot run after the part is over.
        self._turn = threading.RLock()

    @abc.abstractmethod
    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any: ...

    @property
    @abc.abstractmethod
    def connection(self) -> Any:
        """The raw connection (sqlite3 or psycopg), inside the open transaction."""

    @abc.abstractmethod
    def savepoint(self, release: bool = True) -> contextlib.AbstractContextManager[None]:
        """Undo only what happens inside, if it raises (the runtime wraps each handler call).
        ``release=False``: when it does not raise, leave the savepoint to the commit (one
        statement fewer; for savepoints taken one after another, never nested)."""

    def _savepoint(self, release: bool) -> contextlib.AbstractContextManager[None]:
        """The runtime's own savepoint (a handler's :meth:`savepoint` may be checked more)."""
        return self.savepoint(release)

    @contextlib.contextmanager
    def _part(self, release: bool = True) -> Iterator[None]:
        """A handler's part: the savepoint the runtime wraps each attempt in (the runtime's
        alone). A sink keeps more in it through :meth:`_part_began` and :meth:`_part_ended`,
        and refuses statements by :meth:`_outside_own_part`."""
        with self._savepoint(release):
            self._in_part = self._had_parts = True
            self._owner = None
            self._part_began()
            try:
                yield
            finally:
                with self._turn:
                    self._in_part, self._owner = False, None
                self._part_ended()

    def _part_began(self) -> None:
        """A handler's part opened (its savepoint taken)."""

    def _part_ended(self) -> None:
        """A handler's part is ending (before its savepoint is released or rolled back to)."""

    def _owned_by(self, record: Attempt) -> None:
        """The handler's part now open is the attempt ``record``'s (the value of
        :data:`record_part` in its code): statements from code of another attempt are
        refused in it (see :meth:`_outside_own_part`)."""
        self._owner = record

    def _outside_own_part(self) -> str | None:  # noqa: PLR0911 -- one answer per case
        """Where a statement from the code running now would land, if that is not its own
        attempt's part: a handler's code writes only there, not between parts nor in another
        record's part (a task a failed record left running would commit its work with the
        batch). None when it may run. Whose code it is: :data:`record_part`."""
        if not (self._in_app or self._had_parts):
            return None  # a transaction a handler opened for itself: its own business
        attempt = record_part.get()
        if attempt is RUNTIME or (attempt is None and not self._in_app):
            # The App's code, or (in a transaction no App opened) its opener's: on its own
            # thread only. Elsewhere, once handlers ran, a thread a handler started.
            if self._had_parts and threading.get_ident() != self._thread:
                return _WITHOUT_CONTEXT
            attempt = None
        elif attempt is None:
            # In an App's transaction, code of no App: a thread a handler started without its
            # context, or a callback such a thread handed to the App's loop, perhaps left
            # running by a failed attempt. Never the runtime's own, which is marked.
            return _WITHOUT_CONTEXT
        elif attempt.over:
            return "after its attempt ended"
        if not self._in_part:
            return "between handlers' parts" if self._had_parts and attempt is not None else None
        if self._owner is not None and attempt is not self._owner:
            return "inside another record's part"
        return None

    def _refuse_outside_own_part(self) -> None:
        """Raise :class:`StrayStatementError`, saying where, for a statement from code outside
        its own attempt's part (see :meth:`_outside_own_part`)."""
        where = self._outside_own_part()
        if where is not None:
            raise StrayStatementError(self._stray_message(where))

    def _stray_message(self, where: str) -> str:
        """What a refused stray statement says (a sink names itself and what to do)."""
        return f"a statement {where} did not run; do every database call before returning"

    def _trusted(self) -> contextlib.AbstractContextManager[None]:
        """Statements in this block are the runtime's own, or a record's through its guarded
        ``db`` side by side: not refused as another record's (see :meth:`_owned_by`)."""
        return contextlib.nullcontext()

    def first_delivery(self, message: MessageLike | str) -> bool:
        """Record ``message`` in the inbox of this transaction's group; False if it was there
        already. For at-least-once handlers that want idempotent effects:
        ``if tx.first_delivery(msg): ...`` (the delivery and the effects commit together).

        Keyed by group and by the topic's incarnation, so another group, or a topic deleted
        and created again, is a first delivery of its own. A string is accepted too: a record
        id (``msg.id``, ``topic[p]@offset``) is keyed exactly as the message itself; any other
        string is your own idempotency key, kept per group."""
        insert, params, legacy = _inbox_statements(self, message)
        if self.execute(insert, params).rowcount != 1:
            return False
        if legacy is not None:
            # Delivered before the inbox knew groups (any group, then): keep that answer.
            return self.execute(*legacy).fetchone() is None
        return True

    def dead_letter(
        self,
        record: Record,
        *,
        topic: str,
        error: BaseException | None = None,
        attempts: int | None = None,
        headers: Sequence[Header] | None = None,
    ) -> int:
        """Write ``record`` as a dead letter for ``topic`` (e.g. ``<input>.dlq``) into this
        transaction: it commits with the effects and offsets, or not at all, and
        :func:`assured.sinks.relay_dead_letters` publishes it later, exactly once. Returns
        its id in ``assured_dead_letters``.

        Give the ``error`` and ``attempts`` (the record's headers then get the
        ``assured.error.type``, ``assured.error.message``, ``assured.origin`` and
        ``assured.attempts`` headers), or the dead letter's ``headers`` as they are to be
        published. The relay adds ``assured.dead-letter.group`` and ``assured.dead-letter.id``.
        """
        insert, params = _dead_letter_statement(self, record, topic, error, attempts, headers)
        with self._plain_rows():
            row = self.execute(insert, params).fetchone()
        self.dead_letters.append(int(row[0]))
        return int(row[0])

    def _plain_rows(self) -> contextlib.AbstractContextManager[None]:
        """Rows as the driver gives them by default, whatever factory a handler set on the
        connection (the runtime's own reads, inside a handler's part)."""
        return contextlib.nullcontext()


def _inbox_statements(
    tx: SinkTransaction | SideBySide, message: MessageLike | str
) -> tuple[str, tuple[Any, ...], tuple[str, tuple[Any, ...]] | None]:
    """The statements of :meth:`SinkTransaction.first_delivery`: the inbox insert, and the
    look into the inbox from before groups when there is one."""
    plain = message if isinstance(message, str) else record_id(message)
    key = plain
    match = _RECORD_ID.fullmatch(plain)
    if match is not None:
        incarnation = tx.incarnations.get(match["topic"])
        if incarnation:
            key = f"{plain}#{incarnation}"
    insert = tx.sink._sql(
        "INSERT INTO assured_inbox (group_id, message_id) VALUES (?, ?) ON CONFLICT DO NOTHING"
    )
    legacy = None
    if tx.sink._legacy_inbox:
        legacy = (tx.sink._sql("SELECT 1 FROM assured_inbox_v1 WHERE message_id = ?"), (plain,))
    return insert, (tx.group, key), legacy


def _dead_letter_statement(
    tx: SinkTransaction | SideBySide,
    record: Record,
    topic: str,
    error: BaseException | None = None,
    attempts: int | None = None,
    headers: Sequence[Header] | None = None,
) -> tuple[str, tuple[Any, ...]]:
    """The insert of :meth:`SinkTransaction.dead_letter` (it returns the new id)."""
    if not tx.group:
        raise UsageError(
            "dead_letter() needs the consumer group: open the transaction with "
            "sink.transaction(group=...)"
        )
    if headers is None:
        if error is None:
            raise UsageError("dead_letter() needs the error, or the headers to publish")
        headers = dead_letter_headers(record, error, attempts or 1)
    found = dict(headers)
    error_type = found.get("assured.error.type") or b""
    error_message = found.get("assured.error.message") or b""
    if attempts is None:
        attempts = int(found.get("assured.attempts") or b"1")
    insert = tx.sink._sql(
        "INSERT INTO assured_dead_letters (group_id, dead_letter_topic, source_topic, "
        "source_partition, source_offset, key, value, headers, error_type, error_message, "
        "attempts, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"
    )
    params = (
        tx.group,
        topic,
        record.topic,
        record.partition,
        record.offset,
        record.key,
        record.value,
        encode_headers(headers),
        _text(error_type),
        _text(error_message),
        attempts,
        int(time.time() * 1000),
    )
    return insert, params


class SideBySide(abc.ABC):
    """A connection for records handled side by side (see ``runtime._shared_db``): its own
    transaction between two group commits, a savepoint per record, every call awaited.
    ``generation`` counts its transactions, so a record can tell that the one its savepoint
    was in is over."""

    def __init__(self, sink: Sink, group: str, incarnations: Mapping[str, str]):
        self.sink = sink
        self.group = group
        self.incarnations = incarnations
        self.generation = 0

    @property
    @abc.abstractmethod
    def in_transaction(self) -> bool: ...

    @abc.abstractmethod
    async def begin(self) -> None:
        """Begin a transaction (connecting first if need be)."""

    @abc.abstractmethod
    async def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] = (),
        savepoint: str | None = None,
    ) -> Any:
        """``sql`` in the open transaction; with ``savepoint``, that savepoint is taken first
        (in the same round trip, where the database allows)."""

    # Whether records' first statements can go in one message (see ``runtime._shared_db``):
    # then the connection has first_text, execute_firsts and undo_later.
    batches = False

    def call_under_way(self) -> bool:
        """Whether a call is under way on the connection now (awaiting the server, while the
        App's other records run): a ROLLBACK would wait behind it. SQLite's calls run to
        their end on the App's thread, so never."""
        return False

    def first_text(
        self, savepoint: str, sql: str, params: Sequence[Any] | Mapping[str, Any]
    ) -> str | None:
        return None

    async def execute_firsts(self, pieces: Sequence[tuple[str, str]]) -> tuple[Any, list[Any]]:
        raise NotImplementedError

    def undo_later(self, savepoint: str) -> None:
        raise NotImplementedError

    def abandon(self) -> None:
        """A record's part was left neither kept nor undone (its end was cancelled): the open
        transaction must never commit."""

    def owned_by(self, record: Attempt) -> None:
        """The record's part just opened on this connection is ``record``'s (its RecordDb,
        also the value of :data:`record_part` in its handler's code)."""

    async def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        for row in rows:
            await self.execute(sql, row)

    async def mark_done(self, records: Sequence[tuple[str, int, int]]) -> None:
        """Mark ``records`` (topic, partition, offset) done for the group in the open
        transaction (``assured_done``; one already marked stays)."""
        rows = [(self.group, topic, partition, offset) for topic, partition, offset in records]
        await self.execute_many(self.sink._sql(MARK_DONE), rows)

    async def fence_and_mark(
        self, epochs: Sequence[tuple[TopicPartition, int]], marks: Sequence[tuple[str, int, int]]
    ) -> TopicPartition | None:
        """In the open transaction, before its commit: check that each partition's epoch is
        still the one in ``epochs`` (its offsets row share-locked, so a claim waits for this
        commit and then sees the marks), and mark ``marks`` done. Returns the first partition
        claimed by another, or None."""
        fence = self.sink._sql(
            "SELECT 1 FROM assured_offsets WHERE group_id = ? AND topic = ? "  # noqa: S608
            f"AND partition = ? AND epoch = ?{self.sink.share_lock}"  # a class constant
        )
        for tp, epoch in sorted(epochs):
            row = (self.group, tp.topic, tp.partition, epoch)
            if (await self.execute(fence, row)).fetchone() is None:
                return tp
        await self.mark_done(marks)
        return None

    async def commit_marked(
        self, epochs: Sequence[tuple[TopicPartition, int]], marks: Sequence[tuple[str, int, int]]
    ) -> TopicPartition | None:
        """:meth:`fence_and_mark`, then ``commit(bounded=True)``; or, when a partition was
        claimed by another, that partition, and nothing committed (the caller rolls back)."""
        claimed = await self.fence_and_mark(epochs, marks)
        if claimed is not None:
            return claimed
        await self.commit(bounded=True)
        return None

    async def store_positions(
        self,
        marks: Sequence[tuple[str, int, int]],
        positions: Sequence[tuple[TopicPartition, int | None, int]],
    ) -> TopicPartition | None:
        """In the open transaction, the step's last commit under exactly-once: mark ``marks``
        done, then for each ``(partition, position, epoch)``, in order, if the partition's
        epoch is still ``epoch``, store ``position`` (None: leave it) and drop the marks below
        it. Returns the first partition claimed by another (the caller rolls back), or None."""
        await self.mark_done(marks)
        store = self.sink._sql(
            "UPDATE assured_offsets SET next_offset = COALESCE(?, next_offset) "
            "WHERE group_id = ? AND topic = ? AND partition = ? AND epoch = ?"
        )
        below = self.sink._sql(
            "DELETE FROM assured_done WHERE group_id = ? AND topic = ? AND partition = ? "
            "AND record_offset < ?"
        )
        for tp, position, epoch in sorted(positions):
            row = (position, self.group, tp.topic, tp.partition, epoch)
            if (await self.execute(store, row)).rowcount != 1:
                return tp
            if position is not None:
                await self.execute(below, (self.group, tp.topic, tp.partition, position))
        return None

    @abc.abstractmethod
    async def end_region(self, savepoint: str, error: BaseException | None) -> None:
        """A record's part ends: kept (``error`` None; raises if a statement in it failed and
        was swallowed) or rolled back to ``savepoint``. Raises the database's own failure."""

    @abc.abstractmethod
    async def plain(self, savepoint: str | None) -> SinkTransaction:
        """The open transaction for calls without ``await`` (``savepoint`` taken first)."""

    @abc.abstractmethod
    async def commit(self, bounded: bool = False) -> None:
        """Commit; raises as :meth:`Sink.transaction` does when the commit fails.
        ``bounded``: a lock the commit waits for (a deferred constraint's) is waited for a
        few seconds at most, then :class:`CommitWaitError` (it may be held by another
        connection of the same window, which commits only after this one)."""

    @abc.abstractmethod
    async def rollback(self, error: BaseException) -> None:
        """Roll back whatever is open (never raises)."""

    async def close(self) -> None:
        """Close the connection, if it is this one's own."""

    async def first_delivery(self, message: MessageLike | str, savepoint: str | None) -> bool:
        insert, params, legacy = _inbox_statements(self, message)
        if (await self.execute(insert, params, savepoint)).rowcount != 1:
            return False
        if legacy is not None:
            return (await self.execute(*legacy)).fetchone() is None
        return True

    async def dead_letter(self, record: Record, topic: str, headers: Sequence[Header]) -> int:
        insert, params = _dead_letter_statement(self, record, topic, headers=headers)
        return int((await self.execute(insert, params)).fetchone()[0])


class _Plain(SideBySide):
    """Side by side on the sink's own connection, through its plain transactions (every call
    runs at once: nothing to await but the coroutine)."""

    def __init__(self, sink: Sink, group: str, incarnations: Mapping[str, str]):
        super().__init__(sink, group, incarnations)
        self._cm: contextlib.AbstractContextManager[SinkTransaction] | None = None
        self._tx: SinkTransaction | None = None
        self._regions: dict[str, contextlib.AbstractContextManager[None]] = {}
        self._abandoned = False  # a record's part in it was left open: it must not commit

    @property
    def in_transaction(self) -> bool:
        return self._tx is not None

    def abandon(self) -> None:
        if self._tx is not None:
            self._abandoned = True

    async def begin(self) -> None:
        cm = self.sink.transaction(group=self.group, incarnations=self.incarnations)
        self._tx = cm.__enter__()
        self._abandoned = False  # only once begun: a failed begin leaves an abandon standing
        self._tx._in_app = True  # the window's, though begun in a record's task
        self._cm = cm
        self.generation += 1

    def _open(self, savepoint: str | None) -> SinkTransaction:
        tx = self._tx
        assert tx is not None, "no transaction is open"
        if savepoint is not None:
            # Released as it ends: SQLite then holds one savepoint, not one per record of the
            # transaction (a stack of them wrote the page each record changed into the
            # statement journal again, a file: about 10 us of the 150 us a record took).
            region = tx._part(release=True)
            region.__enter__()
            self._regions[savepoint] = region
        return tx

    def owned_by(self, record: Attempt) -> None:
        if self._tx is not None:
            self._tx._owned_by(record)

    async def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] = (),
        savepoint: str | None = None,
    ) -> Any:
        tx = self._open(savepoint)
        with tx._trusted():  # the runtime's, or a record's through its RecordDb
            return tx.execute(sql, params)

    async def plain(self, savepoint: str | None) -> SinkTransaction:
        return self._open(savepoint)

    async def end_region(self, savepoint: str, error: BaseException | None) -> None:
        region = self._regions.pop(savepoint, None)
        if region is None:
            return
        if error is None:
            region.__exit__(None, None, None)
            return
        try:
            region.__exit__(type(error), error, error.__traceback__)
        except BaseException as e:
            if e is not error:  # the database's failure; the record's own is its caller's
                raise

    async def commit(self, bounded: bool = False) -> None:
        if self._abandoned:
            error = SinkUnavailableError(
                "a record's part of the shared transaction was left neither kept nor undone "
                "(its handler was given up and went on): the transaction was rolled back, and "
                "its records are handled again"
            )
            await self.rollback(error)
            raise error
        cm, self._cm, self._tx = self._cm, None, None
        self._regions.clear()
        if cm is not None:
            cm.__exit__(None, None, None)

    async def rollback(self, error: BaseException) -> None:
        cm, self._cm, self._tx = self._cm, None, None
        self._abandoned = False
        self._regions.clear()
        if cm is not None:
            with contextlib.suppress(BaseException):
                cm.__exit__(type(error), error, error.__traceback__)


_ENDS_A_TRANSACTION = {"COMMIT", "END", "BEGIN", "ROLLBACK", "ABORT", "START"}


def refuse_transaction_control(sql: str) -> None:
    """A handler's statement must not begin or end the transaction it runs in: the runtime
    commits effects with their positions, or not at all. ``ROLLBACK TO`` a savepoint of the
    handler's own is fine. Comments before the statement are no way around it (read as
    PostgreSQL nests them and as SQLite does not)."""
    if _controls_the_transaction(sql):
        raise UsageError(
            f"{sql.strip()[:40]!r}: a handler's statement may not begin or end the "
            "transaction it runs in (effects commit with their positions, or not at all); "
            "raise to undo a record's work, or use SAVEPOINT / ROLLBACK TO inside it"
        )


@functools.lru_cache(maxsize=512)
def _controls_the_transaction(sql: str) -> bool:
    """Whether ``sql`` begins or ends a transaction (see refuse_transaction_control): read
    once per distinct statement, as every db call asks."""
    for nested in (True, False):
        words = re.findall(r"\w+", after_comments(sql, nested)[:80].upper())[:3]
        first = words[0] if words else ""
        ends = first in _ENDS_A_TRANSACTION or words[:2] == ["PREPARE", "TRANSACTION"]
        undoes_its_own = first == "ROLLBACK" and "TO" in words[1:3]
        if ends and not undoes_its_own:
            return True
    return False


def after_comments(sql: str, nested: bool) -> str:
    """``sql`` from its first word on: the blanks and comments before it skipped."""
    i = 0
    while True:
        while i < len(sql) and sql[i].isspace():
            i += 1
        if not sql.startswith(("--", "/*"), i):
            return sql[i:]
        i = after_comment(sql, i, nested)
        if i < 0:
            return ""  # never closed: the server refuses it


def checked_schema(schema: str | Iterable[str]) -> tuple[str, ...]:
    """A sink's ``schema=``: SQL statements, one per item (a lone string is one statement)."""
    statements = (schema,) if isinstance(schema, str) else tuple(schema)
    for statement in statements:
        if not isinstance(statement, str) or not statement.strip():
            raise ConfigError(
                f"schema={schema!r}: SQL statements as strings, one per item "
                "(CREATE TABLE IF NOT EXISTS ..., INSERT ... ON CONFLICT DO NOTHING)"
            )
    return statements


def dead_letter_headers(record: Record, error: BaseException, attempts: int) -> list[Header]:
    """A dead letter's headers: the record's own, then what failed, where, and how often."""
    message = "".join(traceback.format_exception_only(type(error), error)).strip()
    return [
        *record.headers,
        ("assured.error.type", type(error).__qualname__.encode()),
        ("assured.error.message", message.encode()[:4000]),
        ("assured.origin", record_id(record).encode()),
        ("assured.attempts", str(attempts).encode()),
    ]


def _text(value: bytes | None) -> str:
    # PostgreSQL's text refuses NUL; a cut UTF-8 sequence is dropped rather than refused
    return (value or b"").decode(errors="ignore").replace("\x00", "")


# SQLSTATEs of a statement the database failed because its transaction conflicted with
# another one that was running: a deadlock, a serialization failure. Nothing is wrong with the
# records: done again once the other has moved on, they succeed (the database's own advice).
_CONFLICTS = frozenset({"40001", "40P01"})


def conflicted(error: BaseException) -> bool:
    """Did the database fail a statement for a conflict with another transaction (a deadlock,
    a serialization failure), not for anything in the records?"""
    return getattr(error, "sqlstate", None) in _CONFLICTS


def record_id(message: MessageLike) -> str:
    """``topic[partition]@offset``: what ``Message.id`` says."""
    return f"{message.topic}[{message.partition}]@{message.offset}"


class Sink(abc.ABC):
    # The runtime's own SQL, written once; only the placeholder differs between databases.
    placeholder = "?"
    # Each database's CREATE statements for the runtime's tables (all IF NOT EXISTS).
    _ddl: tuple[str, ...] = ()
    # The App's own statements (its tables, seed rows), run by setup() after the runtime's.
    schema: tuple[str, ...] = ()
    _legacy_inbox = False  # an inbox table from before groups, with rows (see setup)
    # Records handled side by side (see runtime._shared_db): how many connections they may
    # use at once, each with its own transaction between two group commits, and how a commit
    # that holds no positions share-locks a partition's offsets row (so a claim waits for it).
    side_by_side_connections = 1
    share_lock = ""

    def side_by_side(self, group: str, incarnations: Mapping[str, str]) -> SideBySide:
        """A connection for records side by side: here the sink's own, through its plain
        transactions."""
        return _Plain(self, group, incarnations)

    def _sql(self, template: str) -> str:
        return template.replace("?", self.placeholder)

    @abc.abstractmethod
    def transaction(
        self, group: str | None = None, incarnations: Mapping[str, str] | None = None
    ) -> contextlib.AbstractContextManager[SinkTransaction]:
        """A database transaction for ``group`` (which the inbox and dead letters are kept
        under) reading topics of these ``incarnations``. It commits when the block ends, rolls
        back when it raises."""

    @abc.abstractmethod
    def _columns(self, tx: SinkTransaction, table: str) -> set[str]:
        """The columns of ``table``; empty when there is no such table."""

    def _setup_lock(self, tx: SinkTransaction) -> None:
        """Serialize concurrent setups (SQLite's write lock already does)."""

    def setup(self) -> None:
        """Create the runtime's tables (offsets, inbox, dead letters) if missing, and bring
        tables from older versions up to date, in place, then run the App's ``schema``
        statements: all in one transaction, one process at a time, before the first record."""
        with self.transaction() as tx:
            self._setup_lock(tx)
            for statement in self._ddl:
                tx.execute(statement)
            if "incarnation" not in self._columns(tx, "assured_offsets"):
                tx.execute("ALTER TABLE assured_offsets ADD COLUMN incarnation TEXT")
            if "group_id" not in self._columns(tx, "assured_inbox"):
                # Keyed by message alone (whatever the group): kept aside as assured_inbox_v1,
                # still consulted, so an upgrade never handles those messages again.
                if self._columns(tx, "assured_inbox_v1"):
                    tx.execute(
                        "INSERT INTO assured_inbox_v1 (message_id) SELECT message_id "
                        "FROM assured_inbox WHERE true ON CONFLICT DO NOTHING"
                    )
                    tx.execute("DROP TABLE assured_inbox")
                else:
                    tx.execute("ALTER TABLE assured_inbox RENAME TO assured_inbox_v1")
                tx.execute(_INBOX_DDL)
                log.info("inbox upgraded: deliveries are kept per group; old ones kept aside")
            self._legacy_inbox = bool(self._columns(tx, "assured_inbox_v1")) and (
                tx.execute("SELECT 1 FROM assured_inbox_v1 LIMIT 1").fetchone() is not None
            )
            for statement in self.schema:
                tx.execute(statement)

    def claim(
        self,
        group: str,
        partitions: Sequence[TopicPartition],
        incarnations: Mapping[str, str] | None = None,
    ) -> Claim:
        """Take ownership of ``partitions`` for ``group``: bump their epochs; return the stored
        offsets and the new epochs. An offset stored for another incarnation of the topic (it
        was deleted and created again) is dropped: the new topic has none yet."""
        incarnations = incarnations or {}
        before = self._sql(
            "SELECT incarnation, next_offset FROM assured_offsets "
            "WHERE group_id = ? AND topic = ? AND partition = ?"
        )
        upsert = self._sql(
            "INSERT INTO assured_offsets (group_id, topic, partition, epoch, incarnation) "
            "VALUES (?, ?, ?, 1, ?) ON CONFLICT (group_id, topic, partition) DO UPDATE "
            "SET epoch = assured_offsets.epoch + 1, next_offset = CASE "
            "WHEN excluded.incarnation <> assured_offsets.incarnation THEN NULL "
            "ELSE assured_offsets.next_offset END, "
            "incarnation = COALESCE(excluded.incarnation, assured_offsets.incarnation) "
            "RETURNING next_offset, epoch"
        )
        drop_done = self._sql(
            "DELETE FROM assured_done WHERE group_id = ? AND topic = ? AND partition = ?"
        )
        out: Claim = {}
        with self.transaction(group, incarnations) as tx:
            for tp in sorted(partitions):  # the order commits lock them in: no lock cycle
                incarnation = incarnations.get(tp.topic)
                old = tx.execute(before, (group, tp.topic, tp.partition)).fetchone()
                if old and incarnation and old[0] and old[0] != incarnation:
                    tx.execute(drop_done, (group, tp.topic, tp.partition))
                if old and incarnation and old[0] and old[0] != incarnation and old[1] is not None:
                    log.warning(
                        "%s was deleted and created again since group %r stored offset %d for "
                        "it: that offset belonged to the old topic and was dropped",
                        tp, group, old[1],
                    )  # fmt: skip
                row = tx.execute(upsert, (group, tp.topic, tp.partition, incarnation)).fetchone()
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
        with self.transaction(group) as tx:
            rows = tx.execute(query, (group,)).fetchall()
        return {TopicPartition(t, p): o for t, p, o in rows}

    def done_above(
        self, group: str, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, set[int]]:
        """Records of ``partitions`` marked handled above their stored positions (by handlers
        side by side): a new owner starts at the stored position and skips these."""
        wanted = set(partitions)
        query = self._sql(
            "SELECT d.topic, d.partition, d.record_offset FROM assured_done d "
            "JOIN assured_offsets o ON o.group_id = d.group_id AND o.topic = d.topic "
            "AND o.partition = d.partition WHERE d.group_id = ? "
            "AND d.record_offset >= COALESCE(o.next_offset, 0)"
        )
        with self.transaction(group) as tx:
            rows = tx.execute(query, (group,)).fetchall()
        out: dict[TopicPartition, set[int]] = {}
        for topic, partition, offset in rows:
            tp = TopicPartition(topic, partition)
            if tp in wanted:
                out.setdefault(tp, set()).add(int(offset))
        return out

    def has_offsets(self, group: str, topics: Iterable[str] | None = None) -> bool:
        """Whether this database holds a stored offset for ``group`` (of any of ``topics``).
        Under exactly-once the database is the truth: a group whose offsets the *log* has
        but this database has not is a sign the database was replaced or lost."""
        query = "SELECT 1 FROM assured_offsets WHERE group_id = ? AND next_offset IS NOT NULL"
        params: list[Any] = [group]
        if topics is not None:
            wanted = sorted(set(topics))
            if not wanted:
                return False
            query += f" AND topic IN ({', '.join('?' * len(wanted))})"
            params += wanted
        with self.transaction(group) as tx:
            return tx.execute(self._sql(query + " LIMIT 1"), params).fetchone() is not None

    def pending_dead_letters(self, group: str) -> int:
        """Dead letters of ``group`` committed here and not yet published by the relay."""
        query = self._sql(
            "SELECT count(*) FROM assured_dead_letters WHERE group_id = ? AND relayed_ms IS NULL"
        )
        with self.transaction(group) as tx:
            return int(tx.execute(query, (group,)).fetchone()[0])

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Sink:
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_INBOX_DDL = (
    "CREATE TABLE IF NOT EXISTS assured_inbox (group_id TEXT NOT NULL, message_id TEXT NOT NULL, "
    "CONSTRAINT assured_inbox_key PRIMARY KEY (group_id, message_id))"
)
# Serves both databases; only the id column differs (see each sink's DDL).
_DEAD_LETTERS_COLUMNS = (
    "group_id TEXT NOT NULL, dead_letter_topic TEXT NOT NULL, source_topic TEXT NOT NULL, "
    "source_partition INTEGER NOT NULL, source_offset BIGINT NOT NULL, key {blob}, value {blob}, "
    "headers {blob}, error_type TEXT NOT NULL, error_message TEXT NOT NULL, "
    "attempts INTEGER NOT NULL, created_ms BIGINT NOT NULL, relayed_ms BIGINT"
)


def ddl(id_column: str, blob: str) -> tuple[str, ...]:
    """The runtime's tables in one database's dialect."""
    return (
        "CREATE TABLE IF NOT EXISTS assured_offsets (group_id TEXT NOT NULL, topic TEXT NOT NULL, "
        "partition INTEGER NOT NULL, next_offset BIGINT, epoch BIGINT NOT NULL DEFAULT 0, "
        "incarnation TEXT, PRIMARY KEY (group_id, topic, partition))",
        _INBOX_DDL,
        f"CREATE TABLE IF NOT EXISTS assured_dead_letters ({id_column}, "
        f"{_DEAD_LETTERS_COLUMNS.format(blob=blob)})",
        "CREATE INDEX IF NOT EXISTS assured_dead_letters_pending "
        "ON assured_dead_letters (group_id, id) WHERE relayed_ms IS NULL",
        # One relay per group at a time: each takes over by bumping the epoch; `inflight` is
        # the batch it is publishing (ids, and where in the dead-letter topics it starts).
        "CREATE TABLE IF NOT EXISTS assured_dead_letter_relays (group_id TEXT PRIMARY KEY, "
        "epoch BIGINT NOT NULL, inflight TEXT)",
        # Records handled side by side, above their partition's stored next_offset: each is
        # marked here in the transaction of its effects, so a restart never repeats one.
        "CREATE TABLE IF NOT EXISTS assured_done (group_id TEXT NOT NULL, topic TEXT NOT NULL, "
        "partition INTEGER NOT NULL, record_offset BIGINT NOT NULL, "
        "PRIMARY KEY (group_id, topic, partition, record_offset))",
    )


MARK_DONE = (
    "INSERT INTO assured_done (group_id, topic, partition, record_offset) "
    "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
)


def fenced(tp: TopicPartition, group: str) -> SinkFencedError:
    error = SinkFencedError(
        f"{tp} of group {group!r} was claimed by another instance in the database; this "
        "transaction (effects and offsets) was rolled back"
    )
    error.partition = tp
    return error
