"""Running one record through its handler: decode, call with retries, dead-letter on the last
failure. Shared by every commit protocol; what differs between them is only *where* the output
goes (a plain producer, the open transaction, or a database transaction).

Outputs belong to an *attempt*: ``Output.send`` only encodes and buffers; the buffer reaches the
producer when the handler call returns. A call that raises leaves nothing behind, so a retry
never repeats an output.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from assured.errors import AssuredError, ConfigError, RecordTooLargeError, UsageError
from assured.log import Header, Producer, Record
from assured.runtime._message import (
    BYTES,
    Codec,
    DecodeError,
    Message,
    decode_failed,
    error_text,
    is_decode_failure,
    make_message,
)
from assured.runtime.metrics import RuntimeMetrics
from assured.sinks import Sink, SinkTransaction
from assured.sinks._base import (
    RUNTIME,
    Attempt,
    SinkUnavailableError,
    conflicted,
    dead_letter_headers,
    record_part,
)

__all__ = [
    "ORDERINGS",
    "AwaitableIntoSinkError",
    "DeadLetterSink",
    "HandlerFailedError",
    "HandlerSpec",
    "Ordering",
    "Output",
    "SendFailedError",
    "StraySendError",
    "check_handler",
    "own_attempt",
    "partial_send_failure",
    "record_handler",
]

log = logging.getLogger("assured.runtime")

# Which records of a batch never overlap under concurrency > 1: those of one partition and key,
# of one partition, or none.
Ordering = Literal["key", "partition", "unordered"]
ORDERINGS: tuple[Ordering, ...] = ("key", "partition", "unordered")

# (topic, value, key, headers, partition), encoded, waiting for the attempt to succeed
_Pending = tuple[str, bytes | None, bytes | None, Sequence[Header] | None, int | None]


class SendFailedError(AssuredError):
    """Handing one record's outputs to the producer failed (a record over the size limit, a
    missing topic or partition). ``partial`` says whether some of the attempt's outputs had
    already been handed over: inside a transaction that transaction can no longer commit."""

    def __init__(self, record: Record, error: Exception, partial: bool):
        super().__init__(f"sending the outputs of {_where(record)} failed: {error}")
        self.record = record
        self.error = error
        self.partial = partial


# How many conflicts a record is done again for before they count as its failures
# (retried ``retries`` times, then dead-lettered), so that no record conflicts for ever; and
# how many times, for one record's conflicts, its batch's transaction is done again (each
# time every record of the batch: fewer, and within the protocol's retry_deadline_ms).
CONFLICT_RETRIES = 30
BATCH_CONFLICT_REDOS = 10


def batch_conflicts_left(conflicts: dict[tuple[str, int, int], int], record: Record) -> bool:
    """Whether ``record``'s batch may be done again for one more conflict of its, counted in
    ``conflicts`` (kept across batches): ``BATCH_CONFLICT_REDOS`` at most, and then the
    conflict is the record's failure, so that a record that always conflicts is dead-lettered
    instead of redoing its batch for ever."""
    key = (record.topic, record.partition, record.offset)
    seen = conflicts.get(key, 0)
    if seen >= BATCH_CONFLICT_REDOS:
        return False
    if len(conflicts) >= 10_000:  # records long done: forget them
        conflicts.clear()
    conflicts[key] = seen + 1
    return True


def conflict_pause(conflicts: int, backoff_s: float) -> float:
    """Seconds before a record is done again after its ``conflicts``-th conflict:
    short and growing, each a different fraction of it, so that the records in a deadlock do
    not meet again in the same order."""
    return random.uniform(0.5, 1.0) * min(1.0, max(backoff_s, 0.01) * 1.5 ** (conflicts - 1))


class DrainEnded(BaseException):
    """A stop's drain (``drain_timeout_ms``) ended while a record of a plain batch was still
    in its handler's await, or waiting to be retried: it is given up there. Nothing of its
    batch commits (the batch's transaction rolls back or aborts, no position past it is
    committed), and the next owner handles it again; under at-most-once it is lost. Not an
    ``Exception``: no handler's ``except Exception`` takes it for a failure. ``App.run``
    returns on it as from any stop."""

    def __init__(self, what: str):
        super().__init__(
            f"{what}: still in its handler (or waiting to be retried) when the stop's drain "
            "(drain_timeout_ms) ended; given up, and nothing of its batch committed"
        )


def _never() -> bool:
    return False


def batch_conflict(spec: HandlerSpec, record: Record, error: Exception) -> SinkUnavailableError:
    """A conflict (see :func:`conflicted`) inside the one transaction of a batch: the batch's
    own rows hold what the other transaction waits for, so only rolling all of it back lets
    that one go on (done again in place, the record would meet it again, deadlock after
    deadlock; under REPEATABLE READ or SERIALIZABLE its snapshot would not change). The sink's
    failure, not the record's: the protocol rolls the transaction back and does the batch
    again."""
    return SinkUnavailableError(
        f"a statement of handler {spec.name} on {_where(record)} conflicted with another "
        f"transaction ({_one_line(error)}); the batch's database transaction is rolled back "
        "and its records are handled again"
    )


def owed_to_record(error: BaseException) -> bool:
    """Is ``error`` the record's own fault (retry it, then dead-letter it), rather than the
    log's or the database's (which the protocol handles: retry the batch, abort, stop)?"""
    if isinstance(error, AssuredError):
        return not (error.retriable or error.abortable or error.fatal or error.fenced)
    return isinstance(error, Exception)


class Output:
    """Where a handler sends records. Under exactly-once it writes into the open transaction;
    otherwise through the idempotent producer. ``send`` encodes with the handler's codecs and
    keeps the record until the handler returns: an attempt that raises sends nothing. A record
    over the size limit the producer knows is refused by ``send`` itself
    (:class:`~assured.errors.RecordTooLargeError`), where the handler can still act on it.

    Only the attempt running now may send: code of another attempt (a task or thread a failed
    one left running) or no attempt is refused with :class:`StraySendError`, since its output
    would go out with whichever attempt's outputs it joined. The runtime marks each attempt's
    code (:data:`~assured.sinks._base.record_part`, inherited by the tasks it starts)."""

    def __init__(
        self,
        producer: Producer,
        topic: str | None,
        key_codec: Codec,
        value_codec: Codec,
        transaction: Callable[[], str | None] = lambda: None,
        released_into: Callable[[], str | None] | None = None,
    ):
        self._producer = producer
        self._topic = topic
        self._key_codec = key_codec
        self._value_codec = value_codec
        self._transaction = transaction
        self._released_into = released_into or transaction
        self._pending: list[_Pending] = []
        self._limits: dict[str, int] = {}  # topic -> its record size limit, once known
        self._attempt: object = _NO_ATTEMPT  # the mark of the attempt that may send now
        self.sent = 0
        # When set, every output is stamped, under this header, with the label of the
        # transaction it goes into (side by side, known only when it is released into one).
        self.label_header: str | None = None

    @property
    def transaction(self) -> str | None:
        """A label of the open transaction under exactly-once, unique across processes; None
        otherwise, and for records side by side (``concurrency`` > 1), whose outputs go into
        whichever later transaction commits their position."""
        return self._transaction()

    def send(
        self,
        value: Any,
        key: Any = None,
        headers: Sequence[Header] | None = None,
        topic: str | None = None,
        partition: int | None = None,
    ) -> None:
        pending = self._pending  # read before the check (see _end)
        if (mark := record_part.get()) is not self._attempt and self._refuses_strays:
            raise StraySendError(self._attempt is _NO_ATTEMPT, mark is None or mark is RUNTIME)
        target = topic or self._topic
        if target is None:
            raise ConfigError("this handler has no output topic; pass topic=... to send()")
        # bytes through the bytes codec are sent as they are (the common, hot case)
        if value is not None and not (type(value) is bytes and self._value_codec is BYTES):
            value = self._value_codec.encode(value)
        if key is not None and not (type(key) is bytes and self._key_codec is BYTES):
            key = self._key_codec.encode(key)
        if headers is not None and not isinstance(headers, (list, tuple)):
            headers = list(headers)  # counted, then sent: an iterator only goes once
        size = (len(value) if value else 0) + (len(key) if key else 0)
        limit = self._limits.get(target)  # the hot case inline: a known limit, no headers
        if limit is None or headers or size > limit:
            self._fits(target, size, headers)
        pending.append((target, value, key, headers, partition))

    def _fits(self, target: str, size: int, headers: Sequence[Header] | None) -> None:
        """Refuse a record (``size``: its key's and value's bytes) over the size limit the
        producer knows, here, not once the outputs go out: under exactly-once that is into
        the open transaction, whose abort then undid every record's work in it."""
        limit = self._limits.get(target)
        if limit is None:  # a topic not there yet has none until it is
            limit = self._producer.max_record_bytes(target)
            if limit is None:
                return
            self._limits[target] = limit
        if headers:  # at least their names' and values' bytes
            size += sum(_length(name) + len(data or b"") for name, data in headers)
        if size <= limit:
            return
        fresh = self._producer.max_record_bytes(target)  # it may know better now (made again)
        if fresh is None:
            self._limits.pop(target, None)
            return
        self._limits[target] = fresh
        if size > fresh:
            raise RecordTooLargeError(
                f"an output of {size} bytes for topic {target!r} is over the limit of "
                f"{fresh} bytes (the topic's max.message.bytes, or the producer's "
                "message.max.bytes); it was not sent, and this attempt of the record fails. "
                "Send less (split the value), or raise both limits."
            )

    # Whether a send from code not the running attempt's is refused (the audit's planted
    # stray-sends-kept turns it off, to show what the refusal prevents).
    _refuses_strays = True

    def _begin(self) -> contextvars.Token[Attempt | None]:
        """An attempt begins: its code, and the tasks it starts, may send (until :meth:`_end`)."""
        self._attempt = own = Attempt()
        return record_part.set(own)

    def _end(self, mark: contextvars.Token[Attempt | None]) -> None:
        """The attempt is over: no send is taken from now on. Its outputs move to a list of
        their own, so a send of its code that passed the check before this and appends after
        (a thread of it, still encoding) lands in the list left behind, which nothing ever
        releases: never in what this attempt releases later, nor in the next one's."""
        attempt, self._attempt = self._attempt, _NO_ATTEMPT
        if isinstance(attempt, Attempt):
            attempt.over = True
        self._pending = self._pending[:]
        record_part.reset(mark)

    @contextlib.contextmanager
    def _attempting(self) -> Iterator[None]:
        """An attempt runs in this block (see :meth:`_begin`)."""
        mark = self._begin()
        try:
            yield
        finally:
            self._end(mark)

    def _discard(self) -> None:
        self._pending.clear()

    def _release(self, record: Record) -> None:
        """Hand the attempt's outputs to the producer (after the handler returned)."""
        pending = self._pending
        if self.label_header is not None:  # side by side: each output names its transaction
            label = self._released_into()
            if label is not None:
                stamp = (self.label_header, label.encode())
                pending[:] = [
                    (target, value, key, [*(given or ()), stamp], partition)
                    for target, value, key, given, partition in pending
                ]
        send = self._producer.send
        try:
            for i, (target, value, key, headers, partition) in enumerate(pending):
                try:
                    if headers is None and partition is None:
                        send(target, value, key)
                    else:
                        send(target, value, key=key, headers=headers, partition=partition)
                except Exception as e:
                    if not owed_to_record(e):
                        raise
                    raise SendFailedError(record, e, partial=i > 0) from e
            self.sent += len(pending)
        finally:
            pending.clear()


_NO_ATTEMPT = object()  # no attempt runs: nothing may send


def _length(name: str | bytes) -> int:
    """A header name's length in bytes: a str's encoded, or bytes (the Kafka client takes
    those too)."""
    return len(name) if isinstance(name, (bytes, bytearray)) else len(name.encode())


class StraySendError(UsageError):
    """``out.send`` from code that is not the running attempt's: refused, not sent. Fatal when
    it reaches the runtime through a handler: the handler sends from a thread of its own that
    lacks its context, which would fail every record alike."""

    fatal = True

    def __init__(self, between: bool, unmarked: bool):
        when = "between attempts" if between else "while an attempt runs"
        if unmarked:
            whose = (
                "from a thread without the handler's context (a plain thread, "
                "ThreadPoolExecutor.submit and loop.run_in_executor do not copy it)"
            )
        else:
            whose = "from code of another attempt (a task or thread one left running)"
        super().__init__(
            f"out.send was called {when} {whose}: refused, as its output could go out with "
            "another attempt's. Send from the handler itself, from tasks it awaits before it "
            "returns, or from threads it waits for that run in its context "
            "(contextvars.copy_context().run, asyncio.to_thread)"
        )


@contextlib.contextmanager
def own_attempt() -> Iterator[Attempt]:
    """The code in this block (and the tasks it starts) is one attempt's, never the
    runtime's, until the block ends (see :data:`~assured.sinks._base.record_part`)."""
    mark = record_part.set(own := Attempt())
    try:
        yield own
    finally:
        own.over = True
        record_part.reset(mark)


# Where a dead letter goes: (dead-letter topic, the record, headers with the error).
DeadLetterSink = Callable[[str, Record, list[Header]], None]


def refused_dead_letter(
    record: Record, topic: str, error: RecordTooLargeError, guarantee: str
) -> HandlerFailedError:
    """What stops the App when ``record``'s dead letter is over ``topic``'s size limit: the
    record can be neither handled nor set aside, and it stops the App again each time it is
    met, until the limit is raised."""
    if guarantee == "at-most-once":
        kept = (
            "At most once, its offset was committed before handling: it is lost, with any "
            "record polled with it and not yet handled."
        )
    else:
        kept = (
            "It was not committed: it is handled again on restart, and stops the App again "
            f"until {topic!r} takes records that large (raise the topic's max.message.bytes, "
            "and the producer's message.max.bytes, above the input topic's)."
        )
    return HandlerFailedError(
        f"the dead letter of {_where(record)} (the record with its error headers) could not "
        f"be written to {topic!r}: {error} The App stops here rather than skip the record. "
        f"{kept}"
    )


def producer_dead_letters(producer: Producer, guarantee: str) -> DeadLetterSink:
    """Dead letters through ``producer``; one over its topic's size limit stops the App
    (:func:`refused_dead_letter`), wherever it is sent from."""

    def send(topic: str, record: Record, headers: list[Header]) -> None:
        try:
            producer.send(topic, record.value, key=record.key, headers=headers)
        except RecordTooLargeError as e:
            raise refused_dead_letter(record, topic, e, guarantee) from e

    return send


@dataclass(frozen=True)
class HandlerSpec:
    """A registered handler and everything the runtime needs to call it."""

    topic: str
    fn: Callable[..., Any]
    output: str | None
    sink: Sink | None
    retries: int
    dead_letter: str | None  # None: stop the App rather than drop a record
    key_codec: Codec
    value_codec: Codec
    backoff_s: float = 0.05
    concurrency: int = 1  # records of one batch handled side by side (see _concurrent)
    ordering: Ordering = "partition"  # which records never overlap (see _concurrent)
    is_async: bool = False  # fn is an ``async def``

    @property
    def windowed(self) -> bool:
        """Whether its records go through a :class:`~assured.runtime._concurrent.Window`:
        side by side (``concurrency`` > 1), or an ``async def`` into a sink, whose ``db`` calls
        are awaited at any concurrency (one way to write a handler, whatever its setting)."""
        return self.concurrency > 1 or (self.is_async and self.sink is not None)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))

    def decode(self, r: Record) -> Message[Any]:
        """The record as its handler sees it. :class:`Undecodable` (holding the
        :class:`DecodeError`) if a codec refuses its bytes; any other error of a codec goes up
        as it is, to be retried or handled by the protocol like a handler's."""
        key, value = r.key, r.value
        if key is not None and self.key_codec is not BYTES:
            try:
                key = self.key_codec.decode(key)
            except Exception as e:
                if not is_decode_failure(e):
                    raise
                raise Undecodable(decode_failed(r, "key", self.key_codec, e)) from e
        if value is not None and self.value_codec is not BYTES:
            try:
                value = self.value_codec.decode(value)
            except Exception as e:
                if not is_decode_failure(e):
                    raise
                raise Undecodable(decode_failed(r, "value", self.value_codec, e)) from e
        return make_message((key, value, r))


class Undecodable(Exception):  # noqa: N818 -- a carrier, never seen outside the runtime
    """Raised by :meth:`HandlerSpec.decode` around the :class:`DecodeError` of a record its
    codecs refuse. Its own class, so the retry loop tells a record that did not decode (no
    retry: its bytes will not change) from a ``DecodeError`` the handler raised (retried)."""

    def __init__(self, error: DecodeError):
        super().__init__(error)
        self.error = error


def check_handler(fn: Callable[..., Any], topic: str, second: str | None) -> None:
    """Refuse, at registration, a handler the runtime could not call right: not callable, an
    async generator, or a signature that does not take what it will be given (``msg``, plus
    ``out`` or ``db`` when ``second`` names it)."""
    name = getattr(fn, "__qualname__", repr(fn))
    if not callable(fn):
        raise ConfigError(f"the handler for topic {topic!r} is not callable: {fn!r}")
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        raise ConfigError(
            f"handler {name} for topic {topic!r} is a generator ('yield' in its body): it would "
            "return without running. Send outputs with out.send(...) instead of yielding them."
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to check
    wanted = 2 if second else 1
    try:
        signature.bind(*range(wanted))
    except TypeError:
        given = f"(msg, {second})" if second else "(msg)"
        raise ConfigError(
            f"handler {name}{signature} for topic {topic!r} cannot be called as {name}{given}; "
            + (
                f"with {'output=' if second == 'out' else 'sink='} it gets the message and "
                f"the {'Output' if second == 'out' else 'database transaction'}"
                if second
                else "without output= or sink= it gets only the message"
            )
        ) from None


class HandlerFailedError(AssuredError):
    """A handler kept failing and the record has no dead-letter topic. The App stops rather
    than skip the record (under at-most-once its offset was already committed)."""

    fatal = True


def record_handler(  # noqa: PLR0915 -- one closure per case, so the hot path has no branch
    spec: HandlerSpec,
    target: Output | SinkTransaction | None,
    dead_letters: DeadLetterSink,
    metrics: RuntimeMetrics,
    guarantee: str,
    transactional: bool = False,
    settle: Callable[[Any], None] | None = None,
    past_drain: Callable[[], bool] = _never,
    conflicts: dict[tuple[str, int, int], int] | None = None,
) -> Callable[[Record], None]:
    """``handle(record)`` for ``spec``: decode, call, then hand the call's outputs over; when
    the handler raises, retry ``spec.retries`` times with exponential backoff, then
    dead-letter. ``target`` is what the handler gets as its second argument (an Output, a
    database transaction, or nothing).

    Errors that are the log's or the database's (retriable, abortable, fatal) go up as they
    are: the protocol decides. A failure to hand over outputs is the record's failure too,
    except inside a transaction that already holds part of the attempt (``transactional``):
    then :class:`SendFailedError` goes up, and the protocol aborts and redoes the record alone.

    The path of a record that succeeds first time is a decode, a call and the hand-over of its
    outputs: it runs for every record, the retry machinery only after a failure."""
    fn, decode = spec.fn, spec.decode
    settle = settle or _no_awaitable
    conflicts = {} if conflicts is None else conflicts
    savepoint = target._part if isinstance(target, SinkTransaction) else None
    owned = target._owned_by if isinstance(target, SinkTransaction) else _no_owner
    out = target if isinstance(target, Output) else None

    def in_part(record: Record) -> None:
        """An attempt in its part of the sink's transaction, its code marked as this
        attempt's (see SinkTransaction._owned_by)."""
        assert savepoint is not None
        with savepoint():
            attempt = record_part.set(own := Attempt())
            owned(own)
            try:
                if (result := fn(decode(record), target)) is not None:
                    if inspect.isawaitable(result):
                        raise _awaitable_into_sink(spec, result)
                    del result  # a cursor it returned is closed before the part's end
            finally:
                own.over = True
                record_part.reset(attempt)

    def call(record: Record) -> None:
        if savepoint is not None:
            in_part(record)
        elif out is not None:
            try:
                with out._attempting():
                    if (result := fn(decode(record), out)) is not None:
                        settle(result)  # an awaitable is awaited, never dropped
            except BaseException:
                out._discard()
                raise
            release(record)
        elif target is None:
            with own_attempt():
                if (result := fn(decode(record))) is not None:
                    settle(result)  # an awaitable is awaited, never dropped
        elif (result := fn(decode(record), target)) is not None:
            settle(result)  # an awaitable is awaited, never dropped

    def release(record: Record) -> None:
        assert out is not None
        try:
            out._release(record)
        except SendFailedError as e:
            if e.partial:
                # Part of the attempt went out. In a transaction only an abort undoes it; outside
                # one, a retry would repeat that part: the record is dead-lettered as it stands.
                raise
            raise e.error from None  # nothing of it went out: an ordinary failure of the record

    def failed(record: Record, error: Exception) -> None:
        if isinstance(error, Undecodable):
            labels = (guarantee, record.topic)
            dead_letter(spec, record, error.error, 1, dead_letters, metrics, labels)
            return
        if not owed_to_record(error):
            raise error  # the log's or the database's: the protocol decides
        in_batch = savepoint is not None
        if in_batch and conflicted(error) and batch_conflicts_left(conflicts, record):
            raise batch_conflict(spec, record, error) from error
        _retry(
            spec,
            record,
            call,
            error,
            dead_letters,
            metrics,
            (guarantee, record.topic),
            transactional,
            past_drain=past_drain,
            conflicts=conflicts if in_batch else None,
        )

    def partial_failure(record: Record, error: SendFailedError) -> None:
        if transactional:
            raise error
        partial_send_failure(spec, record, error, dead_letters, metrics, guarantee)

    # One closure per case, so the common path has no branch and no extra call.
    new = object.__new__
    if savepoint is not None:

        def handle(record: Record) -> None:
            try:
                in_part(record)
            except Exception as error:
                failed(record, error)

    elif out is not None:
        set_part, reset_part = record_part.set, record_part.reset

        def handle(record: Record) -> None:
            try:
                # out._begin() and _end(), inlined: hot path (an Attempt made without the
                # call of its __init__, a third of the cost of making it)
                out._attempt = own = new(Attempt)
                own.over = False
                mark = set_part(own)
                try:
                    if (result := fn(decode(record), out)) is not None:
                        settle(result)  # an awaitable is awaited, never dropped
                finally:
                    out._attempt = _NO_ATTEMPT
                    own.over = True
                    out._pending = pending = out._pending[:]
                    reset_part(mark)
                if pending:
                    release(record)
            except SendFailedError as error:
                partial_failure(record, error)
            except Exception as error:
                out._discard()
                failed(record, error)

    elif target is None:
        set_mark, reset_mark = record_part.set, record_part.reset

        def handle(record: Record) -> None:
            try:
                own = new(Attempt)  # own_attempt(), inlined: hot path
                own.over = False
                mark = set_mark(own)
                try:
                    if (result := fn(decode(record))) is not None:
                        settle(result)  # an awaitable is awaited, never dropped
                finally:
                    own.over = True
                    reset_mark(mark)
            except Exception as error:
                failed(record, error)

    else:

        def handle(record: Record) -> None:
            try:
                if (result := fn(decode(record), target)) is not None:
                    settle(result)  # an awaitable is awaited, never dropped
            except Exception as error:
                failed(record, error)

    return handle


def partial_send_failure(
    spec: HandlerSpec,
    record: Record,
    error: SendFailedError,
    dead_letters: DeadLetterSink,
    metrics: RuntimeMetrics,
    guarantee: str,
) -> None:
    """Part of a record's outputs went out, outside a transaction: a retry would repeat that
    part, so the record is dead-lettered as it stands (at most once: it was handled, once; a
    dead letter would be a second fate)."""
    if guarantee == "at-most-once":
        log.error("%s; at most once, the rest of its outputs are given up", error)
        return
    labels = (guarantee, record.topic)
    dead_letter(spec, record, error, 1, dead_letters, metrics, labels)


class AwaitableIntoSinkError(UsageError):
    """A plain ``def`` handler into a sink returned an awaitable (an ``async def`` behind a
    plain wrapper): its ``db`` is the plain transaction, whose calls are not awaitable, so
    every record would fail and be dead-lettered. Fatal: nothing of the record commits."""

    fatal = True


def _awaitable_into_sink(spec: HandlerSpec, result: Any) -> AwaitableIntoSinkError:
    if inspect.iscoroutine(result):
        result.close()  # never to run: said here, not in a RuntimeWarning
    name = getattr(spec.fn, "__qualname__", spec.fn)
    return AwaitableIntoSinkError(
        f"handler {name!r} for topic {spec.topic!r} returned {type(result).__name__} (an async "
        "def behind a plain wrapper, such as a decorator?): with sink= a plain def gets the "
        "plain transaction, whose calls cannot be awaited. Make the wrapper itself async def "
        "(return await fn(...)), or mark it with inspect.markcoroutinefunction (Python "
        "3.12+), so that its db is awaited. Nothing of this record was committed."
    )


def _no_owner(_attempt: object) -> None:
    pass


def _no_awaitable(result: Any) -> None:
    if inspect.isawaitable(result):
        raise HandlerFailedError(
            f"a handler returned {type(result).__name__}, which nothing here can await; "
            "run it in an App, which awaits what its handlers return"
        )


def _where(record: Record) -> str:
    return f"{record.topic}[{record.partition}]@{record.offset}"


def _one_line(error: BaseException) -> str:
    """``error`` as one line of a log: its type and its message, whitespace folded. Safe on
    any exception (see :func:`error_text`)."""
    text = " ".join(error_text(error).split())
    if len(text) > 500:
        text = text[:497] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _retry(
    spec: HandlerSpec,
    record: Record,
    call: Callable[[Record], None],
    error: Exception,
    dead_letters: DeadLetterSink,
    metrics: RuntimeMetrics,
    labels: tuple[str, str],
    transactional: bool,
    past_drain: Callable[[], bool] = _never,
    conflicts: dict[tuple[str, int, int], int] | None = None,
) -> None:
    """Attempts 2 .. retries + 1 of a record whose handler raised, backing off
    ``backoff * 2^(n-2)`` seconds (at most 2 s) before attempt n; then the dead-letter topic.
    A record whose codec refuses it goes there at once: its bytes will not change. A conflict
    with another transaction (see :func:`conflicted`) is not the record's failure: it is done
    again after a short pause, up to ``CONFLICT_RETRIES`` times. In a batch's transaction
    (``conflicts``: the batch conflicts counted for each record) the batch is done again
    instead (see :func:`batch_conflict`), up to ``BATCH_CONFLICT_REDOS`` times for it."""
    attempts, in_place = 1, 0
    while True:
        if conflicts is None and conflicted(error) and in_place < CONFLICT_RETRIES:
            in_place += 1
            pause = conflict_pause(in_place, spec.backoff_s)
        elif attempts - in_place <= spec.retries:
            pause = min(2.0, spec.backoff_s * 2 ** (attempts - in_place - 1))
        else:
            break
        metrics.retried.labels(*labels).inc()
        _pause(pause, past_drain, record)
        attempts += 1
        try:
            call(record)
            return
        except SendFailedError as partial:
            if transactional:
                raise
            error = partial
            break
        except Undecodable as undecodable:
            error = undecodable.error
            break
        except Exception as again:
            if not owed_to_record(again):
                raise
            batch = conflicts
            if batch is not None and conflicted(again) and batch_conflicts_left(batch, record):
                raise batch_conflict(spec, record, again) from again
            error = again
    dead_letter(spec, record, error, attempts, dead_letters, metrics, labels)


def _pause(seconds: float, past_drain: Callable[[], bool], record: Record) -> None:
    """Sleep ``seconds`` before a retry, unless a stop's drain ends first: then the record is
    given up (:class:`DrainEnded`)."""
    end = time.monotonic() + seconds
    while not past_drain():
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))
    raise DrainEnded(_where(record))


def dead_letter(
    spec: HandlerSpec,
    record: Record,
    error: BaseException,
    attempts: int,
    dead_letters: DeadLetterSink,
    metrics: RuntimeMetrics,
    labels: tuple[str, str],
) -> None:
    """Send ``record`` to its dead-letter topic with the error in its headers; without one,
    stop the App (:class:`HandlerFailedError`). ``error`` is often the user's: nothing here may
    fail because of it (a ``__str__`` or ``__repr__`` that raises), and the dead letter is sent
    before anything describes it."""
    where = _where(record)
    if spec.dead_letter is None:
        if labels[0] == "at-most-once":
            kept = (
                "At most once, its offset was committed before handling: it is lost and will "
                "not be handled again."
            )
        else:
            kept = "It was not committed and will be handled again on restart."
        raise HandlerFailedError(
            f"handler {spec.name} failed {attempts} time(s) on {where}: {_one_line(error)}; "
            "no dead-letter topic is configured, so the App stops here rather than skip the "
            f"record. {kept}"
        ) from error
    dead_letters(spec.dead_letter, record, dead_letter_headers(record, error, attempts))
    metrics.dead_lettered.labels(*labels).inc()
    said = _one_line(error)
    log.warning(
        "dead letter: %s to %s after %d attempt(s) of handler %s: %s",
        where, spec.dead_letter, attempts, spec.name, said,
        extra={
            "event": "dead_letter", "topic": record.topic, "partition": record.partition,
            "offset": record.offset, "error": said, "error_type": type(error).__qualname__,
            "dead_letter_topic": spec.dead_letter, "attempts": attempts, "handler": spec.name,
        },
    )  # fmt: skip
