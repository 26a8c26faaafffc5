"""librdkafka's errors in the project's terms: what is retried, and what each becomes (no
broker needed: the errors are librdkafka's own objects)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError, KafkaException

from assured.errors import AbortableError, FatalError, LogError, RetriableError
from assured.log.kafka._errors import Scrubber, call, translate


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
