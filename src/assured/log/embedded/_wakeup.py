"""Waking a waiting consumer within milliseconds of a write in any process, without spinning.

Every write to the engine lands in its ``-wal`` file first, so on Linux an inotify watch on that
file wakes the waiter the moment another process commits. Where inotify is missing, the waiter
falls back to checking SQLite's ``data_version`` every few milliseconds (cheap, but not free).
Either way a wait never lasts past its timeout, so a missed wake-up costs at most one timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["Waiter"]

_IN_MODIFY = 0x00000002
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = 0o2000000
_FALLBACK_STEP = 0.005
_SETTLE = 0.05
_SETTLE_STEP = 0.0005


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


class Waiter:
    """``wait(timeout)`` returns early when the engine file changes."""

    def __init__(self, db_path: Path, changed: Callable[[], int]):
        self._changed = changed
        self._fd = -1
        libc = _libc()
        wal = Path(f"{db_path}-wal")
        if libc is not None and wal.exists():
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd >= 0:
                if libc.inotify_add_watch(fd, os.fsencode(wal), _IN_MODIFY) >= 0:
                    self._fd = fd
                else:
                    os.close(fd)

    @property
    def uses_inotify(self) -> bool:
        return self._fd >= 0

    def wait(self, timeout: float) -> None:
        if timeout <= 0:
            return
        if self._fd >= 0:
            start = self._changed()
            ready, _, _ = select.select([self._fd], [], [], timeout)
            if ready:
                self._drain()
                # The WAL is written before the commit is visible (with durability=full an
                # fsync lies between), so wait briefly for the commit itself to show.
                settle = time.monotonic() + _SETTLE
                while self._changed() == start and time.monotonic() < settle:
                    time.sleep(_SETTLE_STEP)
            return
        start = self._changed()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(min(_FALLBACK_STEP, max(0.0, deadline - time.monotonic())))
            if self._changed() != start:
                return

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self._fd, 65536):
                pass

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
