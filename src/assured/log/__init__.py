"""The log: one protocol that every backend (the embedded engine, Apache Kafka) implements.

>>> log = open_log("embedded:///tmp/demo.db")
>>> admin = log.admin(); admin.create_topic("payments", partitions=4)
"""

from assured.log._models import (
    DeliveryReport,
    GroupDescription,
    GroupMetadata,
    Header,
    Isolation,
    MemberDescription,
    OffsetReset,
    PartitionLag,
    Record,
    TopicDescription,
    TopicPartition,
    Watermarks,
)
from assured.log._names import check_topic_name
from assured.log._open import DEFAULT_LOG_URL, open_log
from assured.log._protocol import (
    Admin,
    AssignCallback,
    Consumer,
    Log,
    OnDelivery,
    PartitionsCallback,
    Producer,
)
from assured.log.partitioner import murmur2, partition_for_key

__all__ = [
    "DEFAULT_LOG_URL",
    "Admin",
    "AssignCallback",
    "Consumer",
    "DeliveryReport",
    "GroupDescription",
    "GroupMetadata",
    "Header",
    "Isolation",
    "Log",
    "MemberDescription",
    "OffsetReset",
    "OnDelivery",
    "PartitionLag",
    "PartitionsCallback",
    "Producer",
    "Record",
    "TopicDescription",
    "TopicPartition",
    "Watermarks",
    "check_topic_name",
    "murmur2",
    "open_log",
    "partition_for_key",
]
