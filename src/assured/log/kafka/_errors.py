"""librdkafka's errors in the project's terms, with secrets scrubbed from every message.

librdkafka tells an error's nature itself (``retriable()``, ``txn_requires_abort()``,
``fatal()``); we ask it, and use codes only to name the few kinds the runtime treats apart
(fenced producer, stale group generation, unknown topic, oversized record).

What a caller must do with each error the Kafka producer raises (the runtime builds on this):

``RetriableError`` from ``init_transactions``, ``commit_transaction`` or ``abort_transaction``
    The call did not finish within its ``timeout`` (a total deadline, never exceeded by more
    than a poll) and goes on in the background. Call *the same method again* to resume it; its
    outcome is the outcome of the original call. Nothing else is allowed meanwhile:
    ``send``, ``begin_transaction`` and the other transactional calls raise ``UsageError``; in
    particular ``abort_transaction`` after a timed-out ``commit_transaction`` is refused (the
    commit may already be decided): keep calling ``commit_transaction`` until it returns or
    raises a non-retriable error. librdkafka bounds this: within ``transaction.timeout.ms`` the
    commit either lands or turns abortable or fatal.
``RetriableError`` from ``send_offsets_to_transaction``
    The coordinator did not answer in time; the request may still be in flight. Call
    ``send_offsets_to_transaction`` again with the same offsets (it waits for the earlier
    request and sends again only if that one failed), or ``abort_transaction``. If instead
    ``commit_transaction`` is called, it waits for the request and, should the offsets not have
    made it into the transaction, raises ``AbortableError``: a transaction never commits its
    outputs without its offsets.
``AbortableError`` (and its ``TransactionTimedOutError``, ``StaleGenerationError``)
    Call ``abort_transaction`` (retry it on ``RetriableError``), seek back to the committed
    positions, and carry on with the same producer. Until the abort, ``send`` and
    ``commit_transaction`` raise the same nature again. ``TransactionTimedOutError``: the
    transaction stayed open longer than ``transaction.timeout.ms``; the broker aborted it and
    bumped the producer epoch, which librdkafka reports exactly as fencing by a newer instance
    (``_FENCED``, fatal); we tell the two apart by the transaction's age (see
    ``KafkaProducer``), and ``abort_transaction`` then replaces the librdkafka producer with a
    fresh one (``init_transactions`` again) so the same ``KafkaProducer`` carries on.
``FatalError`` (and its ``ProducerFencedError``, ``SequenceError``)
    Stop using this producer: every later call but ``close`` raises it again. On
    ``ProducerFencedError`` another instance owns the transactional id: stop this instance.
``DeliveryError`` from ``flush`` or ``close``
    Records sent without a delivery callback were not written (``failed``; ``errors`` holds
    the distinct causes). Commit no position past them. ``retriable`` is true when every cause
    was (a delivery timeout, records still queued when ``flush``'s timeout ran out): the same
    records may be sent again; records still queued may also still land, so expect
    duplicates, never loss, if they are sent again.
``UsageError``
    A call out of order (see above); a bug in the calling code.

And from the Kafka consumer: ``poll()`` does not raise when the member missed
``max.poll.interval.ms`` (it logs a warning; ``on_lost`` has run; the member rejoins on the next
polls and ``on_assign`` runs again). ``commit(asynchronous=True)`` never raises: the commits are
made in order on a thread of the consumer and a failed one is logged (a later commit supersedes
it); ``commit()`` waits for the one in flight and raises ``StaleGenerationError`` when the group
has moved on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from confluent_kafka import KafkaError, KafkaException
from tenacity import Retrying, retry_if_exception, stop_before_delay, wait_exponential

from assured._secrets import SECRET_KEYS, Scrubber
from assured.errors import (
    AbortableError,
    AssuredError,
    ConfigError,
    FatalError,
    InvalidTopicError,
    LogError,
    ProducerFencedError,
    RecordTooLargeError,
    RetriableError,
    SequenceError,
    StaleGenerationError,
    UnknownTopicError,
)

__all__ = ["SECRET_KEYS", "Scrubber", "call", "deadline_call", "retrying", "translate"]

T = TypeVar("T")


_FENCED = {KafkaError._FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
_STALE = {
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.FENCED_INSTANCE_ID,
}
_UNKNOWN = {
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION,
}
_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE}
_BAD_TOPIC = {
    KafkaError.TOPIC_ALREADY_EXISTS,
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.INVALID_PARTITIONS,
    KafkaError.INVALID_REPLICATION_FACTOR,
    KafkaError.INVALID_CONFIG,
}
# Leadership or coordination moved (a broker died, an election ran): ask again shortly.
_MOVED = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.FENCED_LEADER_EPOCH,
    KafkaError.UNKNOWN_LEADER_EPOCH,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.OFFSET_NOT_AVAILABLE,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._WAIT_COORD,
}
if hasattr(KafkaError, "PRODUCER_FENCED"):  # named in newer librdkafka
    _FENCED.add(KafkaError.PRODUCER_FENCED)
# The idempotent producer's bookkeeping broke (when librdkafka calls it fatal).
_SEQUENCE = {
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    KafkaError.DUPLICATE_SEQUENCE_NUMBER,
    KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.INVALID_PRODUCER_ID_MAPPING,
    KafkaError._GAPLESS_GUARANTEE,
}
# Gone for now, not refused: the same records or call may succeed later.
_TRANSIENT = {KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._MSG_TIMED_OUT}


class ScrubbingFilter(logging.Filter):
    """A log filter that scrubs secrets from librdkafka's log lines before any handler."""

    def __init__(self, scrub: Scrubber):
        super().__init__()
        self._scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._scrub(record.getMessage())
        record.args = None
        return True


def translate(
    error: KafkaError | KafkaException | Exception, scrub: Scrubber, what: str
) -> AssuredError:
    """The project's error for a librdkafka error met while doing ``what``."""
    err = error.args[0] if isinstance(error, KafkaException) and error.args else error
    if not isinstance(err, KafkaError):
        return LogError(scrub(f"{what}: {error}"))
    text = scrub(f"{what}: {err.str()} ({err.name()})")
    if err.code() == KafkaError._FATAL:
        # librdkafka's "an earlier fatal error stops this client" (produce() says only this;
        # the producer finds the cause itself): fatal whatever the flags say.
        return FatalError(f"{text}: this producer met a fatal error earlier; close it")
    return _kind(err)(text)


def _kind(err: KafkaError) -> type[AssuredError]:
    """The first rule that ``err`` meets names its class; the order matters."""
    return next((cls for applies, cls in _RULES if applies(err)), LogError)


_BY_CODE: dict[int, type[AssuredError]] = {
    **dict.fromkeys(_UNKNOWN, UnknownTopicError),
    **dict.fromkeys(_TOO_LARGE, RecordTooLargeError),
    **dict.fromkeys(_BAD_TOPIC, InvalidTopicError),
    KafkaError._INVALID_ARG: ConfigError,
}
_RULES: list[tuple[Callable[[KafkaError], bool], type[AssuredError]]] = [
    # A stale epoch is fencing when librdkafka gives up on it (transactional producers); an
    # idempotent producer bumps its epoch itself and goes on.
    (
        lambda e: (
            e.code() in _FENCED and (e.fatal() or e.code() != KafkaError.INVALID_PRODUCER_EPOCH)
        ),
        ProducerFencedError,
    ),
    (lambda e: e.code() in _SEQUENCE and e.fatal(), SequenceError),
    (lambda e: e.code() in _STALE, StaleGenerationError),
    # Before the codes below: a commit that failed because a record was too large, say,
    # carries that record's code, and what the caller must do is abort.
    (lambda e: e.txn_requires_abort(), AbortableError),
    *((lambda e, c=c: e.code() == c, cls) for c, cls in _BY_CODE.items()),
    (lambda e: e.fatal(), FatalError),
    (lambda e: e.retriable() or e.code() in _MOVED or e.code() in _TRANSIENT, RetriableError),
]


def _is_retriable(e: BaseException) -> bool:
    """What librdkafka calls retriable, and a coordinator or leader that moved or is still
    loading (librdkafka leaves NOT_COORDINATOR unflagged when a call such as committed() meets
    it, e.g. on a broker that has just started): never a fatal or abortable error."""
    if isinstance(e, KafkaException) and e.args and isinstance(e.args[0], KafkaError):
        err: KafkaError = e.args[0]
        if err.fatal() or err.txn_requires_abort():
            return False
        return bool(err.retriable()) or err.code() in _MOVED
    return False


def retrying(timeout: float) -> Retrying:
    """Retry what librdkafka calls retriable, with backoff, until ``timeout`` runs out."""
    return Retrying(
        retry=retry_if_exception(_is_retriable),
        stop=stop_before_delay(max(timeout, 0.0)),
        wait=wait_exponential(multiplier=0.05, max=1.0),
        reraise=True,
        sleep=time.sleep,
    )


def call(fn: Callable[[], T], scrub: Scrubber, what: str, timeout: float | None = None) -> T:
    """``fn()``, retried while retriable within ``timeout`` (when given), errors translated."""
    try:
        if timeout is None:
            return fn()
        for attempt in retrying(timeout):
            with attempt:
                return fn()
    except KafkaException as e:
        raise translate(e, scrub, what) from None
    raise AssertionError("unreachable")  # pragma: no cover


def deadline_call(
    fn: Callable[[float], T], scrub: Scrubber, what: str, timeout: float, floor: float = 0.05
) -> T:
    """``fn(seconds_left)``, retried while retriable, all attempts within ``timeout`` together
    (each attempt gets what is left of it, at least ``floor``), errors translated."""
    deadline = time.monotonic() + max(timeout, 0.0)
    try:
        for attempt in retrying(timeout):
            with attempt:
                return fn(max(deadline - time.monotonic(), floor))
    except KafkaException as e:
        raise translate(e, scrub, what) from None
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def translated(scrub: Scrubber, what: str) -> Iterator[None]:
    try:
        yield
    except KafkaException as e:
        raise translate(e, scrub, what) from None
