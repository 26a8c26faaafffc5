"""Databases as sinks: exactly-once effects by committing them with the consumed offsets."""

from typing import TYPE_CHECKING, Any

from assured.sinks._base import (
    HandlerEndedTransactionError,
    MessageLike,
    Sink,
    SinkCommitUnknownError,
    SinkFencedError,
    SinkLostError,
    SinkTransaction,
    SinkUnavailableError,
    SinkUnreachableError,
    StrayStatementError,
)
from assured.sinks._relay import DeadLetterRelay, relay_dead_letters
from assured.sinks.sqlite import SqliteSink

if TYPE_CHECKING:
    from assured.sinks.postgres import PostgresSink


def __getattr__(name: str) -> Any:
    """PostgresSink, imported when first asked for: psycopg costs every process that never
    uses it a noticeable part of its start."""
    if name == "PostgresSink":
        from assured.sinks.postgres import PostgresSink

        return PostgresSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DeadLetterRelay",
    "HandlerEndedTransactionError",
    "MessageLike",
    "PostgresSink",
    "Sink",
    "SinkCommitUnknownError",
    "SinkFencedError",
    "SinkLostError",
    "SinkTransaction",
    "SinkUnavailableError",
    "SinkUnreachableError",
    "SqliteSink",
    "StrayStatementError",
    "relay_dead_letters",
]
