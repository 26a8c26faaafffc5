"""The embedded engine's admin: topics, groups, offsets, watermarks, retention."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from assured.errors import UnknownTopicError
from assured.log._models import (
    GroupDescription,
    MemberDescription,
    TopicDescription,
    TopicPartition,
    Watermarks,
)
from assured.log._protocol import Admin
from assured.log.embedded._engine import Engine

__all__ = ["EmbeddedAdmin"]

_STATES = {"empty": "Empty", "preparing": "PreparingRebalance", "stable": "Stable"}


class EmbeddedAdmin(Admin):
    def __init__(self, engine: Engine):
        self._engine = engine

    def create_topic(
        self, name: str, partitions: int = 1, config: Mapping[str, str] | None = None
    ) -> None:
        self._engine.create_topic(name, partitions, config)

    def delete_topic(self, name: str) -> None:
        self._engine.delete_topic(name)

    def list_topics(self) -> list[str]:
        return self._engine.list_topics()

    def describe_topic(self, name: str) -> TopicDescription:
        info = self._engine.topic(name, refresh=True)
        if info is None:
            raise UnknownTopicError(f"topic {name!r} does not exist")
        with self._engine.read() as c:
            row = c.execute("SELECT id, created_ms FROM topics WHERE id = ?", (info.id,)).fetchone()
        topic_id = f"{row[0]}.{row[1]}" if row else None  # row ids are reused after a delete
        return TopicDescription(name, info.partitions, dict(info.config), topic_id)

    def watermarks(self, tp: TopicPartition) -> Watermarks:
        low, high, lso = self._engine.watermarks(self._engine.part_id(tp))
        return Watermarks(low, high, lso)

    def list_groups(self) -> list[str]:
        return self._engine.groups()

    def describe_group(self, group_id: str) -> GroupDescription:
        import json

        state, generation, members = self._engine.describe_group(group_id)
        return GroupDescription(
            group_id,
            _STATES.get(state, state),
            generation,
            tuple(
                MemberDescription(m, c, tuple(TopicPartition(t, p) for t, p in json.loads(a)))
                for m, c, a in members
            ),
        )

    def committed_offsets(
        self, group_id: str, topics: Iterable[str] | None = None, *, stable: bool = False
    ) -> dict[TopicPartition, int]:
        return self._engine.committed(group_id, topics)  # one file: always the latest state

    def enforce_retention(self) -> int:
        """Apply every topic's retention.ms and retention.bytes now; returns records removed.
        (Producers also do this every ``retention_check_interval_ms``.)"""
        return self._engine.enforce_retention()

    def abort_expired_transactions(self) -> int:
        """Abort every open transaction past its timeout now; returns how many."""
        return self._engine.abort_expired()

    def close(self) -> None:
        self._engine.close()
