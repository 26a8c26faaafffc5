"""The embedded engine's consumer: group membership, rebalances, fetching, commits.

Group membership follows Kafka's eager protocol. A join, a leave or an expiry moves the group
to *preparing*; each member, inside its next ``poll``, runs ``on_revoke`` (its commits still
count: the generation has not moved) and rejoins; when all have, the last one computes the next
generation's assignment, and each member runs ``on_assign`` in its next ``poll``. A member that
misses its session timeout (no heartbeat) or the rebalance timeout (no poll) is expelled; it
learns so in ``poll`` and runs ``on_lost``, since its commits would be refused. A heartbeat
thread keeps the member alive between polls, and leaves the group if ``poll`` is not called
within ``max_poll_interval_ms``, as Kafka's clients do.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence

from assured.errors import AssuredError, LogError, UnknownTopicError, UsageError
from assured.log._models import GroupMetadata, Isolation, OffsetReset, Record, TopicPartition
from assured.log._protocol import (
    AssignCallback,
    Consumer,
    PartitionsCallback,
    checked_metadata,
)
from assured.log.embedded._engine import Engine
from assured.log.embedded._wakeup import Waiter

__all__ = ["EmbeddedConsumer"]

log = logging.getLogger("assured.log.embedded")
_MAX_WAIT_STEP = 0.25  # a wait re-checks at least this often, whatever wakes it


class EmbeddedConsumer(Consumer):
    def __init__(
        self,
        engine: Engine,
        heartbeat_engine: Engine | None,
        *,
        group_id: str | None,
        isolation: Isolation,
        auto_offset_reset: OffsetReset,
        session_timeout_ms: int,
        heartbeat_interval_ms: int,
        max_poll_interval_ms: int,
        assignor: str,
        client_id: str,
    ):
        self._engine = engine
        self._hb_engine = heartbeat_engine
        self._group_id = group_id
        self._committed_only = isolation == "read_committed"
        self._reset = auto_offset_reset
        self._session_ms = session_timeout_ms
        self._heartbeat_s = heartbeat_interval_ms / 1000
        self._max_poll_s = max_poll_interval_ms / 1000
        self._assignor = assignor
        self._client_id = client_id
        self._topics: list[str] = []
        self._on_assign: AssignCallback | None = None
        self._on_revoke: PartitionsCallback | None = None
        self._on_lost: PartitionsCallback | None = None
        self._member_id = ""
        self._generation = -1
        self._assigned: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}
        self._parts: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._next = 0  # round-robin start, so no partition starves the others
        self._last_poll = time.monotonic()
        self._expelled = threading.Event()
        self._stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._closed = False
        self._waiter = Waiter(engine.path, engine.data_version)

    # -- membership ----------------------------------------------------------------------------

    def subscribe(
        self,
        topics: Sequence[str],
        on_assign: AssignCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
        on_lost: PartitionsCallback | None = None,
    ) -> None:
        self._check_open()
        if self._group_id is None:
            raise UsageError("subscribe() needs a consumer made with group_id=...")
        if self._member_id:
            raise UsageError("this consumer is already subscribed")
        for t in topics:
            self._engine.require_topic(t, refresh=True)
        self._topics = list(topics)
        self._on_assign, self._on_revoke, self._on_lost = on_assign, on_revoke, on_lost
        self._join()
        self._hb_thread = threading.Thread(
            target=self._heartbeat_loop, name="assured-consumer-heartbeat", daemon=True
        )
        self._hb_thread.start()

    def _join(self) -> None:
        assert self._group_id is not None
        self._member_id = f"{self._client_id}-{uuid.uuid4().hex[:12]}"
        self._generation = -1
        self._expelled.clear()
        self._engine.join_group(
            self._group_id,
            self._member_id,
            self._client_id,
            self._topics,
            self._session_ms,
            int(self._max_poll_s * 1000),
            self._assignor,
        )

    def _heartbeat_loop(self) -> None:
        assert self._hb_engine is not None
        assert self._group_id is not None
        while not self._stop.wait(self._heartbeat_s):
            member = self._member_id
            if time.monotonic() - self._last_poll > self._max_poll_s:
                log.warning(
                    "poll() not called for over max.poll.interval.ms (%.0f s): leaving group %r",
                    self._max_poll_s,
                    self._group_id,
                )
                with contextlib.suppress(AssuredError):
                    self._hb_engine.leave_group(self._group_id, member)
                self._expelled.set()
                continue
            try:
                if not self._hb_engine.heartbeat(self._group_id, member):
                    self._expelled.set()
            except AssuredError as e:  # busy beyond the timeout: try again next beat
                log.debug("heartbeat failed: %s", e)
            except Exception as e:  # never let the heartbeat thread die: the group would churn
                log.warning("heartbeat failed: %s: %s", type(e).__name__, e)

    def _group_step(self) -> None:
        """Advance this member through a rebalance, running its callbacks here."""
        assert self._group_id is not None
        if self._expelled.is_set():
            self._lose()
            self._join()
        view = self._engine.group_view(self._group_id, self._member_id)
        if not view.member_exists:
            self._lose()
            self._join()
            return
        if view.state == "preparing":
            if not view.joined:
                self._revoke()
                self._engine.rejoin(self._group_id, self._member_id)
            else:
                self._engine.try_complete(self._group_id)
            return
        if view.state == "stable" and view.member_generation == view.generation != self._generation:
            self._generation = view.generation
            self._take(list(view.assignment))

    def _take(self, partitions: list[TopicPartition]) -> None:
        self._assigned = partitions
        self._positions = {}
        self._parts = {}
        self._paused &= set(partitions)
        if self._on_assign is not None:
            starts = self._on_assign(list(partitions))
            if starts:
                self._positions.update((tp, off) for tp, off in starts.items() if tp in partitions)

    def _revoke(self) -> None:
        if self._assigned and self._on_revoke is not None:
            self._on_revoke(list(self._assigned))
        self._clear()

    def _lose(self) -> None:
        if self._assigned and self._on_lost is not None:
            self._on_lost(list(self._assigned))
        self._clear()

    def _clear(self) -> None:
        self._assigned, self._positions, self._parts = [], {}, {}
        self._generation = -1

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self._check_open()
        if self._member_id:
            raise UsageError("this consumer is subscribed to a group; it cannot also assign()")
        for tp in partitions:
            self._engine.part_id(tp)
        self._take(list(partitions))

    def assignment(self) -> list[TopicPartition]:
        return list(self._assigned)

    # -- positions -----------------------------------------------------------------------------

    def _part(self, tp: TopicPartition) -> int:
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = self._engine.part_id(tp)
        return part

    def _initial_position(self, tp: TopicPartition, low: int, lso: int, high: int) -> int:
        if self._group_id is not None:
            committed = self.committed([tp])[tp]
            if committed is not None and low <= committed <= high:
                return committed
        return self._reset_position(tp, low, lso, high)

    def _reset_position(self, tp: TopicPartition, low: int, lso: int, high: int) -> int:
        if self._reset == "earliest":
            return low
        if self._reset == "latest":
            return lso if self._committed_only else high
        raise LogError(
            f"no valid offset for {tp} and auto_offset_reset='error'; seek() to an offset first"
        )

    def position(self, tp: TopicPartition) -> int:
        self._check_open()
        if tp not in self._assigned:
            raise UsageError(f"{tp} is not assigned to this consumer")
        if tp not in self._positions:
            part = self._part(tp)
            with self._engine.read():
                low, high, lso, _ = self._engine.bounds(part)
            self._positions[tp] = self._initial_position(tp, low, lso, high)
        return self._positions[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._check_open()
        if tp not in self._assigned:
            raise UsageError(f"{tp} is not assigned to this consumer; seek() needs it assigned")
        if offset < 0:
            raise UsageError(f"cannot seek to negative offset {offset}")
        self._positions[tp] = offset

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        self._paused.update(partitions)

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        self._paused.difference_update(partitions)

    # -- fetching ------------------------------------------------------------------------------

    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        self._check_open()
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            self._last_poll = time.monotonic()
            if self._member_id:
                self._group_step()
            records = self._fetch(max_records)
            left = deadline - time.monotonic()
            if records or left <= 0:
                return records
            self._waiter.wait(min(left, _MAX_WAIT_STEP))

    def _fetch(self, limit: int) -> list[Record]:
        active = [tp for tp in self._assigned if tp not in self._paused]
        if not active:
            return []
        out: list[Record] = []
        engine = self._engine
        expired = False
        now = time.time_ns() // 1_000_000
        start = self._next % len(active)
        order = active[start:] + active[:start]
        self._next += 1
        with engine.read():
            for tp in order:
                if len(out) >= limit:
                    break  # the rest wait for later polls, which start elsewhere in the order
                part = self._part(tp)
                low, high, lso, deadline = engine.bounds(part)
                if deadline is not None and deadline < now:
                    expired = True
                pos = self._positions.get(tp)
                if pos is None or pos < low or pos > high:
                    pos = (
                        self._initial_position(tp, low, lso, high)
                        if pos is None
                        else self._reset_position(tp, low, lso, high)
                    )
                upper = lso if self._committed_only else high
                if pos >= upper:
                    self._positions[tp] = pos
                    continue
                records, self._positions[tp] = engine.fetch(
                    tp, part, pos, upper, limit - len(out), self._committed_only
                )
                out += records
        if expired:
            engine.abort_expired()
        return out

    # -- commits -------------------------------------------------------------------------------

    def commit(
        self,
        offsets: Mapping[TopicPartition, int] | None = None,
        asynchronous: bool = False,
        metadata: Mapping[TopicPartition, str] | None = None,
    ) -> None:
        self._check_open()
        if self._group_id is None:
            raise UsageError("commit() needs a consumer made with group_id=...")
        if offsets is None:
            offsets = {tp: self._positions[tp] for tp in self._assigned if tp in self._positions}
        if not offsets:
            return
        notes = checked_metadata(metadata)
        for tp in offsets:
            self._part(tp)
        self._engine.commit_offsets(
            self._group_id, self._generation, self._member_id, dict(offsets), notes
        )

    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        self._check_open()
        if self._group_id is None:
            return dict.fromkeys(partitions)
        known = self._engine.committed(self._group_id, {tp.topic for tp in partitions})
        return {tp: known.get(tp) for tp in partitions}

    def committed_metadata(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, tuple[int, str]]:
        self._check_open()
        if self._group_id is None:
            return {}
        known = self._engine.committed_metadata(self._group_id, {tp.topic for tp in partitions})
        return {tp: known[tp] for tp in partitions if tp in known}

    def group_metadata(self) -> GroupMetadata:
        if self._group_id is None:
            raise UsageError("group_metadata() needs a consumer made with group_id=...")
        return GroupMetadata(self._group_id, self._generation, self._member_id)

    # -- closing -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this consumer is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=5)
        try:
            if self._member_id and self._group_id is not None:
                if not self._expelled.is_set():
                    with contextlib.suppress(UnknownTopicError):
                        self._revoke()
                else:
                    self._lose()
                self._engine.leave_group(self._group_id, self._member_id)
        finally:
            self._closed = True
            self._waiter.close()
            self._engine.close()
            if self._hb_engine is not None:
                self._hb_engine.close()
