"""The log protocol: what every backend implements, and all that the runtime may call.

Three small roles, as in Kafka's clients: :class:`Admin` (topics, groups, offsets, lag),
:class:`Producer` (send, flush; idempotent by default; transactions), :class:`Consumer`
(group subscription or manual assignment, poll, positions, commits). A :class:`Log` hands
them out. The embedded engine and the Kafka backend implement the same classes, and
``tests/contract`` holds both to the same behaviour.

Offsets committed are always the *next* offset to read (the last processed offset + 1).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Self

from assured.errors import ConfigError
from assured.log._models import (
    DeliveryReport,
    GroupDescription,
    GroupMetadata,
    Header,
    Isolation,
    OffsetReset,
    PartitionLag,
    Record,
    TopicDescription,
    TopicPartition,
    Watermarks,
)

__all__ = [
    "MAX_OFFSET_METADATA",
    "Admin",
    "AssignCallback",
    "ConfigValue",
    "Consumer",
    "Log",
    "OnDelivery",
    "PartitionsCallback",
    "Producer",
]

ConfigValue = str | int | float | bool
OnDelivery = Callable[[DeliveryReport], None]
PartitionsCallback = Callable[[list[TopicPartition]], None]
# An assignment callback may return where to start reading some of the new partitions (offsets
# kept outside Kafka, e.g. in a database); the others start at the committed offset.
AssignCallback = Callable[[list[TopicPartition]], Mapping[TopicPartition, int] | None]


class _Closing(abc.ABC):
    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Admin(_Closing):
    """Topics, groups, offsets and lag."""

    @abc.abstractmethod
    def create_topic(
        self, name: str, partitions: int = 1, config: Mapping[str, str] | None = None
    ) -> None:
        """Create ``name``; :class:`~assured.errors.InvalidTopicError` for a bad name or one that
        exists."""

    @abc.abstractmethod
    def delete_topic(self, name: str) -> None: ...

    @abc.abstractmethod
    def list_topics(self) -> list[str]:
        """User topics, sorted (internal ones such as ``__consumer_offsets`` left out)."""

    @abc.abstractmethod
    def describe_topic(self, name: str) -> TopicDescription: ...

    @abc.abstractmethod
    def watermarks(self, tp: TopicPartition) -> Watermarks: ...

    def end_offsets(
        self, partitions: Sequence[TopicPartition], isolation: Isolation = "read_committed"
    ) -> dict[TopicPartition, int]:
        """Where each of ``partitions`` ends for a reader with ``isolation``: its last stable
        offset (read_committed) or its high watermark (read_uncommitted). In as few requests
        as the log allows (Kafka: one per leader broker), where ``watermarks`` asks three per
        partition; this default asks ``watermarks``."""
        ends: dict[TopicPartition, int] = {}
        for tp in partitions:
            w = self.watermarks(tp)
            ends[tp] = w.lso if isolation == "read_committed" else w.high
        return ends

    @abc.abstractmethod
    def list_groups(self) -> list[str]: ...

    @abc.abstractmethod
    def describe_group(self, group_id: str) -> GroupDescription: ...

    @abc.abstractmethod
    def committed_offsets(
        self, group_id: str, topics: Iterable[str] | None = None, *, stable: bool = False
    ) -> dict[TopicPartition, int]:
        """The group's committed offsets (next offset to read), for ``topics`` or all.

        ``stable``: as a read_committed consumer reads them when it starts (Kafka's stable
        OffsetFetch), at the group's latest replicated state, waiting out open transactions
        that hold offsets. Without it Kafka answers at once, but a group coordinator elected a
        moment ago may answer from a replica not yet caught up: offsets a commit or two old."""

    def lag(self, group_id: str, topics: Iterable[str] | None = None) -> list[PartitionLag]:
        """Committed offset, watermarks and lag for every partition of ``topics`` (default: the
        topics the group has committed offsets for)."""
        wanted = sorted(set(topics)) if topics is not None else None
        committed = self.committed_offsets(group_id, wanted)
        names = wanted if wanted is not None else sorted({tp.topic for tp in committed})
        out = []
        for name in names:
            for p in range(self.describe_topic(name).partitions):
                tp = TopicPartition(name, p)
                w = self.watermarks(tp)
                out.append(PartitionLag(tp, committed.get(tp), w.low, w.high, w.lso))
        return out


class Producer(_Closing):
    """Sends records. Idempotent unless told otherwise: a retry never writes a record twice.

    With a ``transactional_id``: ``init_transactions()`` once (it fences older instances with the
    same id), then ``begin_transaction()`` … ``send`` … ``send_offsets_to_transaction`` …
    ``commit_transaction()`` or ``abort_transaction()``.
    """

    @abc.abstractmethod
    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[Header] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        on_delivery: OnDelivery | None = None,
    ) -> None:
        """Queue a record. ``on_delivery`` runs inside a later ``poll()`` or ``flush()``.
        Keyed records go to ``murmur2(key) % partitions`` like Java clients; others spread."""

    def max_record_bytes(self, topic: str) -> int | None:
        """The most bytes of key, value and headers a record to ``topic`` may have, where
        the producer knows it (None: not known here). A record over it is surely refused, so
        a caller may refuse it earlier, where the code that made it can still act; one under
        it may still be refused later (the record's overhead, a broker's own limit)."""
        return None

    @abc.abstractmethod
    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery callbacks that are due; returns how many ran."""

    @abc.abstractmethod
    def flush(self, timeout: float | None = None) -> int:
        """Wait until every queued record is written or failed. Returns how many remain queued
        (0, unless ``timeout`` ran out first); raises :class:`~assured.errors.DeliveryError`
        for records sent without a delivery callback that were not written since the last
        ``flush()`` (nobody else was told of them)."""

    @abc.abstractmethod
    def init_transactions(self, timeout: float = 30.0) -> None: ...

    @abc.abstractmethod
    def begin_transaction(self) -> None: ...

    @abc.abstractmethod
    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group: GroupMetadata, timeout: float = 30.0
    ) -> None:
        """Make committing ``offsets`` for ``group`` part of the open transaction."""

    @abc.abstractmethod
    def commit_transaction(self, timeout: float = 30.0) -> None: ...

    @abc.abstractmethod
    def abort_transaction(self, timeout: float = 30.0) -> None: ...


class Consumer(_Closing):
    """Reads records, as one member of a consumer group or from partitions assigned by hand.

    Never commits by itself. Why commit on revoke: when a rebalance takes a partition away, the
    member that processed it must commit what it processed *before* the partition moves, or the
    next owner starts from an older offset and processes those records again. So ``on_revoke``
    runs while this member's generation is still current and its commits are still accepted.
    ``on_lost`` runs instead when the partitions are already gone (the member was expelled, e.g.
    after missing its session timeout): committing then would be refused, and must not be tried.
    """

    @abc.abstractmethod
    def subscribe(
        self,
        topics: Sequence[str],
        on_assign: AssignCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
        on_lost: PartitionsCallback | None = None,
    ) -> None: ...

    @abc.abstractmethod
    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        """Read these partitions, outside group management."""

    @abc.abstractmethod
    def assignment(self) -> list[TopicPartition]: ...

    @abc.abstractmethod
    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        """Up to ``max_records`` records; waits up to ``timeout`` seconds for the first one.
        Rebalance callbacks run inside this call."""

    @abc.abstractmethod
    def position(self, tp: TopicPartition) -> int:
        """The offset of the next record ``poll`` would return from ``tp``."""

    def maybe_more_fetched(self) -> bool:
        """A hint, asking nothing of the log: could a poll right now return more records than
        the last one did, because the client has fetched past what it handed out? A short poll
        of a client that fetches in the background (Kafka's) may mean only that its queue ran
        dry between two fetches, not that the consumer has caught up. The default: no (a poll
        of the embedded engine reads everything there is)."""
        return False

    @abc.abstractmethod
    def seek(self, tp: TopicPartition, offset: int) -> None: ...

    @abc.abstractmethod
    def commit(
        self,
        offsets: Mapping[TopicPartition, int] | None = None,
        asynchronous: bool = False,
        metadata: Mapping[TopicPartition, str] | None = None,
    ) -> None:
        """Commit ``offsets`` (default: the current positions of every assigned partition).
        ``metadata``: a string kept beside a partition's committed offset (Kafka's offset
        metadata, at most :data:`MAX_OFFSET_METADATA` characters), read back by
        :meth:`committed_metadata`; a partition without one commits an empty string.
        Raises :class:`~assured.errors.StaleGenerationError` if the group has moved on."""

    @property
    def offset_metadata_limit(self) -> int:
        """The most offset metadata a commit should carry, in characters:
        :data:`MAX_OFFSET_METADATA`, or less once the log refused that much (a Kafka broker
        whose ``offset.metadata.max.bytes`` is set lower)."""
        return MAX_OFFSET_METADATA

    @abc.abstractmethod
    def committed(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int | None]: ...

    @abc.abstractmethod
    def committed_metadata(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, tuple[int, str]]:
        """The committed offset of each of ``partitions`` that has one, with the metadata
        committed beside it ("" when none was)."""

    @abc.abstractmethod
    def group_metadata(self) -> GroupMetadata: ...

    @abc.abstractmethod
    def pause(self, partitions: Sequence[TopicPartition]) -> None: ...

    @abc.abstractmethod
    def resume(self, partitions: Sequence[TopicPartition]) -> None: ...


# Kafka brokers refuse longer offset metadata by default (offset.metadata.max.bytes, 4096
# bytes); both backends hold commits to the same bound.
MAX_OFFSET_METADATA = 4000


def checked_metadata(metadata: Mapping[TopicPartition, str] | None) -> dict[TopicPartition, str]:
    """Offset metadata as every backend takes it: ASCII strings of at most
    :data:`MAX_OFFSET_METADATA` characters."""
    out: dict[TopicPartition, str] = {}
    for tp, text in (metadata or {}).items():
        if not isinstance(text, str) or not text.isascii() or len(text) > MAX_OFFSET_METADATA:
            what = f"{len(text)} characters" if isinstance(text, str) else type(text).__name__
            raise ConfigError(
                f"offset metadata for {tp} must be an ASCII string of at most "
                f"{MAX_OFFSET_METADATA} characters (got {what}); nothing was committed"
            )
        out[tp] = text
    return out


def check_consumer_options(isolation: str, auto_offset_reset: str) -> None:
    """The consumer options every backend understands alike, checked alike."""
    if isolation not in ("read_committed", "read_uncommitted"):
        raise ConfigError(f"isolation={isolation!r}: read_committed or read_uncommitted")
    if auto_offset_reset not in ("earliest", "latest", "error"):
        raise ConfigError(f"auto_offset_reset={auto_offset_reset!r}: earliest, latest or error")


class Log(_Closing):
    """A log backend: hands out admins, producers and consumers that share its settings."""

    url: str

    @abc.abstractmethod
    def admin(self) -> Admin: ...

    @abc.abstractmethod
    def producer(
        self,
        *,
        transactional_id: str | None = None,
        idempotent: bool = True,
        transaction_timeout_ms: int = 60_000,
        linger_ms: float = 5.0,
        batch_size: int = 1000,
        client_id: str | None = None,
        config: Mapping[str, ConfigValue] | None = None,
    ) -> Producer: ...

    @abc.abstractmethod
    def consumer(
        self,
        *,
        group_id: str | None = None,
        isolation: Isolation = "read_committed",
        auto_offset_reset: OffsetReset = "earliest",
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 1_000,
        max_poll_interval_ms: int = 300_000,
        assignor: str = "range",
        client_id: str | None = None,
        config: Mapping[str, ConfigValue] | None = None,
    ) -> Consumer: ...
