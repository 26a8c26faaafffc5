"""assured: stream messages delivered at most once, at least once or exactly once, by choice.

The guarantee is a parameter; each is a small commit protocol over a log (an embedded SQLite
engine with Kafka's semantics, or Apache Kafka), and ``assured audit`` proves it by crashing it.
"""

from typing import TYPE_CHECKING, Any

from assured.errors import AssuredError, ConfigError, HarnessError, ServiceError
from assured.log import Record, TopicPartition, murmur2, open_log, partition_for_key
from assured.runtime import App, AppSettings, DecodeError, Message, Output, RunStats
from assured.sinks import SqliteSink

if TYPE_CHECKING:
    from assured.sinks.postgres import PostgresSink

    __version__: str


def __getattr__(name: str) -> Any:
    """Made when first asked for: psycopg (PostgresSink) and the package metadata (the
    version) cost every process that never uses them a noticeable part of its start."""
    if name == "PostgresSink":
        from assured.sinks.postgres import PostgresSink

        return PostgresSink
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("assured")
        except PackageNotFoundError:  # running from a source tree that was never installed
            return "0.0.0"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "App",
    "AppSettings",
    "AssuredError",
    "ConfigError",
    "DecodeError",
    "HarnessError",
    "Message",
    "Output",
    "PostgresSink",
    "Record",
    "RunStats",
    "ServiceError",
    "SqliteSink",
    "TopicPartition",
    "__version__",
    "murmur2",
    "open_log",
    "partition_for_key",
]
