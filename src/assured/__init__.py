"""assured: stream messages delivered at most once, at least once or exactly once, by choice.

The guarantee is a parameter; each is a small commit protocol over a log (an embedded SQLite
engine with Kafka's semantics, or Apache Kafka), and ``assured audit`` proves it by crashing it.
"""

from importlib.metadata import PackageNotFoundError, version

from assured.errors import AssuredError, ConfigError, HarnessError, ServiceError
from assured.log import Record, TopicPartition, murmur2, open_log, partition_for_key
from assured.runtime import App, AppSettings, DecodeError, Message, Output, RunStats
from assured.sinks import PostgresSink, SqliteSink

try:
    __version__ = version("assured")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

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
