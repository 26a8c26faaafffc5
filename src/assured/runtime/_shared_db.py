"""A database sink for records handled side by side: one transaction shared by the records of
a step, a savepoint per record, and a group commit at the end of the step.

An ``async def`` handler with ``concurrency`` > 1 and ``sink=`` gets a :class:`RecordDb` as its
``db``: its calls are awaited (``await db.execute(...)``). A record's first call waits for the
database, takes it, and opens a savepoint in the shared transaction; the database stays the
record's until its handler returns (the savepoint is released) or raises (rolled back to the
savepoint: a failed attempt leaves nothing behind). The records' awaits elsewhere (an API, a
queue) overlap; their database work takes turns, so a handler should do its waiting before its
first database call, not between two of them.

Each step of the window ends with a group commit, one transaction for every record whose
handler ended since the last one (one fsync for many records, on SQLite as on PostgreSQL). A
record counts as handled only once that commit has landed. Under exactly-once the commit also
holds, per record above its partition's stored position, a mark in ``assured_done``, its dead
letter, and the partitions' new positions, each written only if this instance's epoch (the
claim's fencing token) still holds: a crash never repeats a record whose effects committed, even
above the contiguous prefix, and a new owner skips them. Between two steps no transaction is
open, so the protocol's own database work (claims, stored positions, the dead-letter relay)
never waits for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from inspect import CORO_CLOSED, CORO_CREATED
from typing import Any, TypeVar

from assured.errors import UsageError
from assured.log import Header, Record, TopicPartition
from assured.runtime.crashpoints import crash_point
from assured.sinks import Sink, SinkTransaction
from assured.sinks._base import MessageLike, fenced, refuse_transaction_control

T = TypeVar("T")

__all__ = ["Held", "RecordDb", "SharedTransaction", "WindowClosed"]

# A record handled into the shared transaction, and its dead letters (topic, record, headers).
Held = tuple[Record, list[tuple[str, Record, list[Header]]]]


class WindowClosed(BaseException):
    """The window was given up while a record waited for the database: its work counts for
    nothing. A BaseException, so a handler's ``except Exception`` does not swallow it."""


class SharedTransaction:
    """One window's database transaction, shared by its records between two group commits."""

    def __init__(
        self,
        sink: Sink,
        group: str,
        incarnations: Mapping[str, str],
        marks: bool,
        epochs: Callable[[], Mapping[TopicPartition, int]],
        region_limit_s: float = 60.0,
    ):
        self.sink = sink
        self.group = group
        self.incarnations = incarnations
        self.marks = marks  # exactly-once: marks, dead letters and positions go in the commit
        self.epochs = epochs
        self._lock = asyncio.Lock()
        self._open = asyncio.Event()  # set while records may take the database (in a step)
        self._cm: contextlib.AbstractContextManager[SinkTransaction] | None = None
        self.tx: SinkTransaction | None = None
        self.closed = False  # given up: no record may open a transaction any more
        self.lettered = False  # a commit held dead letters (the relay has work)
        # The record holding the database, since when; one held past region_limit_s (waiting
        # for a call that does not come back) is cancelled at the next group commit, and fails.
        self.region_limit_s = region_limit_s
        self.holder: asyncio.Task[Any] | None = None
        self.held_since = 0.0
        self.overran: asyncio.Task[Any] | None = None

    # Whether records above the stored positions are marked done (the audit's planted
    # ``side-by-side-without-marks`` turns it off, to show what the marks prevent).
    marked = True

    async def take(self, owner: asyncio.Task[Any] | None = None) -> SinkTransaction:
        """Wait for the database and take it; the transaction is begun if none is open. The
        gate is shut from a group commit to the next step: no record opens a transaction that
        would stay open while the App's thread is elsewhere."""
        while True:
            await self._open.wait()
            await self._lock.acquire()
            if self._open.is_set():
                break
            self._lock.release()  # a commit shut the gate while this one queued
        try:
            if self.closed:
                raise WindowClosed
            if self.tx is None:
                self._begin()
            self.holder, self.held_since = owner or asyncio.current_task(), time.monotonic()
            return self.tx  # type: ignore[return-value]
        except BaseException:
            self._lock.release()
            raise

    def _begin(self) -> None:
        cm = self.sink.transaction(group=self.group, incarnations=self.incarnations)
        self.tx = cm.__enter__()
        self._cm = cm

    def reopen(self) -> None:
        """A step begins: records may take the database again."""
        self.closed = False
        self._open.set()

    def give_back(self) -> None:
        self.holder = None
        self._lock.release()

    async def commit(
        self,
        collect: Callable[[], tuple[Sequence[Held], Mapping[TopicPartition, int]]],
        overdue: Callable[[], bool] = lambda: False,
        give_up: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Commit the open transaction once the record holding the database (if one does)
        has ended. ``collect()``, called then, says which records are in it and where their
        partitions now stand: under exactly-once their dead letters, marks for those at or
        above the new positions, and the positions go in too. While waiting, ``overdue()``
        says a stop's drain is over: ``give_up()`` then ends the records still running (their
        regions roll back). Raises what the sink raises: then nothing of it committed (or,
        :class:`~assured.sinks.SinkCommitUnknownError`, nobody knows)."""
        self._open.clear()  # shut until the next step: records that want the database wait
        while True:
            try:
                await asyncio.wait_for(self._lock.acquire(), 0.05)
                break
            except TimeoutError:
                if give_up is not None and overdue():
                    await give_up()
                holder = self.holder
                late = time.monotonic() - self.held_since > self.region_limit_s
                if holder is not None and late and self.overran is not holder:
                    self.overran = holder  # it fails with a TimeoutError (see Window)
                    holder.cancel()
        try:
            held, positions = collect()  # now: a record that ended meanwhile is in it too
            if self.marks and held and self.tx is None:
                self._begin()
            tx = self.tx
            if tx is None:
                return
            try:
                if self.marks:
                    self._write(tx, held, positions)
                    crash_point("after-effect-before-offset")  # written, not committed
            except BaseException as e:
                self.rollback(e)
                raise
            cm, self._cm, self.tx = self._cm, None, None
            assert cm is not None
            cm.__exit__(None, None, None)
        finally:
            self._lock.release()
        if not self.marks:
            crash_point("after-effect-before-offset")  # committed; the log's offsets not yet

    def _write(
        self,
        tx: SinkTransaction,
        held: Sequence[Held],
        positions: Mapping[TopicPartition, int],
    ) -> None:
        sql = self.sink._sql
        epochs = self.epochs()
        touched: set[TopicPartition] = set(positions)
        mark = sql(
            "INSERT INTO assured_done (group_id, topic, partition, record_offset) "
            "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
        )
        for record, letters in held:
            tp = TopicPartition(record.topic, record.partition)
            touched.add(tp)
            for topic, dead, headers in letters:
                tx.dead_letter(dead, topic=topic, headers=headers)
                self.lettered = True
            if self.marked and record.offset >= positions.get(tp, 0):
                tx.execute(mark, (self.group, tp.topic, tp.partition, record.offset))
        store = sql(
            "UPDATE assured_offsets SET next_offset = COALESCE(?, next_offset) "
            "WHERE group_id = ? AND topic = ? AND partition = ? AND epoch = ?"
        )
        below = sql(
            "DELETE FROM assured_done WHERE group_id = ? AND topic = ? AND partition = ? "
            "AND record_offset < ?"
        )
        for tp in sorted(touched):
            position = positions.get(tp)
            row = (position, self.group, tp.topic, tp.partition, epochs.get(tp, -1))
            if tx.execute(store, row).rowcount != 1:
                raise fenced(tp, self.group)
            if position is not None:
                tx.execute(below, (self.group, tp.topic, tp.partition, position))

    def rollback(self, error: BaseException | None = None) -> None:
        """Roll the open transaction back (a failed step, a given-up window); never raises."""
        self._open.clear()  # until the next step
        cm, self._cm, self.tx = self._cm, None, None
        if cm is not None:
            error = error or asyncio.CancelledError()
            with contextlib.suppress(BaseException):
                cm.__exit__(type(error), error, error.__traceback__)


class NotAwaitedError(UsageError):
    """A handler side by side called ``db.execute`` (or another ``db`` call) without ``await``:
    the statement never ran. Fatal: every record of the handler would lose its effects."""

    fatal = True


class RecordDb:
    """The ``db`` of an async handler side by side: the record's part of the shared database
    transaction. Every call is awaited; the first one waits for the database (see the module's
    docstring). Speaks the database's own SQL, as :class:`~assured.sinks.SinkTransaction`.
    A call left without ``await``, or still running when the handler returns, never counts:
    the record then fails and the App stops (:class:`NotAwaitedError`), rather than commit a
    record without its effects."""

    __slots__ = ("_calls", "_ended", "_first", "_owner", "_savepoint", "_shared", "_tx")

    def __init__(self, shared: SharedTransaction, owner: asyncio.Task[Any]):
        self._shared = shared
        self._owner = owner  # the record's task: whoever awaits the calls, the region is its
        self._tx: SinkTransaction | None = None
        self._savepoint: contextlib.AbstractContextManager[None] | None = None
        self._ended = False
        self._calls: list[Coroutine[Any, Any, Any]] = []
        self._first = asyncio.Lock()  # calls side by side (gather) wait for the first one's take

    @property
    def group(self) -> str:
        return self._shared.group

    def _call(self, coro: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
        if self._ended:
            coro.close()
            raise UsageError(
                "db was used after the handler returned (a task it left running?): its part "
                "of the transaction is over; do every database call before returning"
            )
        self._calls.append(coro)
        return coro

    async def _take(self) -> SinkTransaction:
        async with self._first:
            if self._tx is None:
                tx = await self._shared.take(self._owner)
                if self._ended:  # a call left running took the database after the return
                    self._shared.give_back()
                    raise UsageError("db was used after the handler returned")
                try:
                    savepoint = tx.savepoint(release=False)  # regions never overlap
                    savepoint.__enter__()
                except BaseException:
                    self._shared.give_back()
                    raise
                self._tx, self._savepoint = tx, savepoint
            if self._ended:
                raise UsageError("db was used after the handler returned")
            return self._tx

    def hold(self) -> Coroutine[Any, Any, Any]:
        """Take the database for this record now and return the transaction itself, for code
        that calls it without awaiting (``tx.execute(...)``, ``tx.connection``). It is this
        record's until the handler returns; used after that, it raises."""
        return self._call(self._hold())

    async def _hold(self) -> Any:
        return _Guarded(await self._take(), self)

    def execute(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> Coroutine[Any, Any, Any]:
        """``sql`` in the record's part of the transaction; awaited, returns the cursor."""
        refuse_transaction_control(sql)
        return self._call(self._execute(sql, params))

    async def _execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any]) -> Any:
        return (await self._take()).execute(sql, params)

    def first_delivery(self, message: MessageLike | str) -> Coroutine[Any, Any, bool]:
        """As :meth:`SinkTransaction.first_delivery`, awaited: False if ``message`` was
        delivered to this group before (its effects committed)."""
        return self._call(self._first_delivery(message))

    async def _first_delivery(self, message: MessageLike | str) -> bool:
        return (await self._take()).first_delivery(message)

    @property
    def connection(self) -> Any:
        raise UsageError(
            "db.connection is not offered to handlers side by side: the connection is shared, "
            "and only awaited db calls take turns on it (await db.hold() gives the "
            "transaction for code that cannot await)"
        )

    def end(self, error: BaseException | None) -> None:
        """The handler returned (``error`` None: keep its work) or raised (undo it). Raises
        what the database raised while doing so (the database's failure, not the record's),
        or :class:`NotAwaitedError` for a call never awaited or not finished (its work is
        undone)."""
        self._ended = True
        open_calls = [c for c in self._calls if inspect.getcoroutinestate(c) != CORO_CLOSED]
        self._calls = []
        for call in open_calls:
            if inspect.getcoroutinestate(call) == CORO_CREATED:
                call.close()  # never to run: said below, not in a RuntimeWarning
        if error is None and open_calls:
            error = NotAwaitedError(
                f"{len(open_calls)} db call(s) of the handler were never awaited, or had not "
                "finished when it returned, so they count for nothing; side by side every "
                "database call is awaited before the handler returns: "
                "'await db.execute(...)'. Nothing of this record was committed."
            )
            with contextlib.suppress(NotAwaitedError):
                self.end(error)
            raise error
        if self._tx is None:
            return
        savepoint, self._savepoint, self._tx = self._savepoint, None, None
        try:
            assert savepoint is not None
            if error is None:
                savepoint.__exit__(None, None, None)
            else:
                with _unless_same(error):
                    savepoint.__exit__(type(error), error, error.__traceback__)
        finally:
            self._shared.give_back()


class _Guarded:
    """The transaction :meth:`RecordDb.hold` gives: usable until the handler returns."""

    __slots__ = ("_owner", "_tx")

    def __init__(self, tx: SinkTransaction, owner: RecordDb):
        self._tx = tx
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        if self._owner._ended:
            raise UsageError(
                "the transaction from db.hold() was used after the handler returned: its part "
                "of the transaction is over"
            )
        return getattr(self._tx, name)


@contextlib.contextmanager
def _unless_same(error: BaseException) -> Iterator[None]:
    """Swallow ``error`` itself coming back out of a savepoint's exit (the caller re-raises
    it); let any other error (the database's) through."""
    try:
        yield
    except BaseException as e:
        if e is not error:
            raise
