"""librdkafka's errors in the project's terms: what is retried, and what each becomes (no
broker needed: the errors are librdkafka's own objects)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError, KafkaException

from assured.errors import (
    AbortableError,
    FatalError,
    LogError,
    ProducerFencedError,
    RecordTooLargeError,
    RetriableError,
    SequenceError,
)
from assured.log.kafka._errors import Scrubber, call, deadline_call, translate


def _raiser(errors: list[KafkaException]) -> Callable[[], int]:
    """A call that raises each of ``errors`` in turn, then returns how many it raised."""
    calls = iter(errors)

    def fn() -> int:
        error = next(calls, None)
        if error is not None:
            raise error
        return len(errors)

    return fn


@pytest.mark.parametrize(
    "code",
    [KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError._WAIT_COORD],
)
def test_a_coordinator_that_moved_is_retried_even_unflagged(code: int) -> None:
    # As committed() raises it on a broker that has just started: retriable() is False.
    moved = KafkaException(KafkaError(code))
    assert not moved.args[0].retriable()
    assert call(_raiser([moved, moved]), Scrubber({}), "reading committed", 5) == 2
    assert isinstance(translate(moved, Scrubber({}), "x"), RetriableError)


def test_fatal_and_abortable_errors_are_never_retried() -> None:
    fatal = KafkaException(KafkaError(KafkaError.NOT_COORDINATOR, fatal=True))
    with pytest.raises(FatalError, match="committing"):
        call(_raiser([fatal]), Scrubber({}), "committing", 5)
    abortable = KafkaException(
        KafkaError(KafkaError.NOT_COORDINATOR, retriable=True, txn_requires_abort=True)
    )
    with pytest.raises(AbortableError):
        call(_raiser([abortable]), Scrubber({}), "committing", 5)


def test_a_retriable_error_that_outlasts_the_timeout_is_raised() -> None:
    moved = KafkaException(KafkaError(KafkaError.NOT_COORDINATOR))
    with pytest.raises(RetriableError, match=r"reading committed: .*NOT_COORDINATOR"):
        call(_raiser([moved] * 1000), Scrubber({}), "reading committed", 0.3)


def test_other_errors_are_raised_at_once() -> None:
    bad = KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))
    with pytest.raises(LogError, match="GROUP_AUTHORIZATION_FAILED"):
        call(_raiser([bad, bad]), Scrubber({}), "reading committed", 5)


def _error(code: int, fatal: bool = False, txn_requires_abort: bool = False) -> KafkaException:
    return KafkaException(KafkaError(code, fatal=fatal, txn_requires_abort=txn_requires_abort))


def test_a_bare_fatal_from_produce_is_fatal() -> None:
    # librdkafka's produce() says only _FATAL once an earlier error was fatal; its flags are off.
    bare = _error(KafkaError._FATAL)
    assert not bare.args[0].fatal()
    error = translate(bare, Scrubber({}), "sending")
    assert isinstance(error, FatalError)
    assert error.fatal


def test_fencing_is_fatal_and_fenced_a_stale_idempotent_epoch_is_not() -> None:
    for fenced in (_error(KafkaError._FENCED, fatal=True), _error(KafkaError.PRODUCER_FENCED)):
        error = translate(fenced, Scrubber({}), "committing")
        assert isinstance(error, ProducerFencedError)
        assert error.fatal
        assert error.fenced
    # An idempotent producer bumps its epoch by itself: not fencing.
    stale = translate(_error(KafkaError.INVALID_PRODUCER_EPOCH), Scrubber({}), "x")
    assert not isinstance(stale, ProducerFencedError)


def test_what_must_be_aborted_is_abortable_whatever_its_code() -> None:
    # A commit that failed because a record was too large carries that record's code.
    too_large = _error(KafkaError.MSG_SIZE_TOO_LARGE, txn_requires_abort=True)
    assert isinstance(translate(too_large, Scrubber({}), "committing"), AbortableError)
    plain = translate(_error(KafkaError.MSG_SIZE_TOO_LARGE), Scrubber({}), "delivering")
    assert isinstance(plain, RecordTooLargeError)


def test_a_delivery_timeout_is_retriable_a_broken_sequence_fatal() -> None:
    timed_out = translate(_error(KafkaError._MSG_TIMED_OUT), Scrubber({}), "delivering")
    assert isinstance(timed_out, RetriableError)
    broken = _error(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, fatal=True)
    assert isinstance(translate(broken, Scrubber({}), "x"), SequenceError)


def test_deadline_call_gives_each_attempt_what_is_left_and_stops_at_the_deadline() -> None:
    moved = _error(KafkaError.NOT_COORDINATOR)
    given: list[float] = []

    def attempt(left: float) -> None:
        given.append(left)
        time.sleep(min(left, 0.2))
        raise moved

    started = time.monotonic()
    with pytest.raises(RetriableError):
        deadline_call(attempt, Scrubber({}), "reading committed", 1.0)
    assert time.monotonic() - started < 1.5
    assert len(given) >= 2
    assert given == sorted(given, reverse=True), "each attempt gets less"
    assert given[0] <= 1.0
