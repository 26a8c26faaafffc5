"""Async handlers, and records handled side by side within a batch.

An ``async def`` handler with ``concurrency=1`` is awaited to its end, one record at a time, on
an event loop the App owns: every protocol sees it exactly as it sees a plain ``def``.

With ``concurrency=N`` a polled batch is split into *lanes*: one per partition
(``ordering="partition"``), per partition and key (``"key"``) or per record (``"unordered"``).
A lane's records run one after another in offset order; lanes run side by side, at most N
records at a time, so a slow key holds up only its own lane. The batch is handed back to the
protocol only when every lane has finished, so what each guarantee commits is unchanged: a
position is committed only once every record below it is handled, and under exactly-once a
transaction holds the outputs of exactly the records whose positions it commits.

Each record has its own output buffer: its outputs reach the producer (or the open
transaction) when its handler returns, never those of an attempt that raised. When a record
fails in a way that is not its own fault (the log or the database is away, the transaction
must abort), lanes start no new record; records already running finish (they are not cancelled
half-way), and the first such error goes up to the protocol, as it would from a sequential
batch.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from assured.errors import AssuredError, UsageError
from assured.log import Producer, Record
from assured.runtime._handling import (
    DeadLetterSink,
    HandlerSpec,
    Ordering,
    Output,
    SendFailedError,
    Undecodable,
    dead_letter,
    owed_to_record,
    partial_send_failure,
)
from assured.runtime.metrics import RuntimeMetrics

__all__ = [
    "EventLoop",
    "InsideEventLoopError",
    "blocking",
    "handle_concurrently",
    "is_async",
    "lanes",
    "outside_event_loops",
]

T = TypeVar("T")


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

    def run(self, work: Awaitable[T]) -> T:
        """Run ``work`` to its end (the App's thread waits)."""
        if self._loop is None or self._loop.is_closed():
            try:
                outside_event_loops()
            except InsideEventLoopError:
                if inspect.iscoroutine(work):
                    work.close()  # never awaited: said here, not in a RuntimeWarning
                raise
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(work)

    def settle(self, result: Any) -> None:
        """A handler returned ``result``: if it is awaitable (an ``async def`` behind a plain
        wrapper, a lambda returning a coroutine), await it to its end; never drop it."""
        if inspect.isawaitable(result):
            try:
                self.run(_awaited(result))
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
        if loop is None or loop.is_closed():
            return
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


async def _awaited(result: Awaitable[T]) -> T:
    return await result


def lanes(records: Sequence[Record], ordering: Ordering) -> list[list[Record]]:
    """``records`` (in the order polled) split into lanes that may run side by side; each lane
    in offset order."""
    if ordering == "unordered":
        return [[r] for r in records]
    by: dict[tuple[Any, ...], list[Record]] = {}
    if ordering == "partition":
        for r in records:
            by.setdefault((r.topic, r.partition), []).append(r)
    else:
        for r in records:
            by.setdefault((r.topic, r.partition, r.key), []).append(r)
    return list(by.values())


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


async def handle_concurrently(
    spec: HandlerSpec,
    records: Sequence[Record],
    producer: Producer | None,
    dead_letters: DeadLetterSink,
    metrics: RuntimeMetrics,
    guarantee: str,
    transactional: bool,
    transaction: Callable[[], str | None],
    threads: ThreadPoolExecutor | None,
) -> None:
    """``records`` through ``spec``'s handler, up to ``spec.concurrency`` at a time, lanes as
    ``spec.ordering`` says. Returns when every record is handled (or dead-lettered); raises the
    first error that is not a record's own fault, once every record already running is done."""
    batch = _Batch(spec, producer, dead_letters, metrics, guarantee, transactional, transaction)
    await batch.run(records, threads)


class _Batch:
    def __init__(
        self,
        spec: HandlerSpec,
        producer: Producer | None,
        dead_letters: DeadLetterSink,
        metrics: RuntimeMetrics,
        guarantee: str,
        transactional: bool,
        transaction: Callable[[], str | None],
    ):
        self.spec = spec
        self.producer = producer if spec.output is not None else None
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.guarantee = guarantee
        self.transactional = transactional
        self.transaction = transaction
        self.labels = (guarantee, spec.topic)
        self.gate = asyncio.Semaphore(spec.concurrency)
        self.stopped: list[BaseException] = []  # errors that give the batch up
        self.threads: ThreadPoolExecutor | None = None

    async def run(self, records: Sequence[Record], threads: ThreadPoolExecutor | None) -> None:
        self.threads = threads
        tasks = [
            asyncio.ensure_future(self.lane(mine)) for mine in lanes(records, self.spec.ordering)
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # Cancelled from outside (a second signal): the records running are given up.
            for task in tasks:
                task.cancel()
            raise
        if self.stopped:
            raise _worst(self.stopped)

    async def lane(self, mine: list[Record]) -> None:
        for record in mine:
            if self.stopped:
                return
            try:
                await self.one(record)
            except BaseException as e:
                self.stopped.append(e)
                if isinstance(e, GeneratorExit):
                    raise
                return

    async def attempt(self, record: Record, out: Output | None) -> None:
        """One call of the handler, within the concurrency bound."""
        spec = self.spec
        async with self.gate:
            if self.stopped:
                raise _GivenUp
            msg = spec.decode(record)
            args: tuple[Any, ...] = (msg,) if out is None else (msg, out)
            if spec.is_async:
                result = await spec.fn(*args)
            else:
                context = contextvars.copy_context()  # logging and tracing context, as a call
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self.threads, context.run, spec.fn, *args)
            if inspect.isawaitable(result):  # an async handler behind a plain wrapper
                await result

    async def one(self, record: Record) -> None:
        """One record: attempts with backoff (outside the concurrency bound, so a record that
        waits to retry holds no slot), then its dead letter."""
        spec = self.spec
        out = None
        if self.producer is not None:
            out = Output(
                self.producer, spec.output, spec.key_codec, spec.value_codec, self.transaction
            )
        strikes = 0
        while True:
            try:
                await self.attempt(record, out)
                if out is not None and out._pending:
                    out._release(record)
                return
            except _GivenUp:
                return  # the batch is given up and will be handled again
            except BaseException as e:
                if out is not None:
                    out._discard()
                error = self.owed(record, e)
                if error is None:
                    return
            strikes += 1
            if not await self.again(record, error, strikes):
                return

    def owed(self, record: Record, e: BaseException) -> Exception | None:
        """The record's own failure in ``e``, to retry; None when it is settled already (a
        dead letter); raises ``e`` when it is not the record's to bear (the protocol decides)."""
        if isinstance(e, SendFailedError):
            if not e.partial:
                return e.error  # nothing of it went out: the record's failure
            if self.transactional:
                raise e  # the open transaction holds part of it: only an abort undoes it
            partial_send_failure(
                self.spec, record, e, self.dead_letters, self.metrics, self.guarantee
            )
            return None
        if isinstance(e, Undecodable):
            dead_letter(self.spec, record, e.error, 1, self.dead_letters, self.metrics, self.labels)
            return None
        if isinstance(e, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise e  # we are being cancelled (a second signal): not the record's doing
            # The handler's own await was cancelled (a timeout it set, a task it awaited).
            return RuntimeError(f"the handler's await was cancelled: {e!r}")
        if isinstance(e, Exception) and owed_to_record(e):
            return e
        raise e  # the log's or the database's, or a signal's

    async def again(self, record: Record, error: Exception, strikes: int) -> bool:
        """Whether to try ``record`` again after its ``strikes``-th failure (after a backoff);
        dead-letters it when its retries are spent."""
        if self.stopped:
            return False  # the batch is given up and will be handled again: no letter
        if strikes > self.spec.retries:
            dead_letter(
                self.spec, record, error, strikes, self.dead_letters, self.metrics, self.labels
            )
            return False
        self.metrics.retried.labels(*self.labels).inc()
        await asyncio.sleep(min(2.0, self.spec.backoff_s * 2 ** (strikes - 1)))
        return not self.stopped  # given up while it waited: no further attempt


class _GivenUp(Exception):  # noqa: N818 -- a signal between two methods, never seen outside
    """Raised instead of starting an attempt once the batch is given up."""


def blocking(fn: Callable[..., Awaitable[Any]], loop: EventLoop) -> Callable[..., Any]:
    """A plain callable that awaits ``fn`` to its end on ``loop`` (concurrency 1)."""

    def call(*args: Any) -> Any:
        try:
            return loop.run(fn(*args))
        except asyncio.CancelledError as e:
            # The handler's own await was cancelled (a timeout it set, a task it awaited): the
            # record's failure, as side by side; not a signal to stop the App.
            raise RuntimeError(f"the handler's await was cancelled: {e!r}") from e

    call.__qualname__ = getattr(fn, "__qualname__", repr(fn))
    return call
