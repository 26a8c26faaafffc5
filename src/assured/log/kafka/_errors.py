"""librdkafka's errors in the project's terms, with secrets scrubbed from every message.

librdkafka tells an error's nature itself (``retriable()``, ``txn_requires_abort()``,
``fatal()``); we ask it, and use codes only to name the few kinds the runtime treats apart
(fenced producer, stale group generation, unknown topic, oversized record).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from confluent_kafka import KafkaError, KafkaException
from tenacity import Retrying, retry_if_exception, stop_before_delay, wait_exponential

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
    StaleGenerationError,
    UnknownTopicError,
)

__all__ = ["SECRET_KEYS", "Scrubber", "call", "retrying", "translate"]

T = TypeVar("T")

# Settings whose values must never be shown: passwords, keys, tokens, JAAS/OIDC configs.
SECRET_KEYS = re.compile(r"password|secret|\.key($|\.pem)|token|jaas|oauthbearer\.config|pem$")

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


class Scrubber:
    """Replaces every secret value of a config with ``***`` in text."""

    def __init__(self, config: Mapping[str, object]):
        self._secrets = sorted(
            (str(v) for k, v in config.items() if SECRET_KEYS.search(k) and str(v)),
            key=len,
            reverse=True,
        )

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def config(self, config: Mapping[str, object]) -> dict[str, object]:
        return {k: ("***" if SECRET_KEYS.search(k) else v) for k, v in config.items()}


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
    code = err.code()
    text = scrub(f"{what}: {err.str()} ({err.name()})")
    cls: type[AssuredError]
    if code in _FENCED:
        cls = ProducerFencedError
    elif code in _STALE:
        cls = StaleGenerationError
    elif code in _UNKNOWN:
        cls = UnknownTopicError
    elif code in _TOO_LARGE:
        cls = RecordTooLargeError
    elif code in _BAD_TOPIC:
        cls = InvalidTopicError
    elif code == KafkaError._INVALID_ARG:
        cls = ConfigError
    elif err.fatal():
        cls = FatalError
    elif err.txn_requires_abort():
        cls = AbortableError
    elif (
        err.retriable() or code in _MOVED or code in (KafkaError._TIMED_OUT, KafkaError._TRANSPORT)
    ):
        cls = RetriableError
    else:
        cls = LogError
    return cls(text)


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


@contextlib.contextmanager
def translated(scrub: Scrubber, what: str) -> Iterator[None]:
    try:
        yield
    except KafkaException as e:
        raise translate(e, scrub, what) from None
