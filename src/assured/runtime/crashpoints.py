"""Named places inside the commit protocols where the audit can kill the process on purpose.

Armed only through the environment, by the audit (or a test)::

    ASSURED_CRASH_POINTS="after-commit-before-handle=0.05,inside-transaction=0.02"

``name=p`` kills this process with SIGKILL at that point with probability ``p`` each time it is
passed; ``name@n`` the ``n``-th time it is passed (``name`` alone: the first time).
``ASSURED_CRASH_SEED`` makes the draws repeatable.
Disarmed, a crash point is one check of a module-level boolean.

:func:`freeze_at` arms a point, from inside the process, to SIGSTOP it there once instead (the
audit's zombie that stops between sending its offsets into a transaction and committing it,
leaving them pending while its group moves on; the audit SIGCONTs it later).

Stuck calls stand for a client that stops getting answers while everything around it works::

    ASSURED_STUCK_CALLS="send-offsets@2"

From its 2nd ``send_offsets_to_transaction`` on, the first Kafka producer this process makes
never hears back from its transaction coordinator: each call waits out its timeout and fails
with librdkafka's ``_TIMED_OUT``, as a real producer did whose coordinator connection kept its
AddOffsetsToTxn request queued and never sent (seen under heavy load; librdkafka #5456 and
#5511 describe other ways to the same hang). A new producer is not stuck.
"""

from __future__ import annotations

import os
import random
import signal
import sys

__all__ = [
    "ARMED",
    "POINTS",
    "STUCK_CALLS",
    "Stuck",
    "arm",
    "arm_stuck",
    "crash_point",
    "freeze_at",
    "stuck",
]

POINTS = (
    "after-commit-before-handle",  # at-most-once: offsets committed, records not yet handled
    "after-handle-before-commit",  # at-least-once / exactly-once: handled, not yet committed
    "inside-transaction",  # exactly-once: outputs written into the open transaction
    "after-effect-before-offset",  # sinks: effects written, offsets not yet stored
)

_odds: dict[str, float] = {}
_nth: dict[str, int] = {}
_freeze: set[str] = set()  # points that stop the process (once each) rather than kill it
_rng = random.Random()
ARMED = False


def arm(spec: str, seed: int | None = None) -> None:
    """Arm crash points from ``spec`` (the env var's syntax); an empty spec disarms all."""
    global ARMED  # noqa: PLW0603 -- one flag read on the hot path, so it stays a plain global
    _odds.clear()
    _nth.clear()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, at, nth = part.partition("@")
        name, _, odds = name.partition("=")
        if name not in POINTS:
            raise ValueError(f"unknown crash point {name!r}; known: {', '.join(POINTS)}")
        if at:
            _nth[name] = max(1, int(nth))
        else:
            _odds[name] = float(odds) if odds else 1.0
    if seed is not None:
        _rng.seed(seed)
    _freeze.clear()
    ARMED = bool(_odds or _nth)


def freeze_at(name: str) -> None:
    """The next time this process passes ``name``, it SIGSTOPs itself there (once)."""
    global ARMED  # noqa: PLW0603
    if name not in POINTS:
        raise ValueError(f"unknown crash point {name!r}; known: {', '.join(POINTS)}")
    _freeze.add(name)
    ARMED = True


def crash_point(name: str) -> None:
    """Die here, abruptly, if the audit armed ``name`` and the draw says so; or stop here, if
    :func:`freeze_at` asked for it."""
    if not ARMED:
        return
    if name in _freeze:
        _freeze.discard(name)
        sys.stderr.write(f"assured: crash point {name} hit: SIGSTOP\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    odds = _odds.get(name)
    nth = _nth.get(name)
    if nth is not None:
        _nth[name] = nth - 1
    if (nth == 1) or (odds is not None and _rng.random() < odds):
        sys.stderr.write(f"assured: crash point {name} hit: SIGKILL\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


STUCK_CALLS = ("send-offsets",)


class Stuck:
    """One client's stuck call: not stuck for its first ``after - 1`` calls, then for good."""

    __slots__ = ("calls", "name")

    def __init__(self, name: str, after: int):
        self.name = name
        self.calls = 1 - after

    def now(self) -> bool:
        """Count a call; whether it goes unanswered."""
        self.calls += 1
        if self.calls == 1:
            sys.stderr.write(f"assured: stuck call {self.name}: never answered from now on\n")
            sys.stderr.flush()
        return self.calls >= 1


_stuck: dict[str, int] = {}  # call -> from its n-th on, for the next client that asks


def arm_stuck(spec: str) -> None:
    """Arm stuck calls from ``spec`` (``ASSURED_STUCK_CALLS``'s syntax); empty disarms them."""
    _stuck.clear()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, nth = part.partition("@")
        if name not in STUCK_CALLS:
            raise ValueError(f"unknown stuck call {name!r}; known: {', '.join(STUCK_CALLS)}")
        _stuck[name] = max(1, int(nth)) if nth else 1


def stuck(name: str) -> Stuck | None:
    """For a client being made: its stuck ``name`` call, if one is armed (only the first client
    to ask gets it; the next one made, a replacement, is healthy)."""
    if not _stuck:
        return None
    after = _stuck.pop(name, None)
    return None if after is None else Stuck(name, after)


arm_stuck(os.environ.get("ASSURED_STUCK_CALLS", ""))
arm(
    os.environ.get("ASSURED_CRASH_POINTS", ""),
    int(os.environ["ASSURED_CRASH_SEED"]) if "ASSURED_CRASH_SEED" in os.environ else None,
)
