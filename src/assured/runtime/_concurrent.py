"""Async handlers, and records handled side by side in a window.

An ``async def`` handler with ``concurrency=1`` and no sink is awaited to its end, one record
at a time, on an event loop the App owns: every protocol sees it exactly as it sees a plain
``def``. Into a sink it runs in a window of one (below), so that its ``db`` is awaited at any
concurrency.

With ``concurrency=N`` each polled record joins the handler's :class:`Window`, and runs in a
*lane*: one per partition (``ordering="partition"``), per partition and key (``"key"``) or per
record (``"unordered"``). A lane's records run one after another in offset order; lanes run
side by side, at most N records at a time. The window lives across polls and commits: while a
slow record runs, the App goes on polling and the other lanes go on working, so a slow key
holds up only its own lane. What a protocol may commit is each partition's contiguous handled
prefix, never more: a position is committed only once every record below it is handled. Under
exactly-once a record's outputs and dead letters are held in the window until its position
goes into the transaction, so a transaction holds the outputs of exactly the records whose
positions it commits; a record handled above a slower one waits for it, in memory. The window
holds at most ``max(1000, 4 * N, 2 * max_poll_records)`` records that cannot leave it yet;
then polling waits for the slow ones (the bound on memory).

Each record has its own output buffer: its outputs reach the producer (or, under exactly-once,
the window) when its handler returns, never those of an attempt that raised. When a record
fails in a way that is not its own fault (the log or the database is away, the transaction
must abort), lanes start no new record; records already running finish (they are not cancelled
half-way), and the first such error goes up to the protocol, which gives up the whole window
and rewinds to its first record in each partition. Giving up (an abort, a lost partition, an
error on the way out) cancels the records still running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from assured.errors import AssuredError, UsageError
from assured.log import Header, Producer, Record, TopicPartition
from assured.runtime._handling import (
    CONFLICT_RETRIES,
    DeadLetterSink,
    DrainEnded,
    HandlerSpec,
    Ordering,
    Output,
    SendFailedError,
    Undecodable,
    conflict_pause,
    dead_letter,
    owed_to_record,
    own_attempt,
    partial_send_failure,
)
from assured.runtime._shared_db import Held, RecordDb, SharedTransaction, WindowClosed
from assured.runtime.metrics import RuntimeMetrics
from assured.sinks._base import conflicted, record_part

__all__ = [
    "EventLoop",
    "InsideEventLoopError",
    "Window",
    "blocking",
    "is_async",
    "lane_of",
    "outside_event_loops",
]

T = TypeVar("T")
log = logging.getLogger("assured.runtime")


class InsideEventLoopError(UsageError):
    """``App.run()`` was called from a coroutine: the App's own loop cannot run there. Fatal:
    no record is at fault, and none may be dead-lettered for it."""

    fatal = True

    def __init__(self) -> None:
        super().__init__(
            "App.run() was called from inside a running event loop, and this App has async or "
            "concurrent handlers, which need a loop of their own: run it in a thread, for "
            "example 'await asyncio.to_thread(app.run)', and end it with app.stop() (signals "
            "reach only the main thread)"
        )


def outside_event_loops() -> None:
    """Raise :class:`InsideEventLoopError` if this thread is running an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise InsideEventLoopError


def is_async(fn: Callable[..., Any]) -> bool:
    """Is ``fn`` an ``async def`` (or an object whose ``__call__`` is one)?"""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 -- an object with an async __call__
    )


class EventLoop:
    """The App's event loop, made on first use in the thread that runs the App and kept from
    one ``run()`` to the next (a lock, a client or a pool a handler made stays bound to it),
    and the threads that run plain ``def`` handlers given ``concurrency`` > 1 (let go at the
    end of each run)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self.past_drain: Callable[[], bool] = lambda: False  # a stop's drain is over
        self.drain_over = False  # ...and a handler's call was given up for it
        self._handling: asyncio.Task[Any] | None = None  # a handler's call (run_handler)
        self._given_up: asyncio.Task[Any] | None = None  # ...that the drain's end cancelled
        self._looking: asyncio.TimerHandle | None = None  # the look at the drain (_look)
        self._given_up_at = 0.0
        self._msg: Any = None  # the record of the call running (for the log)

    def _ready(self, work: Awaitable[Any]) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._loop.is_closed():
            try:
                outside_event_loops()
            except InsideEventLoopError:
                if inspect.iscoroutine(work):
                    work.close()  # never awaited: said here, not in a RuntimeWarning
                raise
            self._loop = asyncio.new_event_loop()
        return self._loop

    def run(self, work: Awaitable[T]) -> T:
        """Run ``work`` to its end (the App's thread waits)."""
        return self._ready(work).run_until_complete(work)

    def run_handler(self, work: Awaitable[T], msg: Any) -> T:
        """Run a handler's ``work`` to its end, one record at a time; a stop's drain that ends
        first cancels it and raises :class:`DrainEnded` (``msg``: the record's, for the log)."""
        loop = self._ready(work)
        if self.drain_over:  # the records after one given up go with it, not started
            if inspect.iscoroutine(work):
                work.close()
            raise DrainEnded(_where_of(msg))
        task: asyncio.Task[T] = loop.create_task(
            work if inspect.iscoroutine(work) else _awaited(work)
        )
        if self._looking is None or self._looking.cancelled():
            self._looking = loop.call_later(_LOOK_S, self._look)  # then every _LOOK_S
        self._handling, self._msg = task, msg
        try:
            return loop.run_until_complete(task)
        except BaseException:
            # Given up, whatever the handler made of its cancellation (a client may raise an
            # error of its own instead): not the record's failure, to be retried or lettered.
            if self._given_up is task:
                raise DrainEnded(_where_of(msg)) from None
            raise
        finally:
            self._handling = self._given_up = None

    def watch_drain(self, past_drain: Callable[[], bool]) -> None:
        """A run begins: ``past_drain`` says when its stop's drain is over."""
        self.past_drain, self.drain_over = past_drain, False

    def _look(self) -> None:
        """Every ``_LOOK_S`` the loop runs: past a stop's drain, the handler's call running
        (see run_handler) is cancelled. One timer for all records: none is made for each."""
        task = self._handling
        if task is not None and not task.done() and self.past_drain():
            if self._given_up is not task:
                self._given_up, self.drain_over = task, True
                self._given_up_at = time.monotonic()
            elif time.monotonic() - self._given_up_at >= GIVE_UP_S:
                # It swallows its cancellation (see given_up): left behind, run_handler's
                # wait for it ends here (run_until_complete raises) and its record is given
                # up. Outside its attempt, whatever it sends later is refused.
                log.error(
                    "a record given up (%s) still running %.0f s after its cancellation: the "
                    "handler swallows asyncio.CancelledError (a bare 'except:' around an "
                    "await?); left behind, nothing of it commits. Let CancelledError through.",
                    _where_of(self._msg), GIVE_UP_S,
                )  # fmt: skip
                self._handling = None
                if self._loop is not None:
                    self._loop.stop()
            task.cancel()
        if self._loop is not None and not self._loop.is_closed():
            self._looking = self._loop.call_later(_LOOK_S, self._look)

    def settle(self, result: Any) -> None:
        """A handler returned ``result``: if it is awaitable (an ``async def`` behind a plain
        wrapper, a lambda returning a coroutine), await it to its end; never drop it."""
        if inspect.isawaitable(result):
            try:
                self.run_handler(_awaited(result), None)
            except asyncio.CancelledError as e:  # the handler's own await: as in blocking()
                raise RuntimeError(f"the handler's await was cancelled: {e!r}") from e

    def pool(self, spec: HandlerSpec) -> ThreadPoolExecutor:
        pool = self._pools.get(spec.topic)
        if pool is None:
            pool = self._pools[spec.topic] = ThreadPoolExecutor(
                spec.concurrency, thread_name_prefix=f"assured-{spec.topic}"
            )
        return pool

    def end_run(self) -> None:
        """A run is over: its handler threads go; the loop stays for the next run."""
        for pool in self._pools.values():
            pool.shutdown(wait=True)
        self._pools.clear()

    def close(self) -> None:
        """As ``asyncio.Runner`` closes: tasks a handler left running are cancelled and given
        the chance to finish, async generators and the default executor shut down."""
        self.end_run()
        loop, self._loop = self._loop, None
        if self._looking is not None:
            self._looking.cancel()
        if loop is None or loop.is_closed():
            return
        if asyncio._get_running_loop() is not None:
            # Collected (the App's finalizer) while another loop runs in this thread: this one
            # cannot run to settle its tasks; they are cancelled and the loop closed as it is.
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.close()
            return
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(_ended(pending))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


async def _still_running(tasks: Iterable[asyncio.Future[Any]]) -> set[asyncio.Future[Any]]:
    """Wait for cancelled ``tasks`` to end: ``GIVE_UP_S`` at most, their cancellation
    repeated every ``_RECANCEL_S``. Returns those still running then: they swallow
    ``asyncio.CancelledError`` for good. The outcomes of the others count for nothing (they
    are retrieved, so that none is logged as never retrieved)."""
    running = {task for task in tasks if not task.done()}
    began = time.monotonic()
    while running:
        left = began + GIVE_UP_S - time.monotonic()
        if left <= 0:
            break
        done, running = await asyncio.wait(running, timeout=min(_RECANCEL_S, left))
        for task in done:
            if not task.cancelled():
                task.exception()
        for task in running:
            task.cancel()
    return running


async def _ended(tasks: list[asyncio.Task[Any]]) -> None:
    """Wait for cancelled ``tasks`` to end (the App closing); one that swallows its
    cancellation for good is left to be closed with the loop."""
    running = await _still_running(tasks)
    if running:
        log.error(
            "%d task(s) a handler left running still ran %.0f s after their cancellation as "
            "the App closed (they swallow asyncio.CancelledError): closed with the loop",
            len(running), GIVE_UP_S,
        )  # fmt: skip


async def _awaited(result: Awaitable[T]) -> T:
    return await result


# With a database side by side, how often a step that waits looks at the window's connections
# (see SharedTransaction.unblock).
_LOOK_S = 0.05
# A record given up (cancelled) has this long to end, its cancellation repeated meanwhile;
# then it is left behind (see given_up).
GIVE_UP_S = 5.0
_RECANCEL_S = 1.0


def lane_of(record: Record, ordering: Ordering) -> tuple[Any, ...] | None:
    """The lane ``record`` runs in: records of one lane never overlap and run in offset order
    (None: a lane of its own)."""
    if ordering == "unordered":
        return None
    if ordering == "partition":
        return (record.topic, record.partition)
    return (record.topic, record.partition, record.key)


def _worst(errors: list[BaseException]) -> BaseException:
    """The error the protocol must see first: one that is not an ``Exception`` (a signal's),
    then a fenced or fatal one (stop), then the first."""
    for e in errors:
        if not isinstance(e, Exception):
            return e
    for e in errors:
        if isinstance(e, AssuredError) and (e.fenced or e.fatal):
            return e
    return errors[0]


async def given_up(entries: Sequence[_Entry]) -> None:
    """Wait for the tasks of ``entries`` (given up: cancelled) to end. A handler gets
    ``GIVE_UP_S`` for it, its cancellation repeated every ``_RECANCEL_S``; one still running
    then swallows it for good (a bare ``except:`` around a call, in a retry loop) and is left
    behind, cut off, so that no rewind, revoke or stop waits for it for ever: it is gone (its
    outputs go nowhere), its part of a shared transaction can never commit (the connection's
    transaction is abandoned), a database call it makes later is refused, and its concurrency
    slot goes to the records after it."""
    tasks = {e.task: e for e in entries if e.task is not None}
    left = await _still_running(tasks)
    if not left:
        return
    stuck = [entry for task, entry in tasks.items() if task in left]
    for entry in stuck:
        entry.task = None  # never waited for again
        if entry.db is not None:
            entry.db.cut_off()
        slot, entry.slot = entry.slot, None
        if slot is not None:  # its slot goes to the records after it
            slot.release()
    where = ", ".join(_where_of(e.record) for e in stuck[:5])
    log.error(
        "%d record(s) given up (%s%s) still running %.0f s after their cancellation: "
        "the handler swallows asyncio.CancelledError (a bare 'except:' or 'except "
        "BaseException:' around an await?). Left behind, cut off: nothing of them "
        "commits. Let CancelledError through.",
        len(stuck), where, ", ..." if len(stuck) > 5 else "", GIVE_UP_S,
    )  # fmt: skip


class _Entry:
    """One record in the window: its outputs and dead letters (held until its position is
    committed, under exactly-once), and whether its handling is over."""

    __slots__ = (
        "began", "call", "db", "done", "gone", "held", "lane", "letters", "next", "out",
        "record", "sent", "slot", "task",
    )  # fmt: skip

    def __init__(self, record: Record, out: Output | None):
        self.record = record
        self.out = out
        self.letters: list[tuple[str, Record, list[Header]]] = []
        self.done = False
        self.held = False  # handled into the shared database transaction, not yet committed
        self.gone = False  # given up: whatever its task still does counts for nothing
        self.sent = False  # a dead letter went straight to the producer (not yet flushed)
        self.task: asyncio.Future[None] | None = None  # made once it may start (see _Slots)
        self.began = False  # its task's first step ran (one cancelled before never runs)
        self.call: concurrent.futures.Future[Any] | None = None  # a plain def's, in a thread
        self.db: RecordDb | None = None  # its part of the shared transaction, while it runs
        self.slot: _Slots | None = None  # the concurrency slot it holds, if any
        self.lane: Any = None  # its lane (None: unordered)
        self.next: _Entry | None = None  # the lane's next record, waiting for this one to end


class _Slots:
    """A handler's concurrency bound: at most ``n`` attempts at once. A record is started (its
    task made) only with a slot, and only once the record before it in its lane has ended; a
    retry waits for a slot again. A slot freed goes to whoever has waited longest. A record
    waiting for its turn is no more than an entry in a queue: no task, and starting it takes
    one turn of the event loop (a task per record waiting on an ``asyncio.Semaphore`` took
    two, and memory for each)."""

    def __init__(
        self, n: int, start: Callable[[_Entry], None], pass_over: Callable[[_Entry], None]
    ):
        self.free = n
        self._start = start
        self._pass_over = pass_over  # a record given up while it waited: its lane goes on
        self._queue: deque[_Entry | asyncio.Future[None]] = deque()  # records, retries

    def offer(self, entry: _Entry) -> None:
        """``entry`` may start: now if a slot is free, else when one is."""
        if self.free:
            self.free -= 1
            entry.slot = self
            self._start(entry)
        else:
            self._queue.append(entry)

    async def take(self) -> None:
        """Wait for a slot (a retry's attempt)."""
        if self.free:
            self.free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed one as it was cancelled
                self.release()
            raise

    def release(self) -> None:
        """A slot is given back: to the longest waiter, if any. Records given up while they
        waited are passed over here, each in its turn (their lanes, where any record of them
        is left, go on then), never dropped before: a lane must not lose its place."""
        while self._queue:
            waiter = self._queue.popleft()
            if isinstance(waiter, _Entry):
                if waiter.gone:
                    self._pass_over(waiter)  # may queue the next of its lane
                    continue
                waiter.slot = self
                self._start(waiter)
                return
            if not waiter.done():  # not a retry cancelled while it waited
                waiter.set_result(None)
                return
        self.free += 1


class Window:
    """One handler's records in flight, across polls and commits (see the module's docstring).

    :meth:`step` takes a polled batch (or none) and runs the App's loop until the window has
    room for another poll, or until it is empty (``complete``); :meth:`prefix` then gives each
    partition's contiguous handled prefix, which is all a protocol may commit. Under
    exactly-once a record's outputs and dead letters are held until its position is in that
    prefix: a transaction never holds the outputs of a record whose position it does not
    commit. Above the prefix, records go on running while the protocol commits below it."""

    def __init__(
        self,
        spec: HandlerSpec,
        metrics: RuntimeMetrics,
        guarantee: str,
        threads: ThreadPoolExecutor | None,
        room: int,
    ):
        self.spec = spec
        self.metrics = metrics
        self.guarantee = guarantee
        self.labels = (guarantee, spec.topic)
        self.threads = threads
        self.room = room  # records in flight at most before a step waits for some to finish
        self.entries: dict[TopicPartition, deque[_Entry]] = {}
        self.count = 0  # entries in the window
        self.unfinished = 0  # entries whose handling is not over
        self.finished = 0  # entries whose handling ended, ever (a clock for step())
        self.tails: dict[Any, _Entry] = {}  # lane -> its last record, until that one ends
        self.stopped: list[BaseException] = []  # errors that give the window up
        self.changed: asyncio.Event | None = None
        self.slots = _Slots(spec.concurrency, self._start, self._lane_on)
        self.loop: asyncio.AbstractEventLoop | None = None  # the step's
        # Set per step by the protocol: where outputs and dead letters go.
        self.producer: Producer | None = None
        self.dead_letters: DeadLetterSink | None = None
        self.transactional = False
        self.transaction: Callable[[], str | None] = lambda: None
        # A handler with a sink: the records' shared database transaction (see _shared_db),
        # the records handled into it since the last group commit, and the records already
        # committed above a rewind or a claim (skipped when polled again; shared by windows).
        self.db: SharedTransaction | None = None
        self.deadline: float | None = None  # a drain (complete) gives up what runs past it
        self.past_drain: Callable[[], bool] = lambda: False  # a stop's drain is over
        self.stop_asked: Callable[[], bool] = lambda: False  # the App's stop() or a signal
        self.held: list[_Entry] = []
        self._committing: list[_Entry] = []  # taken out of held by a group commit under way
        self.skips: dict[TopicPartition, set[int]] = {}
        # Per partition, how many records at its head are known handled or held (_has_room).
        self._front: dict[TopicPartition, int] = {}

    # -- the protocol's side -----------------------------------------------------------------

    def ends(self) -> dict[TopicPartition, int]:
        """Each partition's position after its last record in the window."""
        return {tp: q[-1].record.offset + 1 for tp, q in self.entries.items() if q}

    def heads(self) -> dict[TopicPartition, int]:
        """Each partition's first record still in the window: where a rewind must go back to."""
        return {tp: q[0].record.offset for tp, q in self.entries.items() if q}

    def prefix(self) -> tuple[dict[TopicPartition, int], int]:
        """Take the handled records at the head of each partition out of the window: the
        position after them per partition (those that moved), and how many. Under
        exactly-once their held outputs and dead letters go out now, in offset order, into
        the open transaction."""
        moved: dict[TopicPartition, int] = {}
        n = 0
        try:
            for tp, q in self.entries.items():
                while q and q[0].done:
                    entry = q.popleft()
                    self.count -= 1  # out of the window, whatever its release does
                    n += 1
                    if self._front.get(tp):
                        self._front[tp] -= 1
                    self._release(entry)
                    moved[tp] = entry.record.offset + 1
        finally:
            if n:
                self.metrics.processed.labels(*self.labels).inc(n)
        return moved, n

    def _release(self, entry: _Entry) -> None:
        if not self.transactional:
            return  # sent when the handler returned
        assert self.dead_letters is not None
        for topic, record, headers in entry.letters:
            self.dead_letters(topic, record, headers)
        if entry.out is not None and entry.out._pending:
            entry.out._release(entry.record)

    async def step(self, records: Sequence[Record], complete: bool) -> None:
        """Put ``records`` in the window, then run until it has room for the next poll and
        something finished (or 10 ms passed), or, ``complete``, until every record in it is
        handled. Raises the first error that is not a record's own fault, once no record of
        the window is running any more. With a sink, the step ends with the group commit of
        the records handled in it (they count as handled once it has landed)."""
        if self.db is None:
            await self._step(records, complete)
            return
        self.db.reopen()
        try:
            await self._step(records, complete)
            if complete and self.unfinished:  # past the drain's deadline: given up
                await given_up(self._overdue())
        except BaseException as e:
            await self.db.rollback(e)
            raise
        await self._commit()

    def _overdue(self) -> list[_Entry]:
        """Give up the records still running past a drain's deadline (the caller awaits them:
        :func:`given_up`): nothing of them commits, and their database regions end."""
        late = [e for q in self.entries.values() for e in q if not (e.done or e.held)]
        return self._give_up(late)

    async def _commit(self) -> None:
        """The group commit of the records handled since the last one; then they are done."""
        assert self.db is not None
        committed = self._committing = []

        def collect() -> tuple[list[Held], dict[TopicPartition, int]]:
            committed.extend(e for e in self.held if not e.gone)
            self.held = []
            positions: dict[TopicPartition, int] = {}
            for tp, q in self.entries.items():
                for entry in q:
                    if not (entry.done or entry.held):
                        break
                    positions[tp] = entry.record.offset + 1
            return [(e.record, e.letters) for e in committed], positions

        async def give_up() -> None:
            await given_up(self._overdue())

        try:
            await self.db.commit(collect, self.past_drain, give_up, self._on_landed)
            self._landed(committed)
        finally:
            self._committing = []

    def _on_landed(self, records: list[Record]) -> None:
        """One connection's commit landed (the step's last one may still fail, and others
        before it): its records are handled, whatever comes of the others."""
        ids = {id(r) for r in records}
        self._landed([e for e in (*self.held, *self._committing) if id(e.record) in ids])
        self.held = [e for e in self.held if not e.done]

    def _landed(self, entries: list[_Entry]) -> None:
        """The group commit of ``entries`` landed: they are handled. All are marked so
        before any dead letter is sent: whatever sending one does, none is handled again."""
        landed = [e for e in entries if not (e.done or e.gone)]
        for entry in landed:
            entry.done = True
        letters = [letter for e in landed for letter in e.letters]
        for entry in landed:
            entry.letters = []
        if letters and not self.db.marks:  # type: ignore[union-attr]
            # At-most-once: a dead letter goes out once its record's commit landed (one sent
            # before a commit that failed would be sent again by the redo).
            assert self.dead_letters is not None
            for topic, record, headers in letters:
                self.dead_letters(topic, record, headers)

    async def _step(self, records: Sequence[Record], complete: bool) -> None:
        self.loop = asyncio.get_running_loop()
        if self.changed is None:
            self.changed = asyncio.Event()
        for record in records:
            self._dispatch(record)
        if not records and not complete and not self.stopped and self.ready():
            return  # handled records wait at the heads already (let_run() found them)
        seen = self.finished
        while True:
            if self.stopped:
                if not any(
                    e.task is not None and not e.task.done()
                    for q in self.entries.values()
                    for e in q
                ):
                    raise _worst(self.stopped)
            elif not self.unfinished or (
                not complete and self.finished > seen and self._has_room()
            ):
                return
            waited = await self._wait(complete)
            if not complete and not self.stopped and self.stop_asked():
                return  # a full window must not hide a stop: the App drains from here
            if waited:
                continue
            if complete:  # the drain's deadline passed
                if self.stopped:
                    raise _worst(self.stopped)
                log.warning(
                    "%d record(s) of handler %s still running at the end of the drain "
                    "(drain_timeout_ms): given up, not committed; the next owner handles "
                    "them again (under at-most-once they are lost)",
                    self.unfinished, self.spec.name,
                )  # fmt: skip
                return
            if not self.stopped and self._has_room():
                return

    def _has_room(self) -> bool:
        """Will the window have room for another poll once this step is over? The records
        that leave it then are those handled at its partitions' heads, and with them those
        handled into the shared database transaction (held): the step's group commit, right
        after, makes them done. (Counting held records as in flight made a full window wait
        for every record in it, its slots standing idle meanwhile.) Each partition's run of
        such records only grows until :meth:`prefix` takes it: it is not looked at again."""
        if self.count < self.room:
            return True
        leaving = 0
        front = self._front
        for tp, q in self.entries.items():
            n = front.get(tp, 0)
            for entry in itertools.islice(q, n, None):
                if not (entry.done or entry.held):
                    break
                n += 1
            front[tp] = n
            leaving += n
        return self.count - leaving < self.room

    async def _wait(self, complete: bool) -> bool:
        """Wait until a record finishes, 10 ms at most (``complete``: until the drain's
        deadline, if any); False when that time ran out. With a database side by side the
        wait is cut into looks at its connections (see SharedTransaction.unblock)."""
        assert self.changed is not None
        self.changed.clear()
        timeout: float | None = 0.01
        # A step that waits for every record (complete) and began before any stop: a stop
        # asked for meanwhile must still end it at its drain's end, so look for one.
        unbounded = complete and self.deadline is None
        if unbounded:
            timeout = _LOOK_S
        elif complete and self.deadline is not None:
            timeout = self.deadline - time.monotonic()
        looked = False
        if self.db is not None:
            await self.db.unblock(self._on_landed)
            if timeout is None or timeout > _LOOK_S:
                timeout, looked = _LOOK_S, True
        try:
            await asyncio.wait_for(self.changed.wait(), timeout)
        except TimeoutError:
            if unbounded:
                return not self.past_drain()
            return looked
        return True

    def handled_above(self) -> dict[TopicPartition, tuple[int, list[int]]]:
        """Partitions whose first record in the window is not handled yet (their committed
        position, once the prefix is taken) with records handled after it: that first record's
        offset, and the offsets of those handled."""
        out: dict[TopicPartition, tuple[int, list[int]]] = {}
        for tp, q in self.entries.items():
            if len(q) > 1 and not q[0].done:
                handled = [e.record.offset for e in q if e.done]
                if handled:
                    out[tp] = (q[0].record.offset, handled)
        return out

    def ready(self) -> int:
        """Entries the next :meth:`prefix` takes out: handled, at their partitions' heads."""
        n = 0
        for q in self.entries.values():
            for entry in q:
                if not entry.done:
                    break
                n += 1
        return n

    def _finish(self, entry: _Entry) -> None:
        if not (entry.done or entry.held or entry.gone):
            if self.db is not None:
                entry.held = True  # done once the step's group commit lands
                self.held.append(entry)
            else:
                entry.done = True
            self.unfinished -= 1
            self.finished += 1

    def reset(self) -> list[_Entry]:
        """Give up every record in the window (the protocol rewinds to :meth:`heads`): their
        tasks are cancelled, their outputs dropped. Returns those with tasks, for
        :func:`given_up`."""
        entries = [e for q in self.entries.values() for e in q]
        if self.db is not None:  # committed to the database: never handled again
            self.db.closed = True
            for e in entries:
                # At-least-once: not one whose dead letter went to the producer; the rewind
                # may be that letter's failed delivery, and only handling it again sends it
                # again. (At-most-once never handles a record twice, letter or not.)
                if e.done and not (e.sent and self.guarantee == "at-least-once"):
                    tp = TopicPartition(e.record.topic, e.record.partition)
                    self.skips.setdefault(tp, set()).add(e.record.offset)
        tasks = self._give_up(entries)
        self.held = []
        self.entries.clear()
        self._front.clear()
        self.tails.clear()
        self.stopped.clear()
        self.count = self.unfinished = 0
        return tasks

    def forget(self, partitions: Sequence[TopicPartition]) -> list[_Entry]:
        """Give up the records of ``partitions`` (lost to another member)."""
        tasks: list[_Entry] = []
        for tp in partitions:
            self.skips.pop(tp, None)
            q = self.entries.pop(tp, None)
            self._front.pop(tp, None)
            if q:
                self.count -= len(q)
                self.unfinished -= sum(1 for e in q if not (e.done or e.held))
                self.held = [e for e in self.held if e not in q]
                tasks += self._give_up(list(q))
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.tails = {lane: e for lane, e in self.tails.items() if tuple(lane[:2]) not in gone}
        return tasks

    def _give_up(self, entries: list[_Entry]) -> list[_Entry]:
        """Mark ``entries`` gone and cancel their tasks; a plain ``def`` already running in a
        thread cannot be stopped, so its call is waited for (its record must not run again,
        from the rewind, beside it)."""
        calls = []
        for entry in entries:
            entry.gone = True  # all before any slot is freed: none of them may start
        for entry in entries:
            if entry.task is not None:
                entry.task.cancel()
                if not entry.began:  # cancelled before its first step: its _run never runs
                    self._ended(entry)
            if entry.call is not None and not entry.call.done():
                calls.append(entry.call)
        while calls:  # a handler stuck for good shows in the log, not as silence
            calls = list(concurrent.futures.wait(calls, timeout=5).not_done)
            if calls:
                log.warning(
                    "waiting for %d call(s) of handler %s given up, still running in threads "
                    "(a plain def cannot be stopped: give its blocking calls timeouts)",
                    len(calls), self.spec.name,
                )  # fmt: skip
        return [e for e in entries if e.task is not None]

    # -- one record --------------------------------------------------------------------------

    def _dispatch(self, record: Record) -> None:
        spec = self.spec
        out = None
        if spec.output is not None:
            assert self.producer is not None
            # Under exactly-once its outputs go into whichever transaction commits its position,
            # which is not known while it runs: it has no label to read.
            label = self.transaction if not self.transactional else (lambda: None)
            out = Output(
                self.producer, spec.output, spec.key_codec, spec.value_codec, label,
                released_into=self.transaction,
            )  # fmt: skip
        entry = _Entry(record, out)
        tp = TopicPartition(record.topic, record.partition)
        self.entries.setdefault(tp, deque()).append(entry)
        self.count += 1
        skip = self.skips.get(tp)
        if skip and record.offset in skip:  # its effects committed before a rewind or a claim
            skip.discard(record.offset)
            entry.done = True
            return
        self.unfinished += 1
        lane = entry.lane = lane_of(record, spec.ordering)
        if lane is not None:
            before = self.tails.get(lane)
            self.tails[lane] = entry
            if before is not None:  # still running or waiting: this one starts once it ends
                before.next = entry
                return
        self.slots.offer(entry)

    def _start(self, entry: _Entry) -> None:
        assert self.loop is not None
        entry.task = self.loop.create_task(self._run(entry))

    def _ended(self, entry: _Entry) -> None:
        """``entry``'s run is over (or it was given up before it began): its slot goes to the
        next waiting, and its lane to the lane's next record."""
        slot, entry.slot = entry.slot, None
        if slot is not None:
            slot.release()
        self._lane_on(entry)

    def _lane_on(self, entry: _Entry) -> None:
        """``entry`` is over, or never to run (given up while it waited): the next record of
        its lane that is not given up may start. A record given up while it waited stays in
        its lane until then, so that those after it still wait for the one running."""
        while True:
            if self.tails.get(entry.lane) is entry:
                del self.tails[entry.lane]
            after, entry.next = entry.next, None
            if after is None or not after.gone:
                break
            entry = after  # never to start
        if after is not None:
            self.slots.offer(after)

    async def _run(self, entry: _Entry) -> None:
        entry.began = True
        try:
            if not self.stopped:
                await self.one(entry)
        except asyncio.CancelledError:
            raise  # given up by reset() or forget()
        except BaseException as e:
            self.stopped.append(e)
            if isinstance(e, GeneratorExit):
                raise
        finally:
            self._ended(entry)
            if self.changed is not None:
                self.changed.set()

    async def attempt(self, entry: _Entry) -> None:
        """One call of the handler, within the concurrency bound."""
        spec = self.spec
        record, out = entry.record, entry.out
        slots = self.slots
        if entry.slot is None:  # not its first attempt (that one is started with a slot)
            await slots.take()
            entry.slot = slots  # given back here, or by given_up() if it leaves this behind
        try:
            if self.stopped:
                raise _GivenUp
            msg = spec.decode(record)
            if self.db is not None:
                await self._into_db(entry, msg)
                return
            if out is None:
                with own_attempt():  # handler code, never the runtime's
                    await self._call(entry, (msg,))
                return
            with out._attempting():  # its code may send, and only while it runs
                await self._call(entry, (msg, out))
        finally:
            if entry.slot is slots:
                entry.slot = None
                slots.release()

    async def _call(self, entry: _Entry, args: tuple[Any, ...]) -> None:
        spec = self.spec
        if spec.is_async:
            result = await spec.fn(*args)
        else:
            context = contextvars.copy_context()  # logging and tracing context, as a call
            assert self.threads is not None
            call = entry.call = self.threads.submit(context.run, spec.fn, *args)
            result = await asyncio.wrap_future(call)
        if inspect.isawaitable(result):  # an async handler behind a plain wrapper
            await result

    async def _into_db(self, entry: _Entry, msg: Any) -> None:
        """One call of an async handler with a sink: its part of the shared transaction is
        kept if it returns, rolled back to its savepoint if it raises, or if it was given up
        meanwhile (a handler that swallowed the cancellation must not leave work behind)."""
        assert self.db is not None
        task = asyncio.current_task()
        assert task is not None
        db = RecordDb(self.db, task, entry.record, lane_of(entry.record, self.spec.ordering))
        # This attempt's, in its task and the tasks its handler starts; taken back at its end,
        # which also frees it with its task at once (the task's context held db, db the task).
        mark = record_part.set(db)
        entry.db = db
        try:
            await self._in_db(entry, msg, db, task)
        except asyncio.CancelledError:
            if task not in self.db.overran:
                raise
            # The limit's cancel came while its part ended (waiting for a call the handler
            # left running): the part was abandoned with its connection's transaction.
            task.uncancel()
            self.db.overran.pop(task, None)
            raise self._late("a call it left running held the database") from None
        finally:
            record_part.reset(mark)
            entry.db = None
            if self.db.overran.pop(task, None) is not None:
                # The limit's cancel came back as the handler's own error, or was swallowed
                # and the handler returned: it belonged to this attempt alone.
                task.uncancel()

    def _late(self, what: str) -> TimeoutError:
        assert self.db is not None
        return TimeoutError(
            f"the handler held the database for over {self.db.region_limit_s:g} s "
            f"(transaction_timeout_ms; {what}) while every other record waited for it; its "
            "work was rolled back. Do the waiting (an API call) before the first database "
            "call, and await every call before returning."
        )

    async def _in_db(self, entry: _Entry, msg: Any, db: RecordDb, task: asyncio.Task[Any]) -> None:
        assert self.db is not None
        try:
            await self.spec.fn(msg, db)
        except asyncio.CancelledError as e:
            if task not in self.db.overran:
                await db.end(e)
                raise
            # Held the database past its limit: cancelled by the group commit, which waits
            # for it. The record's failure (retried, then dead-lettered), not the App's.
            task.uncancel()
            late = self._late("its handler was still running")
            try:
                await db.end(late)
            finally:  # not before: a look meanwhile would cancel it again
                self.db.overran.pop(task, None)
            raise late from None
        except BaseException as e:
            await db.end(e)
            raise
        if entry.gone or (task.cancelling() and task not in self.db.overran):
            await db.end(asyncio.CancelledError())  # given up, and it swallowed the cancellation
            raise _GivenUp
        await db.end(None)

    async def one(self, entry: _Entry) -> None:
        """One record: attempts with backoff (outside the concurrency bound, so a record that
        waits to retry holds no slot), then its dead letter. Its outputs go to the producer
        when its handler returns; under exactly-once they wait in the window instead."""
        record, out = entry.record, entry.out
        strikes = conflicts = 0
        while True:
            try:
                await self.attempt(entry)
                if entry.gone:
                    return  # given up meanwhile: its outputs go nowhere
                if out is not None and out._pending and not self.transactional:
                    out._release(record)
                self._finish(entry)
                return
            except (_GivenUp, WindowClosed):
                return  # the window is given up and will be handled again
            except BaseException as e:
                if out is not None:
                    out._discard()
                if entry.gone and not isinstance(e, asyncio.CancelledError):
                    return  # given up meanwhile: its failure counts for nothing
                error = self.owed(entry, e)
                if error is None:
                    self._finish(entry)
                    return
            if conflicted(error) and conflicts < CONFLICT_RETRIES:
                conflicts += 1
                going_on = await self.again_after_conflict(entry, conflicts)
            else:
                strikes += 1
                going_on = await self.again(entry, error, strikes, strikes + conflicts)
            if not going_on:
                return

    def _letters(self, entry: _Entry) -> DeadLetterSink:
        """Where ``entry``'s dead letter goes: held with it under exactly-once, and into a
        database under at-most-once (sent once the group commit lands)."""
        if self.transactional or (
            self.db is not None and (self.db.marks or self.guarantee == "at-most-once")
        ):
            return lambda topic, record, headers: entry.letters.append((topic, record, headers))
        send = self.dead_letters
        assert send is not None

        def straight(topic: str, record: Record, headers: list[Header]) -> None:
            entry.sent = True
            send(topic, record, headers)

        return straight

    def owed(self, entry: _Entry, e: BaseException) -> Exception | None:
        """The record's own failure in ``e``, to retry; None when it is settled already (a
        dead letter); raises ``e`` when it is not the record's to bear (the protocol decides)."""
        record = entry.record
        if isinstance(e, SendFailedError):
            if not e.partial:
                return e.error  # nothing of it went out: the record's failure
            if self.transactional:
                raise e  # the open transaction holds part of it: only an abort undoes it
            partial_send_failure(
                self.spec, record, e, self._letters(entry), self.metrics, self.guarantee
            )
            return None
        if isinstance(e, Undecodable):
            dead_letter(self.spec, record, e.error, 1, self._letters(entry), self.metrics,
                        self.labels)  # fmt: skip
            return None
        if isinstance(e, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise e  # we are being cancelled (given up, or a second signal)
            # The handler's own await was cancelled (a timeout it set, a task it awaited).
            return RuntimeError(f"the handler's await was cancelled: {e!r}")
        if isinstance(e, Exception) and owed_to_record(e):
            return e
        raise e  # the log's or the database's, or a signal's

    async def again_after_conflict(self, entry: _Entry, conflicts: int) -> bool:
        """Whether to try the record again after its ``conflicts``-th conflict with another
        transaction (see :func:`~assured.runtime._handling.conflicted`): records on other
        connections held what it needed, or it theirs. Not its failure: its retries are kept,
        and it goes again after a short pause."""
        if self.stopped or entry.gone:
            return False
        self.metrics.retried.labels(*self.labels).inc()
        await asyncio.sleep(conflict_pause(conflicts, self.spec.backoff_s))
        return not self.stopped

    async def again(self, entry: _Entry, error: Exception, strikes: int, attempts: int) -> bool:
        """Whether to try the record again after its ``strikes``-th failure, its ``attempts``-th
        attempt (after a backoff); dead-letters it when its retries are spent."""
        if self.stopped or entry.gone:
            return False  # the window is given up and will be handled again: no letter
        if strikes > self.spec.retries:
            dead_letter(self.spec, entry.record, error, attempts, self._letters(entry),
                        self.metrics, self.labels)  # fmt: skip
            self._finish(entry)
            return False
        self.metrics.retried.labels(*self.labels).inc()
        await asyncio.sleep(min(2.0, self.spec.backoff_s * 2 ** (strikes - 1)))
        return not self.stopped  # given up while it waited: no further attempt


class _GivenUp(Exception):  # noqa: N818 -- a signal between two methods, never seen outside
    """Raised instead of starting an attempt once the window is given up."""


def _where_of(msg: Any) -> str:
    if hasattr(msg, "offset"):
        return f"{msg.topic}[{msg.partition}]@{msg.offset}"
    return "a record"


def blocking(fn: Callable[..., Awaitable[Any]], loop: EventLoop) -> Callable[..., Any]:
    """A plain callable that awaits ``fn`` to its end on ``loop`` (concurrency 1)."""

    def call(*args: Any) -> Any:
        try:
            return loop.run_handler(fn(*args), args[0] if args else None)
        except asyncio.CancelledError as e:
            # The handler's own await was cancelled (a timeout it set, a task it awaited): the
            # record's failure, as side by side; not a signal to stop the App.
            raise RuntimeError(f"the handler's await was cancelled: {e!r}") from e

    call.__qualname__ = getattr(fn, "__qualname__", repr(fn))
    return call
