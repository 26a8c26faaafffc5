"""The values that cross the log protocol: records, partitions, offsets, groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

__all__ = [
    "DeliveryReport",
    "GroupDescription",
    "GroupMetadata",
    "Header",
    "Isolation",
    "MemberDescription",
    "OffsetReset",
    "PartitionLag",
    "Record",
    "TopicDescription",
    "TopicPartition",
    "Watermarks",
]

Isolation = Literal["read_committed", "read_uncommitted"]
OffsetReset = Literal["earliest", "latest", "error"]
Header = tuple[str, bytes | None]


class TopicPartition(NamedTuple):
    """One partition of one topic."""

    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]"


class Record(NamedTuple):
    """One record as a consumer sees it. ``offset`` is dense per partition, except where
    transaction markers (never returned) take offsets, as in Kafka."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...] = ()

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``, or None."""
        for k, v in reversed(self.headers):
            if k == name:
                return v
        return None


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What became of one sent record: where it landed, or why it did not."""

    topic: str
    partition: int
    offset: int  # -1 when error is set
    timestamp_ms: int
    error: Exception | None = None


@dataclass(frozen=True, slots=True)
class Watermarks:
    """``low``: first offset still kept; ``high``: next offset to be written; ``lso``: last
    stable offset, below which every transaction is decided (read_committed reads stop here)."""

    low: int
    high: int
    lso: int


@dataclass(frozen=True, slots=True)
class TopicDescription:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MemberDescription:
    member_id: str
    client_id: str
    assignment: tuple[TopicPartition, ...]


@dataclass(frozen=True, slots=True)
class GroupDescription:
    group_id: str
    state: str  # Empty, PreparingRebalance, Stable (Kafka adds CompletingRebalance, Dead)
    generation: int
    members: tuple[MemberDescription, ...]


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """``lag`` = ``high`` - ``committed`` (or - ``low`` with nothing committed)."""

    tp: TopicPartition
    committed: int | None
    low: int
    high: int
    lso: int

    @property
    def lag(self) -> int:
        return self.high - (self.committed if self.committed is not None else self.low)


@dataclass(frozen=True, slots=True)
class GroupMetadata:
    """A consumer's group membership, for ``Producer.send_offsets_to_transaction``: the log
    refuses offsets from a generation that is no longer current (KIP-447 fencing)."""

    group_id: str
    generation: int
    member_id: str
    native: Any = None  # the backend's own object (confluent-kafka's ConsumerGroupMetadata)
