"""Topics, groups, offsets and watermarks on Apache Kafka, through AdminClient."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, IsolationLevel, KafkaException
from confluent_kafka import TopicPartition as KTopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._listoffsets import OffsetSpec
from confluent_kafka.cimpl import NewTopic

from assured._retry import Backoff
from assured.errors import InvalidTopicError, LogError, RetriableError, UnknownTopicError
from assured.log._models import (
    GroupDescription,
    Isolation,
    MemberDescription,
    TopicDescription,
    TopicPartition,
    Watermarks,
)
from assured.log._names import check_topic_name, collides
from assured.log._protocol import Admin
from assured.log.kafka._errors import Scrubber, translate, translated

__all__ = ["KafkaAdmin", "admin_client"]

TIMEOUT = 30.0
T = TypeVar("T")


def admin_client(config: Mapping[str, Any], scrub: Scrubber) -> AdminClient:
    with translated(scrub, "creating the Kafka admin client"):
        return AdminClient(dict(config))


class KafkaAdmin(Admin):
    """``timeout``: seconds to wait for each request to Kafka (30 by default)."""

    def __init__(
        self,
        client: AdminClient,
        config: Mapping[str, Any],
        scrub: Scrubber,
        timeout: float = TIMEOUT,
    ):
        self._scrub = scrub
        self.timeout = timeout
        self._admin = client
        self._config = dict(config)
        self._readers: dict[str, Consumer] = {}

    def _wait(self, future: Any, what: str) -> Any:
        try:
            return future.result(timeout=self.timeout)
        except KafkaException as e:
            raise translate(e, self._scrub, what) from None
        except TimeoutError:
            raise LogError(f"{what}: no answer from Kafka within {self.timeout:.0f} s") from None

    def create_topic(
        self, name: str, partitions: int = 1, config: Mapping[str, str] | None = None
    ) -> None:
        check_topic_name(name)
        if partitions < 1:
            raise InvalidTopicError(
                f"topic {name!r} needs at least one partition, not {partitions}"
            )
        existing = self.list_topics()
        if name in existing:
            raise InvalidTopicError(f"topic {name!r} already exists")
        other = collides(name, existing)
        if other:
            raise InvalidTopicError(
                f"topic {name!r} collides with existing topic {other!r} "
                "(Kafka treats '.' and '_' alike in topic names)"
            )
        topic = NewTopic(name, num_partitions=partitions, config=dict(config or {}))
        futures = self._admin.create_topics([topic], operation_timeout=self.timeout)
        self._wait(futures[name], f"creating topic {name!r}")
        # Metadata reaches every broker a moment after the controller says yes.
        with translated(self._scrub, "waiting for the new topic's metadata"):
            for _ in range(100):
                meta = self._admin.list_topics(name, timeout=self.timeout).topics.get(name)
                if meta is not None and meta.error is None and len(meta.partitions) == partitions:
                    return
                time.sleep(0.05)

    def delete_topic(self, name: str) -> None:
        futures = self._admin.delete_topics([name], operation_timeout=self.timeout)
        self._wait(futures[name], f"deleting topic {name!r}")

    def list_topics(self) -> list[str]:
        with translated(self._scrub, "listing topics"):
            meta = self._admin.list_topics(timeout=self.timeout)
        return sorted(t for t in meta.topics if not t.startswith("__"))

    def describe_topic(self, name: str) -> TopicDescription:
        with translated(self._scrub, f"describing topic {name!r}"):
            meta = self._admin.list_topics(name, timeout=self.timeout).topics.get(name)
        if meta is None or meta.error is not None:
            raise UnknownTopicError(f"topic {name!r} does not exist")
        resource = ConfigResource(ConfigResource.Type.TOPIC, name)
        entries = self._wait(
            self._admin.describe_configs([resource])[resource], f"reading {name!r}'s config"
        )
        config = {k: str(v.value) for k, v in entries.items() if v.value is not None}
        return TopicDescription(name, len(meta.partitions), config, self._topic_id(name))

    def _topic_id(self, name: str) -> str | None:
        """The topic's id (a new one each time the name is created again); None from a broker
        too old to tell."""
        from confluent_kafka import TopicCollection

        described = self._admin.describe_topics(TopicCollection([name]))
        found = self._wait(described[name], f"describing topic {name!r}")
        topic_id = getattr(found, "topic_id", None)
        return str(topic_id) if topic_id is not None else None

    def watermarks(self, tp: TopicPartition) -> Watermarks:
        ktp = KTopicPartition(tp.topic, tp.partition)
        earliest = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        low = self._offset(ktp, earliest, IsolationLevel.READ_UNCOMMITTED)
        high = self._offset(ktp, latest, IsolationLevel.READ_UNCOMMITTED)
        lso = self._offset(ktp, latest, IsolationLevel.READ_COMMITTED)
        return Watermarks(low, high, lso)

    def end_offsets(
        self, partitions: Sequence[TopicPartition], isolation: Isolation = "read_committed"
    ) -> dict[TopicPartition, int]:
        if not partitions:
            return {}
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        level = (
            IsolationLevel.READ_COMMITTED
            if isolation == "read_committed"
            else IsolationLevel.READ_UNCOMMITTED
        )
        wanted = {KTopicPartition(tp.topic, tp.partition): tp for tp in partitions}

        def ask() -> dict[TopicPartition, int]:
            # One ListOffsets request per leader broker, for all of them at once.
            futures = self._admin.list_offsets(dict.fromkeys(wanted, latest), isolation_level=level)
            return {
                tp: int(self._wait(futures[ktp], f"listing offsets of {tp}").offset)
                for ktp, tp in wanted.items()
            }

        return self._again(ask)

    def _offset(self, ktp: KTopicPartition, spec: OffsetSpec, isolation: IsolationLevel) -> int:
        def ask() -> int:
            futures = self._admin.list_offsets({ktp: spec}, isolation_level=isolation)
            info = self._wait(futures[ktp], f"listing offsets of {ktp.topic}[{ktp.partition}]")
            return int(info.offset)

        return self._again(ask)

    def _again(self, ask: Callable[[], T]) -> T:
        """``ask()``, again while the error is retriable (leadership moving after a broker
        died), until ``timeout`` seconds have passed."""
        backoff = Backoff(self.timeout)
        while True:
            try:
                return ask()
            except RetriableError:
                if not backoff.pause():
                    raise
                # The client's cached leaders (and their epochs) may predate the election;
                # a metadata request renews them, or the same stale answer comes back.
                with contextlib.suppress(KafkaException):
                    self._admin.list_topics(timeout=min(5.0, self.timeout))

    def list_groups(self) -> list[str]:
        result = self._wait(self._admin.list_consumer_groups(), "listing consumer groups")
        return sorted(g.group_id for g in result.valid)

    def describe_group(self, group_id: str) -> GroupDescription:
        futures = self._admin.describe_consumer_groups([group_id])
        desc = self._wait(futures[group_id], f"describing group {group_id!r}")
        members = tuple(
            MemberDescription(
                m.member_id,
                m.client_id,
                tuple(
                    TopicPartition(t.topic, t.partition)
                    for t in (m.assignment.topic_partitions if m.assignment else [])
                ),
            )
            for m in desc.members
        )
        return GroupDescription(group_id, _state_name(desc.state), -1, members)

    def committed_offsets(
        self, group_id: str, topics: Iterable[str] | None = None, *, stable: bool = False
    ) -> dict[TopicPartition, int]:
        if topics is not None or stable:
            if topics is None:
                topics = {tp.topic for tp in self.committed_offsets(group_id)}
            return self._committed_by_consumer(group_id, sorted(set(topics)), stable)
        request = [ConsumerGroupTopicPartitions(group_id)]
        futures = self._admin.list_consumer_group_offsets(request)
        result = self._wait(futures[group_id], f"reading group {group_id!r}'s offsets")
        return {
            TopicPartition(t.topic, t.partition): t.offset
            for t in result.topic_partitions
            if t.offset >= 0
        }

    def _committed_by_consumer(
        self, group_id: str, topics: list[str], stable: bool = False
    ) -> dict[TopicPartition, int]:
        """Committed offsets read through a consumer that never joins the group.

        Why not AdminClient: librdkafka 2.16's ListConsumerGroupOffsets crashes the process
        (SIGSEGV in rd_kafka_cgrp_op) when the group coordinator moves mid-request, as it does
        when a broker dies. A consumer's OffsetFetch has the group handle that path needs.

        read_uncommitted, so the reader does not ask for stable offsets: like the AdminClient by
        default, it answers at once with the last committed offsets, where a read_committed one
        would wait as long as an open transaction holds new ones (a frozen member's, for up to
        its transaction timeout). A coordinator elected a moment ago answers such a read from
        its own high watermark, which may lag the old leader's: offsets a commit or two old,
        never stored like that. ``stable`` reads with read_committed instead (see
        :meth:`committed_offsets`)."""
        key = f"{group_id}\0stable" if stable else group_id
        reader = self._readers.get(key)
        if reader is None:
            config = {
                **self._config,
                "group.id": group_id,
                "enable.auto.commit": False,
                "isolation.level": "read_committed" if stable else "read_uncommitted",
            }
            with translated(self._scrub, "creating an offset reader"):
                reader = self._readers[key] = Consumer(config)
        ktps = [
            KTopicPartition(t, p) for t in topics for p in range(self.describe_topic(t).partitions)
        ]

        def ask() -> list[KTopicPartition]:
            with translated(self._scrub, f"reading group {group_id!r}'s offsets"):
                return list(reader.committed(ktps, timeout=self.timeout))

        found = self._again(ask)
        return {TopicPartition(k.topic, k.partition): k.offset for k in found if k.offset >= 0}

    def close(self) -> None:
        """Close the offset readers; the AdminClient itself belongs to the log."""
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


def _state_name(state: Any) -> str:
    """Kafka's names for group states (Stable, PreparingRebalance, Empty, ...)."""
    name = getattr(state, "name", str(state))
    return {
        "STABLE": "Stable",
        "EMPTY": "Empty",
        "DEAD": "Dead",
        "PREPARING_REBALANCING": "PreparingRebalance",
        "PREPARING_REBALANCE": "PreparingRebalance",
        "COMPLETING_REBALANCING": "CompletingRebalance",
        "COMPLETING_REBALANCE": "CompletingRebalance",
    }.get(name, name.title())
