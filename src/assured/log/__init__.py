"""The log: what every backend (the embedded engine, Apache Kafka) has in common."""

from assured.log.partitioner import murmur2, partition_for_key

__all__ = ["murmur2", "partition_for_key"]
