"""Kafka's rules for topic names, so a name that works on one backend works on the other."""

from __future__ import annotations

import re
from collections.abc import Iterable

from assured.errors import InvalidTopicError

__all__ = ["MAX_TOPIC_NAME", "check_topic_name", "collides"]

MAX_TOPIC_NAME = 249
_LEGAL = re.compile(r"[a-zA-Z0-9._-]+")


def check_topic_name(name: str) -> str:
    """``name`` if Kafka would accept it, else :class:`InvalidTopicError` saying why."""
    if not isinstance(name, str) or not name:
        raise InvalidTopicError("a topic name cannot be empty")
    if name in (".", ".."):
        raise InvalidTopicError(f"a topic cannot be named {name!r}")
    if len(name) > MAX_TOPIC_NAME:
        raise InvalidTopicError(
            f"topic name is {len(name)} characters; Kafka allows at most {MAX_TOPIC_NAME}"
        )
    if not _LEGAL.fullmatch(name):
        bad = sorted({c for c in name if not _LEGAL.fullmatch(c)})
        raise InvalidTopicError(
            f"topic name {name!r} has characters Kafka refuses: {''.join(bad)!r}; "
            "use only ASCII letters, digits, '.', '_' and '-'"
        )
    return name


def collides(name: str, existing: Iterable[str]) -> str | None:
    """The existing topic that ``name`` collides with (Kafka's metric names treat '.' and '_'
    alike, so it refuses ``a.b`` beside ``a_b``), or None."""
    folded = name.replace(".", "_")
    for other in existing:
        if other != name and other.replace(".", "_") == folded:
            return other
    return None
