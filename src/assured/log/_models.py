"""The values that cross the log protocol: records, partitions, offsets, groups."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
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


class Record(tuple[Any, ...]):
    """One record as a consumer sees it: ``topic``, ``partition``, ``offset``,
    ``timestamp_ms``, ``key``, ``value``, ``headers``. ``offset`` is dense per partition,
    except where transaction markers (never returned) take offsets, as in Kafka.

    A plain tuple underneath, so a backend can build thousands per poll at C speed; headers
    may be kept encoded until first read."""

    __slots__ = ()

    def __new__(
        cls,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[Header] | bytes | None = (),
    ) -> Record:
        return tuple.__new__(cls, (topic, partition, offset, timestamp_ms, key, value, headers))

    topic: str = property(itemgetter(0))  # type: ignore[assignment]
    partition: int = property(itemgetter(1))  # type: ignore[assignment]
    offset: int = property(itemgetter(2))  # type: ignore[assignment]
    timestamp_ms: int = property(itemgetter(3))  # type: ignore[assignment]
    key: bytes | None = property(itemgetter(4))  # type: ignore[assignment]
    value: bytes | None = property(itemgetter(5))  # type: ignore[assignment]

    @property
    def headers(self) -> tuple[Header, ...]:
        raw = self[6]
        if not raw:
            return ()
        if isinstance(raw, bytes):
            return decode_headers(raw)
        return tuple(raw)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self[0], self[1])

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``, or None."""
        for k, v in reversed(self.headers):
            if k == name:
                return v
        return None

    def __repr__(self) -> str:
        return (
            f"Record(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
            f"key={self.key!r}, value={self.value!r}, headers={self.headers!r})"
        )


def encode_headers(headers: Sequence[Header] | None) -> bytes | None:
    """Headers as one blob: per header a 2-byte name length, the name, a 4-byte value length
    (-1 for None) and the value."""
    if not headers:
        return None
    out = bytearray()
    for name, value in headers:
        raw = name.encode()
        out += struct.pack(">H", len(raw)) + raw
        if value is None:
            out += struct.pack(">i", -1)
        else:
            out += struct.pack(">i", len(value)) + value
    return bytes(out)


def decode_headers(blob: bytes | None) -> tuple[Header, ...]:
    if not blob:
        return ()
    out: list[Header] = []
    i = 0
    while i < len(blob):
        (n,) = struct.unpack_from(">H", blob, i)
        name = blob[i + 2 : i + 2 + n].decode()
        i += 2 + n
        (size,) = struct.unpack_from(">i", blob, i)
        i += 4
        if size < 0:
            out.append((name, None))
        else:
            out.append((name, blob[i : i + size]))
            i += size
    return tuple(out)


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
    # Which incarnation of the name this is: it changes when the topic is deleted and created
    # again (Kafka's topic id; the embedded engine's row id and creation time). None: unknown.
    topic_id: str | None = None


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
