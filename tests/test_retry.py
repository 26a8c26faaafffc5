"""The one backoff every retry loop uses: pauses double up to a cap, and none ends past the
deadline (a fake clock: the rule, not the machine's timing, is under test)."""

from __future__ import annotations

import time

import pytest

from assured._retry import Backoff


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(time, "monotonic", fake.monotonic)
    monkeypatch.setattr(time, "sleep", fake.sleep)
    return fake


def test_pauses_double_up_to_the_cap_and_stop_short_of_the_deadline(clock: Clock) -> None:
    backoff = Backoff(2.0, first=0.1, most=0.5)
    while backoff.pause():
        pass
    assert clock.slept == [0.1, 0.2, 0.4, 0.5, 0.5]  # 1.7 s; one more would end at 2.2
    assert clock.now <= 100.0 + 2.0
    assert backoff.left() == pytest.approx(0.3)
    assert backoff.left(floor=0.5) == 0.5, "a call is never given less than its floor"


def test_no_time_means_no_pause(clock: Clock) -> None:
    assert not Backoff(0.0).pause()
    assert not Backoff(-5.0).pause()
    assert clock.slept == []
