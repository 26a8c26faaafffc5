"""A database sink for records handled side by side: transactions shared by the records of
a step, a savepoint per record, and a group commit at the end of the step.

An ``async def`` handler with ``sink=`` (at any concurrency) gets a :class:`RecordDb` as its
``db``: its calls are awaited (``await db.execute(...)``). A record's first call waits for a
*connection* of the window, takes it, and opens a savepoint in that connection's transaction
(in the same round trip as the call, where the database allows); the connection stays the
record's until its handler returns (its part is kept) or raises (rolled back to the savepoint:
a failed attempt leaves nothing behind). The records' awaits elsewhere (an API, a queue)
overlap; on one connection their database work takes turns, so a handler should do its waiting
before its first database call.

How many connections a window may use at once is the sink's ``side_by_side_connections``:
one on SQLite, the sink's own (its writers take turns anyway, and its calls never wait on a
network); up to eight on PostgreSQL, each its own async connection (psycopg's
``AsyncConnection``), opened only when those before it are all busy, so no round trip stops
the App's event loop. Records of one lane (a key, or a partition: see ``_concurrent``) that
reach the database between two group commits all use the same connection, so their effects
commit or roll back together and in their order.

Each step of the window ends with a group commit: one commit per connection in use, for every
record whose handler ended since the last one (one fsync for many records). A record counts as
handled only once its connection's commit has landed. Under exactly-once each commit marks its
records done in ``assured_done``, fenced by the partitions' epochs (the claim's token), so a
crash never repeats a record whose effects committed, even above the contiguous prefix, and a
new owner skips them; the step's last commit holds the dead letters and the partitions' new
positions too, and is made only once every other connection's commit has landed (with one
connection in use, that is one transaction for it all). Between two steps no transaction is
open, so the protocol's own database work (claims, stored positions, the dead-letter relay)
never waits for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from inspect import CORO_CLOSED, CORO_CREATED
from typing import Any, TypeVar

from assured.errors import UsageError
from assured.log import Header, Record, TopicPartition
from assured.runtime.crashpoints import crash_point
from assured.sinks import Sink, SinkCommitUnknownError, SinkFencedError, SinkTransaction
from assured.sinks._base import (
    Attempt,
    BatchRefusedError,
    CommitWaitError,
    MessageLike,
    SideBySide,
    StrayStatementError,
    fenced,
    refuse_transaction_control,
)

T = TypeVar("T")

log = logging.getLogger("assured.runtime")

__all__ = ["Held", "RecordDb", "SharedTransaction", "WindowClosed"]

# A record handled into the shared transaction, and its dead letters (topic, record, headers).
Held = tuple[Record, list[tuple[str, Record, list[Header]]]]

# A record that holds its connection this long may be waiting for another's row lock.
_BLOCKED_S = 0.05
# A record cancelled for holding its connection past its limit and still holding it this
# much later swallows its cancellation. Longer than a give-up's 5 s: a call cancelled on
# PostgreSQL may take that long to have its statement cancelled on the server, then its answer.
_SWALLOWED_S = 15.0
# At most this many records' first statements go in one message (see SharedTransaction.first).
_BATCH = 64
# Batches are made while fewer than this share of records call the database again after their
# first statement (each such call undoes the batch's statements after its own; see first).
_AGAIN = 0.25


class WindowClosed(BaseException):
    """The window was given up while a record waited for the database: its work counts for
    nothing. A BaseException, so a handler's ``except Exception`` does not swallow it."""


class _Waiter(asyncio.Future["_Lane"]):
    """A record waiting for a connection, with its first statement (``sql, params``) when a
    batch may run it before the record's turn (see :meth:`SharedTransaction.first`)."""

    __slots__ = ("first", "generation", "ran", "savepoint")

    def __init__(self, loop: asyncio.AbstractEventLoop, first: tuple[str, Any] | None):
        super().__init__(loop=loop)
        self.first = first
        self.savepoint: str | None = None  # its savepoint, once in a batch
        self.ran: Any = None  # its first statement's result, run by a batch: it stands
        self.generation = 0  # of the transaction it ran in

    def unrun(self) -> None:
        self.savepoint = None
        self.ran = None


class _Lane:
    """One connection of the window and what its open transaction holds."""

    __slots__ = ("conn", "held_since", "holder", "members", "ready", "waiting")

    def __init__(self, conn: SideBySide):
        self.conn = conn
        # The record holding it (its task; a future while it is being handed over), since when.
        self.holder: Any = None
        self.held_since = 0.0
        self.members: list[Record] = []  # records whose part the open transaction keeps
        self.waiting: deque[_Waiter] = deque()  # records bound to this one
        # Records whose first statements a batch ran on it, in the message's order: each gets
        # the connection in turn, before anyone else, even while the gate is shut.
        self.ready: deque[_Waiter] = deque()


class SharedTransaction:
    """One window's database connections and their transactions, shared by its records
    between two group commits."""

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
        self.most = max(1, sink.side_by_side_connections)
        self.lanes: list[_Lane] = []
        self._any: deque[_Waiter] = deque()  # records waiting for any lane
        self._bound: dict[Any, _Lane] = {}  # a record lane -> its connection, until the commit
        self._gate = False  # open while records may take the database (in a step)
        self._idle: asyncio.Future[None] | None = None  # a commit waiting for lanes to free
        self._names = itertools.count(1)
        self._failed: list[BaseException] = []  # commits between two group commits that failed
        self.closed = False  # given up: no record may open a transaction any more
        self.lettered = False  # a commit held dead letters (the relay has work)
        # A record held past region_limit_s (waiting for a call that does not come back) is
        # cancelled at the next group commit, and fails.
        self.region_limit_s = region_limit_s
        # Each such record's task, and when it was cancelled (its attempt takes it out).
        self.overran: dict[asyncio.Task[Any], float] = {}
        # How often a record calls the database again after its first statement (decaying
        # from 1: no batch before the handler is seen to make one call only).
        self.again = 1.0
        # SQL that was in a message of several records' the database refused whole (one did
        # not parse): it goes on its own until it has run so once.
        self._alone: set[str] = set()

    # Whether records above the stored positions are marked done (the audit's planted
    # ``side-by-side-without-marks`` turns it off, to show what the marks prevent).
    marked = True

    # -- taking and giving back a connection ------------------------------------------------

    async def take(
        self,
        owner: asyncio.Task[Any] | None = None,
        affinity: Any = None,
        first: tuple[str, Any] | None = None,
    ) -> tuple[_Lane, _Waiter | None]:
        """Wait for a connection and take it: the one ``affinity`` (the record's lane) used
        since the last commit, else any free one (a new one while under the sink's number).
        The gate is shut from a group commit to the next step: no record opens a transaction
        that would stay open while the App's thread is elsewhere. ``first``: the record's
        first statement, which a batch may run while it waits; returned with the connection
        then is its waiter, whose ``ran`` is the statement's result (its part is open: the
        caller takes it, or hands it to :meth:`unused`)."""
        self._still_open()
        lane = self._pick(affinity) if self._gate else None
        ran = None
        if lane is None:
            waiter = _Waiter(asyncio.get_running_loop(), first)
            bound = self._bound.get(affinity) if affinity is not None else None
            (bound.waiting if bound is not None else self._any).append(waiter)
            try:
                lane = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self.unused(waiter.result(), waiter)  # handed over as it was cancelled
                else:
                    waiter.cancel()  # skipped when its turn comes (its statement undone)
                raise
            if waiter.ran is not None:
                ran = waiter
            try:
                self._still_open()
            except WindowClosed:
                self.unused(lane, ran)
                raise
        lane.holder = owner or asyncio.current_task()
        lane.held_since = time.monotonic()
        if affinity is not None:
            self._bound[affinity] = lane
        return lane, ran

    def unused(self, lane: _Lane, waiter: _Waiter | None) -> None:
        """Give ``lane`` back unused by a record handed it: a first statement a batch ran for
        it is undone (and with it those after it, which go again)."""
        if waiter is not None and waiter.ran is not None:
            self._undo_from(lane, waiter)
        self.give_back(lane)

    def _undo_from(self, lane: _Lane, waiter: _Waiter) -> None:
        """``waiter``'s statement, run by a batch, and those after it will not stand: the
        connection undoes them before its next use; the records after it wait again."""
        conn = lane.conn
        if conn.in_transaction and conn.generation == waiter.generation:
            assert waiter.savepoint is not None
            conn.undo_later(waiter.savepoint)
        waiter.unrun()
        self._requeue(lane)

    def _requeue(self, lane: _Lane) -> None:
        """The records whose statements a batch ran on ``lane`` wait again, first, their
        statements undone (or about to be)."""
        waiters = list(lane.ready)
        lane.ready.clear()
        self._wait_again(lane, waiters)

    def _wait_again(self, lane: _Lane, waiters: list[_Waiter]) -> None:
        """``waiters`` (taken from the queues for a batch on ``lane``) wait again, first, in
        their order: for ``lane``, or, if the window no longer uses it (see
        :meth:`_one_connection`), for any connection (a free one is handed to them)."""
        used = lane in self.lanes[: self.most]
        queue = lane.waiting if used else self._any
        for waiter in reversed(waiters):
            waiter.unrun()
            queue.appendleft(waiter)
        if not used and waiters:
            for other in self.lanes[: self.most]:
                if other.holder is None:
                    self._serve(other)

    def _still_open(self) -> None:
        if self.closed:
            raise WindowClosed

    def _pick(self, affinity: Any) -> _Lane | None:
        bound = self._bound.get(affinity) if affinity is not None else None
        if bound is not None:
            return bound if bound.holder is None else None
        for lane in self.lanes[: self.most]:
            if lane.holder is None:
                return lane
        if len(self.lanes) < self.most:
            return self._new_lane()
        return None

    def _new_lane(self) -> _Lane:
        lane = _Lane(self.sink.side_by_side(self.group, self.incarnations))
        self.lanes.append(lane)
        return lane

    def give_back(self, lane: _Lane) -> None:
        lane.holder = None
        self._serve(lane)
        if lane.holder is None and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _serve(self, lane: _Lane) -> None:
        """Hand a free ``lane`` to the next record whose statement a batch ran on it (gate
        shut or not: its statement is in the transaction), else, while the gate is open, to
        the first record waiting for it (bound to it, or for any)."""
        while lane.ready:
            waiter = lane.ready.popleft()
            if waiter.done():  # given up meanwhile: its statement must not stand
                self._undo_from(lane, waiter)
                break
            lane.holder = waiter  # reserved until the record resumes
            waiter.set_result(lane)
            return
        if not (self._gate and lane in self.lanes[: self.most]):
            return
        for queue in (lane.waiting, self._any):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    lane.holder = waiter  # reserved until the record resumes
                    waiter.set_result(lane)
                    return

    # -- a batch of first statements --------------------------------------------------------

    async def first(self, lane: _Lane, savepoint: str, sql: str, params: Any) -> Any:
        """A record's first statement (``savepoint`` taken first) on ``lane``, which it holds.
        Where the connection allows, the first statements of the records waiting for it go in
        the same message (one message costs the server a whole statement's worth of CPU).
        Each of them gets its result only on its turn, as if its statement had run then: the
        records ahead of it have all ended, and none made a call after it ran. So a record
        that calls again, or fails, first has the statements after its own undone (they go
        again); one of them given up meanwhile has its own and those after it undone."""
        conn = lane.conn
        batch = self._followers(lane) if conn.batches and sql not in self._alone else []
        # Its own merged text only with others to go with it (else execute merges it).
        head = conn.first_text(savepoint, sql, params) if batch else None
        if head is None:
            self._wait_again(lane, [waiter for waiter, _ in batch])
            result = await conn.execute(sql, params, savepoint)
            self._alone.discard(sql)  # not the one at fault
            return result
        pieces = [(savepoint, head)] + [(w.savepoint or "", text) for w, text in batch]
        stood: list[Any] = []
        try:
            result, stood = await conn.execute_firsts(pieces)
        except BatchRefusedError:
            if len(self._alone) > 1000:
                self._alone.clear()
            self._alone.add(sql)
            self._alone.update(w.first[0] for w, _ in batch if w.first is not None)
            raise
        finally:
            generation = conn.generation
            waiters = [w for w, _ in batch]
            for waiter, ran in zip(waiters, stood, strict=False):
                waiter.ran, waiter.generation = ran, generation
                lane.ready.append(waiter)
            self._wait_again(lane, waiters[len(stood) :])  # not run, or undone
        return result

    def _followers(self, lane: _Lane) -> list[tuple[_Waiter, str]]:
        """Records waiting for ``lane`` (bound to it, then for any) whose first statements
        can go in its next message, in order, each with its savepoint and its piece of the
        message."""
        if not self._gate or self.again >= _AGAIN or lane not in self.lanes[: self.most]:
            return []
        batch: list[tuple[_Waiter, str]] = []
        conn = lane.conn
        # Of the records waiting for any connection, this one takes its share: the others
        # are served as their connections free (the gate's reopening hands each free one a
        # record at once). A batch's records get their connection one after another, a turn
        # of the loop each, so one long batch kept its last records waiting many turns while
        # other connections ran one record each.
        share = len(lane.waiting) + -(-len(self._any) // self.most)
        for queue in (lane.waiting, self._any):
            while queue and len(batch) < min(_BATCH, share):
                waiter = queue[0]
                if waiter.done():
                    queue.popleft()
                    continue
                if waiter.first is None or waiter.first[0] in self._alone:
                    return batch
                savepoint = self.savepoint_name()
                text = conn.first_text(savepoint, *waiter.first)
                if text is None:
                    return batch
                queue.popleft()
                waiter.savepoint = savepoint
                batch.append((waiter, text))
        return batch

    def undo_after(self, lane: _Lane) -> None:
        """The statements a batch ran after the part of the record holding ``lane`` are
        undone before the connection's next use; those records wait again."""
        if lane.ready:
            self._undo_from(lane, lane.ready[0])

    def called_again(self, lane: _Lane | None) -> None:
        """The record holding ``lane`` makes another call after its first statement: the
        statements a batch ran after its own are undone first (those records go again)."""
        self.again += (1.0 - self.again) * 0.05
        if lane is not None:
            self.undo_after(lane)

    def ended_after_one(self) -> None:
        """A record ended having made one call."""
        self.again -= self.again * 0.05

    def reopen(self) -> None:
        """A step begins: records may take the database again."""
        self.closed = False
        self._gate = True
        for lane in self.lanes[self.most :]:  # no longer used (see _commit_marked)
            self._any.extend(lane.waiting)
            lane.waiting.clear()
        for lane in self.lanes[: self.most]:
            if lane.holder is None:
                self._serve(lane)
        while self._any and len(self.lanes) < self.most:
            waiter = self._any.popleft()
            if not waiter.done():
                lane = self._new_lane()
                lane.holder = waiter
                waiter.set_result(lane)

    def savepoint_name(self) -> str:
        return f"assured_r{next(self._names)}"

    # -- the group commit -------------------------------------------------------------------

    async def commit(
        self,
        collect: Callable[[], tuple[Sequence[Held], Mapping[TopicPartition, int]]],
        overdue: Callable[[], bool] = lambda: False,
        give_up: Callable[[], Awaitable[object]] | None = None,
        landed: Callable[[list[Record]], None] = lambda _records: None,
    ) -> None:
        """Commit the open transactions once every record holding a connection has ended.
        ``collect()``, called then, says which records are in them and where their partitions
        now stand: under exactly-once their marks, their dead letters and the positions go in
        too. While waiting, ``overdue()`` says a stop's drain is over: ``give_up()`` then ends
        the records still running (their parts roll back); a connection whose record is done
        commits at once (a record still running may be waiting for one of its row locks).
        ``landed(records)`` is told of each connection's records once its own commit landed,
        before the last one. Raises what the sink raises: then nothing more committed (or,
        :class:`~assured.sinks.SinkCommitUnknownError`, nobody knows what)."""
        self._gate = False  # shut until the next step: records that want the database wait
        try:
            errors = await self._regions_ended(overdue, give_up, landed)
            held, positions = collect()  # now: a record that ended meanwhile is in it too
            if errors:
                raise _worst(errors)  # what the others hold rolls back too: all redone
            used = [lane for lane in self.lanes if lane.conn.in_transaction]
            if self.marks and (held or positions) and not used:
                # Dead letters and marks, or positions moved by records whose connections
                # committed already (their marks alone are not where the next owner starts).
                first = self.lanes[0] if self.lanes else self._new_lane()
                await first.conn.begin()
                used = [first]
            if not used:
                return
            if not self.marks and len(used) > 1:
                # No positions or marks go in: nothing orders the commits, so they all go at
                # once (one round trip, where one after the others took two while records
                # that want the database waited at the shut gate). Each is bounded: two may
                # wait for each other's locks (see _commit_marked).
                errors = await self._commit_lanes(used, landed)
                if errors:
                    raise _worst(errors)
                crash_point("after-effect-before-offset")  # committed; the log's not yet
                return
            last, others = used[0], used[1:]
            theirs = {id(r) for lane in others for r in lane.members}
            ours = [h for h in held if id(h[0]) not in theirs]  # the others mark their own
            if others:
                errors = await self._commit_lanes(others, landed)
                if errors:
                    raise _worst(errors)
            if self.marks:
                await self._write(last.conn, ours, positions)
                crash_point("after-effect-before-offset")  # written, not committed
            last.members = []
            await last.conn.commit()
            if not self.marks:
                crash_point("after-effect-before-offset")  # committed; the log's not yet
        except BaseException as e:
            await self._roll_back_all(e)
            raise
        finally:
            self._failed = []
            self._bound.clear()
            for lane in self.lanes:
                lane.members = []

    async def unblock(self, landed: Callable[[list[Record]], None]) -> None:
        """During a step, while records run: a record that has held its connection a while
        may be waiting for a row lock that another connection's open transaction holds, and
        that transaction ends only at a commit. So the connections already free commit now
        (roll back, once one such commit failed: the step's commit then fails, and everything
        of it is handled again). A record held past ``region_limit_s`` is cancelled."""
        now = time.monotonic()
        stuck = False
        for lane in self.lanes:
            holder = lane.holder
            if not isinstance(holder, asyncio.Task) or now - lane.held_since < _BLOCKED_S:
                continue
            stuck = True
            self._cancel_if_overrun(lane, now)
        free = [ln for ln in self.lanes if ln.holder is None and ln.conn.in_transaction]
        if not (stuck and free):
            return
        for lane in free:
            lane.holder = self  # taken for its commit: no record gets it meanwhile
        try:
            self._failed += await self._settle(free, landed)
        finally:
            for lane in free:
                self.give_back(lane)

    async def _settle(
        self, lanes: list[_Lane], landed: Callable[[list[Record]], None]
    ) -> list[BaseException]:
        """Commit free ``lanes`` before the step's commit (see :meth:`unblock`), or roll them
        back once a commit of this step failed; returns the errors."""
        if not self._failed:
            return await self._commit_lanes(lanes, landed)
        for lane in lanes:
            lane.members = []
            await lane.conn.rollback(asyncio.CancelledError())
        return []

    async def _regions_ended(
        self,
        overdue: Callable[[], bool],
        give_up: Callable[[], Awaitable[object]] | None,
        landed: Callable[[list[Record]], None],
    ) -> list[BaseException]:
        """Wait until no record holds a connection. A record that has held one a while
        (``_BLOCKED_S``) may be waiting for a row lock of another connection's open
        transaction: the connections already free then commit (see :meth:`unblock`). Until
        then they wait, so that in the common case (records ending their statements) every
        connection commits at once, side by side, rather than in rounds, one after another,
        while records that want the database wait at the shut gate. Returns the errors of
        the commits made early."""
        loop = asyncio.get_running_loop()
        while True:
            busy = [lane for lane in self.lanes if lane.holder is not None]
            if not busy:
                return self._failed
            free = [ln for ln in self.lanes if ln.holder is None and ln.conn.in_transaction]
            now = time.monotonic()
            wait = 0.05
            if free:
                since = min(
                    (ln.held_since for ln in busy if isinstance(ln.holder, asyncio.Task)),
                    default=math.inf,
                )
                if now - since >= _BLOCKED_S:
                    self._failed += await self._settle(free, landed)
                    continue
                wait = min(wait, max(0.001, since + _BLOCKED_S - now))
            self._idle = loop.create_future()
            await asyncio.wait([self._idle], timeout=wait)
            if give_up is not None and overdue():
                await give_up()
            now = time.monotonic()
            for lane in busy:
                self._cancel_if_overrun(lane, now)

    def _cancel_if_overrun(self, lane: _Lane, now: float) -> None:
        """Cancel the record holding ``lane`` if it has held it past ``region_limit_s``: it
        fails with a TimeoutError (see Window). Still holding it ``_SWALLOWED_S`` after that,
        it swallows its cancellation: nothing of the window can commit while it holds the
        connection, so the App stops (:class:`HeldPastLimitError`) rather than hang."""
        holder = lane.holder
        if not isinstance(holder, asyncio.Task):
            return
        if now - lane.held_since <= self.region_limit_s:
            return
        cancelled = self.overran.get(holder)
        if cancelled is None:
            self.overran[holder] = now
            holder.cancel()
        elif now - cancelled > _SWALLOWED_S:
            raise HeldPastLimitError(
                f"a record's handler held its database connection for over "
                f"{self.region_limit_s:g} s (transaction_timeout_ms), was cancelled, and "
                f"went on for {_SWALLOWED_S:g} s more: it swallows asyncio.CancelledError "
                "(a bare 'except:' or 'except BaseException:' around an await?). Nothing of "
                "the window can commit while it holds the connection, so the App stops; "
                "nothing of that record was committed. Let CancelledError through, and give "
                "the handler's own waits timeouts."
            )

    async def _commit_lanes(
        self, lanes: list[_Lane], landed: Callable[[list[Record]], None]
    ) -> list[BaseException]:
        """Commit ``lanes`` side by side, each without positions (under exactly-once with a
        mark for each of its records, fenced); tell ``landed`` of those that landed; return
        the errors of the others (rolled back, or of unknown outcome)."""
        results = await asyncio.gather(
            *(self._commit_marked(lane) for lane in lanes), return_exceptions=True
        )
        errors: list[BaseException] = []
        for lane, result in zip(lanes, results, strict=True):
            members, lane.members = lane.members, []
            if isinstance(result, BaseException):
                errors.append(result)
                await lane.conn.rollback(result)
            else:
                landed(members)
        return errors

    async def _commit_marked(self, lane: _Lane) -> None:
        """Under exactly-once, each partition's epoch is checked and its offsets row
        share-locked (a claim waits for this commit, then sees the marks), then the marks."""
        try:
            if not self.marks:
                await lane.conn.commit(bounded=True)  # another lane may hold what it waits for
                return
            epochs = self.epochs()
            theirs = {TopicPartition(r.topic, r.partition) for r in lane.members}
            marks = [(r.topic, r.partition, r.offset) for r in lane.members] if self.marked else []
            claimed = await lane.conn.commit_marked(
                [(tp, epochs.get(tp, -1)) for tp in sorted(theirs)], marks
            )
            if claimed is not None:
                raise fenced(claimed, self.group)
        except CommitWaitError:
            if self.most > 1:
                log.warning(
                    "records of handler side by side waited for each other's locks at a "
                    "commit (a deferred constraint?): they go on one connection from now on"
                )
                self._one_connection()
            raise

    def _one_connection(self) -> None:
        """From now on the window uses its first connection only: records bound to another,
        or waiting for one, go to it."""
        self.most = 1
        first = self.lanes[0]
        self._bound = {k: lane for k, lane in self._bound.items() if lane is first}
        for lane in self.lanes[1:]:
            self._any.extend(lane.waiting)
            lane.waiting.clear()
        if self._gate and first.holder is None:
            self._serve(first)

    async def _write(
        self,
        conn: SideBySide,
        held: Sequence[Held],
        positions: Mapping[TopicPartition, int],
    ) -> None:
        """The last commit's part under exactly-once: dead letters, marks of the records at
        or above the new positions, and the positions, each only if the epoch is ours."""
        epochs = self.epochs()
        touched: set[TopicPartition] = set(positions)
        marks = []
        for record, letters in held:
            tp = TopicPartition(record.topic, record.partition)
            touched.add(tp)
            for topic, dead, headers in letters:
                await conn.dead_letter(dead, topic, headers)
                self.lettered = True
            if self.marked and record.offset >= positions.get(tp, 0):
                marks.append((tp.topic, tp.partition, record.offset))
        claimed = await conn.store_positions(
            marks, [(tp, positions.get(tp), epochs.get(tp, -1)) for tp in sorted(touched)]
        )
        if claimed is not None:
            raise fenced(claimed, self.group)

    # -- giving up --------------------------------------------------------------------------

    async def _roll_back_all(self, error: BaseException) -> None:
        self._gate = False
        for lane in self.lanes:
            self._requeue(lane)  # what a batch ran for them is rolled back too
        # A record still running may be in a call on its connection (a statement waiting
        # for a lock, or one its handler never lets end): a ROLLBACK would wait behind it, so
        # that connection is abandoned instead (its transaction never commits; it is dropped
        # at its next rollback, once the record is given up).
        busy = [
            lane
            for lane in self.lanes
            if isinstance(lane.holder, asyncio.Task) and lane.conn.call_under_way()
        ]
        for lane in busy:
            lane.conn.abandon()
        await asyncio.gather(
            *(lane.conn.rollback(error) for lane in self.lanes if lane not in busy),
            return_exceptions=True,
        )

    async def rollback(self, error: BaseException | None = None) -> None:
        """Roll the open transactions back (a failed step, a given-up window); never raises."""
        await self._roll_back_all(error or asyncio.CancelledError())
        self._failed = []  # that step is over: the next one starts clean
        self._bound.clear()
        for lane in self.lanes:
            lane.members = []

    async def close(self) -> None:
        """Roll back what is open and close the window's own connections."""
        await self.rollback()
        for lane in self.lanes:
            with contextlib.suppress(Exception):
                await lane.conn.close()
        self.lanes = []


def _worst(errors: Sequence[BaseException]) -> BaseException:
    """Of the errors of a step's commits, the one the protocol must act on first: a fence
    (the partitions went elsewhere), then a commit of unknown outcome, then the first."""
    for kind in (SinkFencedError, SinkCommitUnknownError):
        for e in errors:
            if isinstance(e, kind):
                return e
    return errors[0]


class HeldPastLimitError(UsageError):
    """A handler held its database connection past ``transaction_timeout_ms`` and swallowed
    the cancellation that followed. Fatal: the window's group commit waits for that
    connection, so nothing more could commit."""

    fatal = True


class NotAwaitedError(UsageError):
    """An async def handler into a sink called ``db.execute`` (or another ``db`` call) without
    ``await``: the statement never ran. Fatal: every record of the handler would lose its
    effects."""

    fatal = True


class UnawaitedUseError(NotAwaitedError, AttributeError):
    """An async def handler used its ``db`` as the plain transaction: a result of ``db.execute``
    read without ``await`` (``.fetchone()``, a loop over it), or a call ``db`` does not offer
    (``db.savepoint()``, ``db.dead_letter()``, ``db.connection``). Fatal, so that a handler
    written for the plain transaction stops the App rather than have every record
    dead-lettered. An AttributeError too, for ``hasattr``."""


def _unawaited(what: str) -> UnawaitedUseError:
    return UnawaitedUseError(
        f"{what}: an async def handler's db is awaited at any concurrency: "
        "'rows = await db.execute(...)' (its result is read once awaited: rows.fetchone()), "
        "'await db.first_delivery(msg)'; on SQLite 'tx = await db.hold()' gives the plain "
        "transaction (savepoint(), connection, dead_letter()) for code that cannot await. "
        "A plain def handler gets the plain transaction."
    )


class RecordDb(Attempt):
    """The ``db`` of an async handler into a sink (at any concurrency): the record's part of a
    shared database transaction. Every call is awaited; the first one waits for a connection
    (see the module's docstring). Speaks the database's own SQL, as
    :class:`~assured.sinks.SinkTransaction`. A call left without ``await``, or still running
    when the handler returns, never counts: the record then fails and the App stops
    (:class:`NotAwaitedError`), rather than commit a record without its effects."""

    __slots__ = (
        "_affinity", "_calls", "_calls_made", "_generation", "_lane", "_lock", "_member",
        "_owner", "_region", "_running", "_shared",
    )  # fmt: skip

    def __init__(
        self,
        shared: SharedTransaction,
        owner: asyncio.Task[Any],
        member: Record | None = None,
        affinity: Any = None,
    ):
        self._shared = shared
        self._owner = owner  # the record's task: whoever awaits the calls, the region is its
        self._member = member  # the record, named to its connection's commit once it returns
        self._affinity = affinity  # its lane (key or partition): one connection per commit
        self._lane: _Lane | None = None
        self._region: str | None = None  # its savepoint, once taken
        self._generation = 0  # of the transaction its savepoint is in
        self.over = False  # the handler returned: whatever still runs under it is refused
        self._calls: list[Coroutine[Any, Any, Any]] = []
        self._calls_made = 0  # on the database, in this attempt
        self._running: set[asyncio.Task[Any]] = set()  # tasks in a call of it
        self._lock = asyncio.Lock()  # calls side by side (gather) take turns

    @property
    def group(self) -> str:
        return self._shared.group

    def _call(self, coro: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
        if self.over:
            coro.close()
            raise StrayStatementError(
                "db was used after the handler returned (a task it left running?): its part "
                "of the transaction is over; do every database call before returning"
            )
        self._calls.append(coro)
        return coro

    async def _run(
        self,
        call: Callable[[SideBySide, str | None], Awaitable[T]],
        first: tuple[str, Any] | None = None,
    ) -> T:
        """``call(connection, savepoint)`` on the record's connection: ``savepoint`` is the
        one to take first (the record's first call; the transaction is begun if none is
        open), else None. ``first``: the call is ``execute(*first)``, which may go in one
        message with other records' first statements (see :meth:`SharedTransaction.first`)."""
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)  # a call left running when the handler ends is cancelled
        try:
            return await self._on_connection(call, first)
        finally:
            self._running.discard(task)

    async def _on_connection(
        self,
        call: Callable[[SideBySide, str | None], Awaitable[T]],
        first: tuple[str, Any] | None,
    ) -> T:
        async with self._lock:
            ran = None
            if self._lane is None:
                lane, ran = await self._shared.take(self._owner, self._affinity, first)
                if self.over:  # a call left running took the database after the return
                    self._shared.unused(lane, ran)
                    raise StrayStatementError("db was used after the handler returned")
                self._lane = lane
            if self.over:
                raise StrayStatementError("db was used after the handler returned")
            conn = self._lane.conn
            self._shared._still_open()
            if self._region is None:
                if ran is not None:  # a batch ran its first statement: the result stands
                    if ran.generation != conn.generation or not conn.in_transaction:
                        raise WindowClosed  # rolled back since, with the transaction
                    self._region, self._generation = ran.savepoint, ran.generation
                    conn.owned_by(self)
                    self._calls_made = 1
                    return ran.ran  # type: ignore[no-any-return]
                if not conn.in_transaction:
                    # Waiting for the database (a lock another process holds, a reconnect)
                    # is not the handler holding it: that time never counts to its limit.
                    lane = self._lane
                    lane.held_since = math.inf
                    try:
                        await conn.begin()
                    finally:
                        lane.held_since = time.monotonic()
                    if self.over:  # cut off meanwhile: the connection is no longer its own
                        raise StrayStatementError("db was used after its record was given up")
                self._region, self._generation = self._shared.savepoint_name(), conn.generation
                self._calls_made = 1
                try:
                    if first is not None:
                        return await self._shared.first(self._lane, self._region, *first)  # type: ignore[no-any-return]
                    return await call(conn, self._region)
                finally:
                    conn.owned_by(self)  # whichever task made the call: the part is this one's
            if conn.generation != self._generation or not conn.in_transaction:
                raise WindowClosed  # the transaction it was in was rolled back under it
            self._calls_made += 1
            self._shared.called_again(self._lane)  # what a batch ran after it is undone first
            return await call(conn, None)

    def hold(self) -> Coroutine[Any, Any, Any]:
        """Take a connection for this record now and return the transaction itself, for code
        that calls it without awaiting (``tx.execute(...)``, ``tx.connection``): on SQLite
        only. It is this record's until the handler returns; used after that, it raises."""
        return self._call(self._hold())

    async def _hold(self) -> Any:
        tx = await self._run(lambda conn, savepoint: conn.plain(savepoint))
        return _Guarded(tx, self)

    def execute(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> Coroutine[Any, Any, Any]:
        """``sql`` in the record's part of the transaction; awaited, returns the cursor."""
        refuse_transaction_control(sql)
        return self._call(
            self._run(
                lambda conn, savepoint: conn.execute(sql, params, savepoint), first=(sql, params)
            )
        )

    def first_delivery(self, message: MessageLike | str) -> Coroutine[Any, Any, bool]:
        """As :meth:`SinkTransaction.first_delivery`, awaited: False if ``message`` was
        delivered to this group before (its effects committed)."""
        return self._call(
            self._run(lambda conn, savepoint: conn.first_delivery(message, savepoint))
        )

    @property
    def incarnations(self) -> Mapping[str, str]:
        return self._shared.incarnations

    def __getattr__(self, name: str) -> Any:
        """``db.connection`` (the connection is shared: awaited calls take turns on it), and
        the plain transaction's other calls: refused, saying what to do instead."""
        raise _unawaited(f"db.{name}")

    def cut_off(self) -> None:
        """Its record was given up and its handler goes on regardless (it swallows its
        cancellation): its part, if any, can never commit (the connection's transaction is
        abandoned, and the connection goes back to the window), and every call it makes from
        now on is refused; its end, when it comes, does nothing."""
        self.over = True
        self._take_calls()
        lane, self._lane = self._lane, None
        self._region = None
        if lane is not None:
            lane.conn.abandon()
            if lane.holder is self._owner:
                self._shared.give_back(lane)

    def _take_calls(self) -> tuple[list[Coroutine[Any, Any, Any]], bool]:
        """The handler's calls not yet over (none is its own any more), and whether any of
        them never started: those are closed, never to run (the caller says so, rather than
        a RuntimeWarning)."""
        open_calls = [c for c in self._calls if inspect.getcoroutinestate(c) != CORO_CLOSED]
        self._calls = []
        unstarted = False
        for call in open_calls:
            if inspect.getcoroutinestate(call) == CORO_CREATED:
                unstarted = True
                call.close()
        return open_calls, unstarted

    async def end(self, error: BaseException | None) -> None:
        """The handler returned (``error`` None: keep its work) or raised (undo it). Raises
        what the database raised while doing so (the database's failure, not the record's),
        or :class:`NotAwaitedError` for a call never awaited or not finished (its work is
        undone), or :class:`WindowClosed` when its transaction was rolled back meanwhile."""
        self.over = True
        me = asyncio.current_task()
        for task in self._running:  # left running (gather beside a call that failed): over
            if task is not me:
                task.cancel()
        open_calls, unstarted = self._take_calls()
        if unstarted and isinstance(error, (AttributeError, TypeError)):
            # A call's coroutine taken for its result ('db.execute(...).fetchone()', a loop
            # over it): code written for the plain transaction fails every record alike.
            fatal = _unawaited(f"a db call used without await ({type(error).__name__}: {error})")
            with contextlib.suppress(BaseException):
                await self.end(error)
            raise fatal from error
        if error is None and open_calls:
            error = NotAwaitedError(
                f"{len(open_calls)} db call(s) of the handler were never awaited, or had not "
                "finished when it returned, so they count for nothing; an async def handler "
                "awaits every database call before it returns: "
                "'await db.execute(...)'. Nothing of this record was committed."
            )
            with contextlib.suppress(NotAwaitedError):
                await self.end(error)
            raise error
        lane, self._lane = self._lane, None
        if lane is None:
            return
        lane.held_since = time.monotonic()  # ending: not to be cancelled as overrun now
        region, self._region = self._region, None
        try:
            await self._close(lane, region, error)
        except asyncio.CancelledError:
            # Given up while its part ended (waiting for a call it left running, or in the
            # undo): that part may stand, and a call of it may still be on the connection,
            # whose transaction then must never commit.
            lane.conn.abandon()
            raise
        finally:
            self._shared.give_back(lane)

    async def _close(self, lane: _Lane, region: str | None, error: BaseException | None) -> None:
        """The record's part on ``lane`` ends: kept, or undone (see :meth:`end`)."""
        async with self._lock:  # a call still running (cancelled, or left) ends first
            conn = lane.conn
            same = conn.in_transaction and conn.generation == self._generation
            if region is None:
                return
            if error is not None:
                # What a batch ran after its part goes with it (if not, the transaction
                # itself is over): those records go again.
                self._shared._requeue(lane)
                if same:
                    with _unless_same(error):
                        await conn.end_region(region, error)
                return
            if not same:
                raise WindowClosed  # rolled back under it: its window is gone
            await conn.end_region(region, None)
            if self._calls_made == 1:
                self._shared.ended_after_one()
            if self._member is not None:
                lane.members.append(self._member)


class _Guarded:
    """The transaction :meth:`RecordDb.hold` gives: usable until the handler returns."""

    __slots__ = ("_owner", "_tx")

    def __init__(self, tx: SinkTransaction, owner: RecordDb):
        self._tx = tx
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        if self._owner.over:
            raise StrayStatementError(
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
