"""Signups for the audit: ``--input signups=examples.notifications.data:signups``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def signups(n: int = 300) -> Iterator[dict[str, Any]]:
    for i in range(n):
        user = f"user-{i:05d}"
        yield {"key": user, "value": {"id": f"signup-{i:05d}", "user": user}}
