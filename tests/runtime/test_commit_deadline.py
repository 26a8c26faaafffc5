"""How long an exactly-once commit may take (issue 18's stuck coordinator): within half of
max_poll_interval_ms, the transaction timeout and the retry deadline, but never under 2 s, so
that small timeouts do not abort every healthy commit that is a little slow."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from assured.runtime import AppSettings
from assured.runtime.protocols.exactly_once import COMMIT_FLOOR_S, ExactlyOnce


def deadline(**settings: Any) -> float:
    protocol = ExactlyOnce.__new__(ExactlyOnce)  # no log: only the settings are read
    protocol.rt = SimpleNamespace(settings=AppSettings(group="g", **settings))  # type: ignore[assignment]
    return protocol._commit_deadline()


@pytest.mark.parametrize(
    ("settings", "seconds"),
    [
        ({}, 30.0),  # the defaults: the retry deadline (max poll 300 s, transaction 60 s)
        ({"max_poll_interval_ms": 12_000}, 6.0),  # the member keeps its partitions
        ({"transaction_timeout_ms": 5_000}, 5.0),  # past it the broker aborts anyway
        ({"max_poll_interval_ms": 1_000, "session_timeout_ms": 1_000}, COMMIT_FLOOR_S),
        ({"retry_deadline_ms": 500}, 0.5),  # the retry deadline bounds even the floor
    ],
)
def test_a_commit_keeps_within_the_tightest_bound_but_not_under_the_floor(
    settings: dict[str, Any], seconds: float
) -> None:
    assert deadline(**settings) == pytest.approx(seconds)
