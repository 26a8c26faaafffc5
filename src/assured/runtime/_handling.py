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

from tenacity import (
    RetryError,
    Retrying,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from assured.errors import AssuredError
from assured.log import Header, Producer, Record
from assured.runtime._message import Codec, Message
from assured.runtime.metrics import RuntimeMetrics
from assured.sinks import Sink, SinkTransaction

__all__ = ["HandlerFailedError", "HandlerSpec", "Output", "handle_record"]

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
        self._producer.send(
            target,
            None if value is None else self._value_codec.encode(value),
            key=None if key is None else self._key_codec.encode(key),
            headers=headers,
            partition=partition,
        )
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
        key = None if r.key is None else self.key_codec.decode(r.key)
        value = None if r.value is None else self.value_codec.decode(r.value)
        return Message(key, value, r.headers, r.topic, r.partition, r.offset, r.timestamp_ms, r)


class HandlerFailedError(AssuredError):
    """A handler kept failing and the record has no dead-letter topic. The record's offset was
    not committed: it is handled again after a restart, never silently skipped."""

    fatal = True


def handle_record(
    spec: HandlerSpec,
    record: Record,
    target: Output | SinkTransaction | None,
    dead_letters: Producer,
    metrics: RuntimeMetrics,
    guarantee: str,
) -> None:
    """Run ``record`` through ``spec``; retry, then dead-letter. ``target`` is what the handler
    gets as its second argument (an Output, a database transaction, or nothing)."""
    labels = (guarantee, record.topic)
    savepoint = target.savepoint if isinstance(target, SinkTransaction) else None
    attempts = 0

    def attempt() -> None:
        nonlocal attempts
        attempts += 1
        message = spec.decode(record)
        args: tuple[Any, ...] = (message,) if target is None else (message, target)
        if savepoint is not None:
            with savepoint():
                spec.fn(*args)
        else:
            spec.fn(*args)

    retrying = Retrying(
        retry=retry_if_not_exception_type(AssuredError),  # the log's own errors go up as is
        stop=stop_after_attempt(spec.retries + 1),
        wait=wait_exponential(multiplier=spec.backoff_s, max=2.0),
        before_sleep=lambda state: metrics.retried.labels(*labels).inc(),
        sleep=time.sleep,
    )
    try:
        retrying(attempt)
    except RetryError as e:
        error = e.last_attempt.exception()
        assert error is not None
        _dead_letter(spec, record, error, attempts, dead_letters, metrics, labels)
    metrics.processed.labels(*labels).inc()


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
