"""Databases as sinks: exactly-once effects by committing them with the consumed offsets."""

from assured.sinks._base import (
    MessageLike,
    Sink,
    SinkCommitUnknownError,
    SinkFencedError,
    SinkLostError,
    SinkTransaction,
    SinkUnavailableError,
    SinkUnreachableError,
)
from assured.sinks._relay import DeadLetterRelay, relay_dead_letters
from assured.sinks.postgres import PostgresSink
from assured.sinks.sqlite import SqliteSink

__all__ = [
    "DeadLetterRelay",
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
    "relay_dead_letters",
]
