"""Waiting out a failure that may pass (a broker away, a database restarting): pauses that
double up to a cap, all within one deadline. One helper, so every retry loop in the runtime and
the log clients backs off the same way and none outlives its deadline."""

from __future__ import annotations

import time

__all__ = ["Backoff"]


class Backoff:
    """``seconds`` from now to retry in, with pauses from ``first`` doubling up to ``most``::

    backoff = Backoff(30)
    while True:
        try:
            return attempt(backoff.left())
        except RetriableError:
            if not backoff.pause():
                raise
    """

    def __init__(self, seconds: float, first: float = 0.05, most: float = 1.0):
        self.until = time.monotonic() + max(seconds, 0.0)
        self.next = first
        self.most = most

    def left(self, floor: float = 0.1) -> float:
        """Seconds to the deadline, at least ``floor`` (for a call's own timeout)."""
        return max(self.until - time.monotonic(), floor)

    def pause(self) -> bool:
        """Sleep the next pause and say True; False, at once, if it would end past the
        deadline (give up)."""
        if time.monotonic() + self.next >= self.until:
            return False
        time.sleep(self.next)
        self.next = min(self.next * 2, self.most)
        return True
