"""Running one record through its handler: decode, call with retries, dead-letter on the last
failure. Shared by every commit protocol; what differs between them is only *where* the output
goes (a plain producer, the open transaction, or a database transaction)."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from assured.errors import AssuredError
from assured.log import Header, Producer, Record
from assured.runtime._message import BYTES, Codec, Message, make_message
from assured.runtime.metrics import RuntimeMetrics
from assured.sinks import Sink, SinkTransaction

__all__ = ["HandlerFailedError", "HandlerSpec", "Output", "record_handler"]

log = logging.getLogger("assured.runtime")


class Output:
    """Where a handler sends records. Under exactly-once it writes into the open transaction;
    otherwise through the idempotent producer. ``send`` encodes with the handler's codecs."""

    def __init__(
        self,
        producer: Producer,
        topic: str | None,
        key_codec: Codec,
        value_codec: Codec,
        transaction: Callable[[], str | None] = lambda: None,
    ):
        self._producer = producer
        self._topic = topic
        self._key_codec = key_codec
        self._value_codec = value_codec
        self._transaction = transaction
        self.sent = 0

    @property
    def transaction(self) -> str | None:
        """A label of the open transaction (``transactional-id:n``) under exactly-once."""
        return self._transaction()

    def send(
        self,
        value: Any,
        key: Any = None,
        headers: Sequence[Header] | None = None,
        topic: str | None = None,
        partition: int | None = None,
    ) -> None:
        target = topic or self._topic
        if target is None:
            raise AssuredError("this handler has no output topic; pass topic=... to send()")
        # bytes through the bytes codec are sent as they are (the common, hot case)
        if value is not None and not (type(value) is bytes and self._value_codec is BYTES):
            value = self._value_codec.encode(value)
        if key is not None and not (type(key) is bytes and self._key_codec is BYTES):
            key = self._key_codec.encode(key)
        if headers is None and partition is None:
            self._producer.send(target, value, key)
        else:
            self._producer.send(target, value, key=key, headers=headers, partition=partition)
        self.sent += 1


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

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))

    def decode(self, r: Record) -> Message:
        key, value = r.key, r.value
        if key is not None and self.key_codec is not BYTES:
            key = self.key_codec.decode(key)
        if value is not None and self.value_codec is not BYTES:
            value = self.value_codec.decode(value)
        return make_message((key, value, r))


class HandlerFailedError(AssuredError):
    """A handler kept failing and the record has no dead-letter topic. The record's offset was
    not committed: it is handled again after a restart, never silently skipped."""

    fatal = True


def record_handler(
    spec: HandlerSpec,
    target: Output | SinkTransaction | None,
    dead_letters: Producer,
    metrics: RuntimeMetrics,
    guarantee: str,
) -> Callable[[Record], None]:
    """``handle(record)`` for ``spec``: decode, call; when the handler raises, retry
    ``spec.retries`` times with exponential backoff, then dead-letter. ``target`` is what the
    handler gets as its second argument (an Output, a database transaction, or nothing).

    The path of a record that succeeds first time is a decode and a call, nothing else: it
    runs for every record, the retry machinery only after a failure."""
    fn, decode = spec.fn, spec.decode
    savepoint = target.savepoint if isinstance(target, SinkTransaction) else None

    def call(record: Record) -> None:
        if savepoint is not None:
            with savepoint():
                fn(decode(record), target)
        elif target is None:
            fn(decode(record))
        else:
            fn(decode(record), target)

    def failed(record: Record, error: Exception) -> None:
        if isinstance(error, AssuredError):
            raise error  # the log's own errors go up as they are: the protocol decides
        _retry(spec, record, call, error, dead_letters, metrics, (guarantee, record.topic))

    # One closure per case, so the common path has no branch and no extra call.
    if savepoint is not None:

        def handle(record: Record) -> None:
            try:
                with savepoint():
                    fn(decode(record), target)
            except Exception as error:
                failed(record, error)

    elif target is None:

        def handle(record: Record) -> None:
            try:
                fn(decode(record))
            except Exception as error:
                failed(record, error)

    else:

        def handle(record: Record) -> None:
            try:
                fn(decode(record), target)
            except Exception as error:
                failed(record, error)

    return handle


def _retry(
    spec: HandlerSpec,
    record: Record,
    call: Callable[[Record], None],
    error: Exception,
    dead_letters: Producer,
    metrics: RuntimeMetrics,
    labels: tuple[str, str],
) -> None:
    """Attempts 2 .. retries + 1 of a record whose handler raised, backing off
    ``backoff * 2^(n-2)`` seconds (at most 2 s) before attempt n; then the dead-letter topic."""
    attempts = 1
    while attempts <= spec.retries:
        metrics.retried.labels(*labels).inc()
        time.sleep(min(2.0, spec.backoff_s * 2 ** (attempts - 1)))
        attempts += 1
        try:
            call(record)
            return
        except AssuredError:
            raise
        except Exception as again:
            error = again
    _dead_letter(spec, record, error, attempts, dead_letters, metrics, labels)


def _dead_letter(
    spec: HandlerSpec,
    record: Record,
    error: BaseException,
    attempts: int,
    producer: Producer,
    metrics: RuntimeMetrics,
    labels: tuple[str, str],
) -> None:
    where = f"{record.topic}[{record.partition}]@{record.offset}"
    if spec.dead_letter is None:
        raise HandlerFailedError(
            f"handler {spec.name} failed {attempts} time(s) on {where}: {error!r}; no dead-letter "
            "topic is configured, so the App stops here rather than skip the record. It was not "
            "committed and will be handled again on restart."
        ) from error
    log.warning(
        "handler %s failed %d time(s) on %s (%r); sending it to %s",
        spec.name, attempts, where, error, spec.dead_letter,
    )  # fmt: skip
    tb = "".join(traceback.format_exception_only(type(error), error)).strip()
    headers = [
        *record.headers,
        ("assured.error.type", type(error).__qualname__.encode()),
        ("assured.error.message", tb.encode()[:4000]),
        ("assured.origin", where.encode()),
        ("assured.attempts", str(attempts).encode()),
    ]
    producer.send(spec.dead_letter, record.value, key=record.key, headers=headers)
    metrics.dead_lettered.labels(*labels).inc()
