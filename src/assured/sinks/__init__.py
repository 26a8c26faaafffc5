"""Databases as sinks: exactly-once effects by committing them with the consumed offsets."""

from assured.sinks._base import Sink, SinkFencedError, SinkTransaction
from assured.sinks.postgres import PostgresSink
from assured.sinks.sqlite import SqliteSink

__all__ = ["PostgresSink", "Sink", "SinkFencedError", "SinkTransaction", "SqliteSink"]
