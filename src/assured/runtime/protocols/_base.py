"""What every commit protocol shares: the consumer, the handlers, and where outputs go."""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import groupby
from operator import itemgetter

from assured.log import Consumer, Log, Producer, Record, TopicPartition
from assured.runtime._concurrent import EventLoop, Window, blocking, given_up
from assured.runtime._handling import (
    DeadLetterSink,
    HandlerSpec,
    Output,
    producer_dead_letters,
    record_handler,
)
from assured.runtime._settings import AppSettings
from assured.runtime._shared_db import SharedTransaction
from assured.runtime.metrics import RuntimeMetrics
from assured.sinks import Sink, SinkTransaction

__all__ = [
    "CommitProtocol",
    "Runtime",
    "Trouble",
    "first_offsets",
    "isolated",
    "log_commit",
    "next_offsets",
    "seek_back",
]

log = logging.getLogger("assured.runtime")


_topic_of = itemgetter(0)
_partition_of = itemgetter(0, 1)  # a Record's (topic, partition)
_offset_of = itemgetter(2)


def next_offsets(records: Sequence[Record]) -> dict[TopicPartition, int]:
    """The offset to commit per partition after ``records``: the last one's offset + 1.
    (A partition's records come in offset order, so the last one seen is the highest.)"""
    last = dict(zip(map(_partition_of, records), map(_offset_of, records), strict=True))
    return {TopicPartition(*tp): offset + 1 for tp, offset in last.items()}


def first_offsets(records: Sequence[Record]) -> dict[TopicPartition, int]:
    """Each partition's first offset in ``records``."""
    backwards = records[::-1]
    first = dict(zip(map(_partition_of, backwards), map(_offset_of, backwards), strict=True))
    order = dict.fromkeys(map(_partition_of, records))  # the order partitions first appear
    return {TopicPartition(*tp): first[tp] for tp in order}


def seek_back(
    consumer: Consumer,
    rewind: Mapping[TopicPartition, int],
    unhandled: Sequence[Record] = (),
) -> None:
    """Send the consumer back to ``rewind`` (where an undone piece of work began) and to the
    first of ``unhandled`` records (polled, never handled) of every other partition: nothing
    polled is skipped, and nothing undone stays undone."""
    targets = dict(first_offsets(unhandled)) if unhandled else {}
    targets.update(rewind)
    if not targets:
        return
    assigned = set(consumer.assignment())
    for tp, offset in targets.items():
        if tp in assigned:
            consumer.seek(tp, offset)


def log_commit(event: str, what: str, offsets: Mapping[TopicPartition, int]) -> None:
    """A debug line for a commit or an abort: ``what``, then the positions it covered. Says
    only what happened; built only when debug lines are wanted."""
    if log.isEnabledFor(logging.DEBUG):
        shown = ", ".join(f"{tp}@{offset}" for tp, offset in offsets.items())
        log.debug(
            "%s%s",
            what,
            f": {shown}" if shown else "",
            extra={"event": event, "offsets": {str(tp): o for tp, o in offsets.items()}},
        )


def isolated(isolate: dict[TopicPartition, int], record: Record) -> bool:
    """Is ``record`` below its partition's bound in ``isolate`` (records redone one at a time
    after a failure that may be one record's)? A bound passed is dropped."""
    tp = TopicPartition(record.topic, record.partition)
    bound = isolate.get(tp)
    if bound is None:
        return False
    if record.offset >= bound:
        del isolate[tp]
        return False
    return True


class Trouble:
    """A run of failures of the log or the database, with no commit in between: how long it
    has lasted, and a pause that grows with it (so a protocol waits rather than spins)."""

    def __init__(self) -> None:
        self.since: float | None = None

    def seconds(self) -> float:
        """How long the run has lasted; a failure now starts one if none is going on."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        return now - self.since

    def pause(self) -> None:
        time.sleep(min(1.0, 0.05 + self.seconds() / 10))

    def over(self) -> None:
        """A commit went through: the run is over."""
        self.since = None


@dataclass
class Runtime:
    """The parts a protocol works with."""

    settings: AppSettings
    log: Log
    consumer: Consumer
    specs: dict[str, HandlerSpec]
    metrics: RuntimeMetrics
    sink: Sink | None = None
    # Told of every transaction's fate: (label, "committed" | "aborted"); the audit listens.
    on_transaction: Callable[[str, str], None] | None = None
    transaction: str | None = None  # label of the open transaction, if any
    # Each input topic's incarnation (see TopicDescription.topic_id), for the sink's inbox and
    # claims: a topic deleted and created again starts its offsets from 0.
    incarnations: dict[str, str] = field(default_factory=dict)
    # Seconds spent in handle() so far: what sizes the polls (commits and database
    # transactions around the handling are not the handlers' time).
    handling_s: float = 0.0
    # Where async handlers are awaited, and concurrent batches run (made on first use).
    loop: EventLoop = field(default_factory=EventLoop)
    # Keyed by the producer itself, not its id(): a replaced producer's id may be reused.
    _outputs: dict[tuple[Producer, str], Output] = field(default_factory=dict)
    # Records of handlers with concurrency > 1 in flight, across polls and commits.
    windows: dict[str, Window] = field(default_factory=dict)
    # The window's kind; the audit's planted bugs put a broken one here.
    window_class: type[Window] = Window
    # Records a database sink has committed above where the consumer will read from again (a
    # rewind, or marks a claim found): skipped when polled. Under exactly-once into a
    # database, the claimed partitions' epochs, which every group commit checks.
    skips: dict[TopicPartition, set[int]] = field(default_factory=dict)
    epochs: dict[TopicPartition, int] = field(default_factory=dict)
    shared_class: type[SharedTransaction] = SharedTransaction  # the audit's plants swap it
    # The App's stop (stop() or a signal), and the end of the drain it allows: records side
    # by side still running then are given up (see past_drain).
    stopping: threading.Event | None = None
    drain_until: float | None = None
    # A revoke's drain ends by then too (see revoking): its partitions go, whatever still runs.
    revoke_until: float | None = None
    # Records whose batches were done again for a conflict with another transaction, and how
    # many times: past BATCH_CONFLICT_REDOS the conflict is the record's failure.
    conflicts: dict[tuple[str, int, int], int] = field(default_factory=dict)

    def stop_asked(self) -> bool:
        """Whether the App was asked to stop (its stop() or a signal)."""
        return self.stopping is not None and self.stopping.is_set()

    def revoking(
        self, then: Callable[[list[TopicPartition]], None]
    ) -> Callable[[list[TopicPartition]], None]:
        """``then`` (a protocol's on_revoke), its drain bounded as a stop's is: records side by
        side of the partitions that go have ``drain_timeout_ms`` to finish; one still running
        then is given up (nothing of it commits; the next owner handles it again, or under
        at-most-once it is lost), so a handler that never returns cannot hold the rebalance,
        and with it the whole group, for ever."""

        def revoke(partitions: list[TopicPartition]) -> None:
            self.revoke_until = time.monotonic() + self.settings.drain_timeout_ms / 1000
            try:
                then(partitions)
            finally:
                self.revoke_until = None
            # What the drain gave up is still in the windows, above what was committed: it
            # goes with its partitions (were one to come back, its records run again from
            # the committed position, not behind the calls given up). The drain gives up what
            # runs in every partition, which holds because revokes are eager (the App's
            # consumer uses the range assignor: every partition goes). With a cooperative
            # assignor, records given up in a partition that stays would never finish and
            # would hold its position for good: that partition would need a rewind too.
            self.give_up(partitions)

        return revoke

    def past_drain(self) -> bool:
        """Whether a stop was asked for ``drain_timeout_ms`` ago or more."""
        if self.drain_until is None:
            if self.stopping is None or not self.stopping.is_set():
                return False
            self.drain_until = time.monotonic() + self.settings.drain_timeout_ms / 1000
        return time.monotonic() >= self.drain_until

    @property
    def sink_side_by_side(self) -> bool:
        """Whether records reach the sink side by side: each window then commits its own
        database transactions, and a protocol opens none around the handling."""
        return any(s.sink is not None and s.windowed for s in self.specs.values())

    def handle(
        self,
        records: Sequence[Record],
        producer: Producer,
        tx: SinkTransaction | None = None,
        dead_letters: DeadLetterSink | None = None,
        transactional: bool = False,
        complete: bool = False,
    ) -> dict[TopicPartition, int]:
        """``records`` through their handlers, in order; outputs via ``producer``, effects
        into ``tx`` when the handler has a sink, dead letters to ``dead_letters`` (default:
        ``producer``). ``transactional``: outputs go into an open transaction.

        Returns the positions the protocol may now commit. A handler with ``concurrency`` > 1
        keeps its records in a :class:`Window` across calls: its positions are each
        partition's contiguous handled prefix, which may hold records of earlier calls and
        leave out some of these, still running; with ``records`` empty the call lets the
        window's records go on. ``complete``: return only when no record is in flight."""
        handlers: dict[str, Callable[[Record], None]] = {}
        counts: dict[str, int] = {}
        done: dict[TopicPartition, int] = {}
        dlq = dead_letters or producer_dead_letters(producer, self.settings.guarantee)
        began = time.monotonic()
        stepped: set[str] = set()
        try:
            for topic, run in groupby(records, _topic_of):
                spec = self.specs[topic]
                batch = list(run)
                if spec.windowed:
                    self._step(spec, batch, producer, dlq, transactional, complete)
                    stepped.add(topic)
                    continue
                handle = handlers.get(topic)
                if handle is None:
                    handle = handlers[topic] = self._handler(
                        self.specs[topic], producer, tx, dlq, transactional
                    )
                deque(map(handle, batch), maxlen=0)  # the loop, in C
                counts[topic] = counts.get(topic, 0) + len(batch)
                done.update(next_offsets(batch))
            for topic, window in self.windows.items():
                if topic not in stepped and window.count:
                    self._step(window.spec, [], producer, dlq, transactional, complete)
                moved, _ = window.prefix()
                done.update(moved)
        finally:
            self.handling_s += time.monotonic() - began
            for topic, n in counts.items():
                self.metrics.processed.labels(self.settings.guarantee, topic).inc(n)
        return done

    def _step(
        self,
        spec: HandlerSpec,
        batch: list[Record],
        producer: Producer,
        dead_letters: DeadLetterSink,
        transactional: bool,
        complete: bool,
    ) -> None:
        window = self.windows.get(spec.topic)
        if window is None:
            threads = None if spec.is_async else self.loop.pool(spec)
            # One record at a time (an async def into a sink) polls no further ahead than the
            # plain path would: at-most-once commits what it polls before handling it.
            room = (
                max(1000, 4 * spec.concurrency, 2 * self.settings.max_poll_records)
                if spec.concurrency > 1
                else 4
            )
            window = self.windows[spec.topic] = self.window_class(
                spec, self.metrics, self.settings.guarantee, threads, room
            )
            window.skips = self.skips
            if spec.sink is not None:
                window.db = self.shared_class(
                    spec.sink, self.settings.group, self.incarnations,
                    marks=self.settings.guarantee == "exactly-once", epochs=lambda: self.epochs,
                    region_limit_s=self.settings.transaction_timeout_ms / 1000,
                )  # fmt: skip
        window.producer, window.dead_letters = producer, dead_letters
        self.past_drain()  # a stop seen: its drain's end is known from now
        ends = [t for t in (self.drain_until, self.revoke_until) if t is not None]
        window.deadline = min(ends) if complete and ends else None
        window.past_drain, window.stop_asked = self.past_drain, self.stop_asked
        window.transactional, window.transaction = transactional, lambda: self.transaction
        self.loop.run(window.step(batch, complete))

    def in_flight(self) -> int:
        """Records of concurrent handlers still in their windows."""
        return sum(w.count for w in self.windows.values())

    def let_run(self) -> int:
        """Let the records in the windows go on for a moment (until one finishes, or 10 ms);
        how many are ready to leave them (handled, at their partitions' heads)."""
        for window in self.windows.values():
            if window.count:
                self.loop.run(window.step([], complete=False))
        return sum(w.ready() for w in self.windows.values())

    def ends(self) -> dict[TopicPartition, int]:
        """Each partition's position after its last record in a window."""
        out: dict[TopicPartition, int] = {}
        for window in self.windows.values():
            out.update(window.ends())
        return out

    def handled_above(self) -> dict[TopicPartition, tuple[int, list[int]]]:
        """:meth:`Window.handled_above` of every window."""
        out: dict[TopicPartition, tuple[int, list[int]]] = {}
        for window in self.windows.values():
            out.update(window.handled_above())
        return out

    def heads(self) -> dict[TopicPartition, int]:
        """Each partition's first record still in a window."""
        out: dict[TopicPartition, int] = {}
        for window in self.windows.values():
            out.update(window.heads())
        return out

    def seek_back(
        self, rewind: Mapping[TopicPartition, int], unhandled: Sequence[Record] = ()
    ) -> None:
        """:func:`seek_back`, after giving up every record in a window: their partitions go
        back to their first such record too (or further, as ``rewind`` says)."""
        merged = self.heads()
        for tp, offset in rewind.items():
            merged[tp] = min(offset, merged.get(tp, offset))
        self.give_up()
        seek_back(self.consumer, merged, unhandled)

    def give_up(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Drop the records in flight (of ``partitions``, or all): their tasks are cancelled
        and awaited, their outputs dropped; the caller rewinds or the partitions are gone."""
        tasks = []
        for window in self.windows.values():
            tasks += window.reset() if partitions is None else window.forget(partitions)
        if tasks:
            self.loop.run(given_up(tasks))
        for window in self.windows.values():
            if window.db is not None and partitions is None:
                self.loop.run(window.db.rollback())  # what the records given up had begun

    def _handler(
        self,
        spec: HandlerSpec,
        producer: Producer,
        tx: SinkTransaction | None,
        dead_letters: DeadLetterSink,
        transactional: bool,
    ) -> Callable[[Record], None]:
        target: Output | SinkTransaction | None
        if spec.sink is not None:
            target = tx
        elif spec.output is not None:
            target = self._output(spec, producer)
        else:
            target = None
        if spec.is_async:  # awaited to its end, one record at a time
            spec = replace(spec, fn=blocking(spec.fn, self.loop), is_async=False)
        return record_handler(
            spec, target, dead_letters, self.metrics, self.settings.guarantee, transactional,
            self.loop.settle, self.past_drain, self.conflicts,
        )  # fmt: skip

    def drop_outputs(self, producer: Producer) -> None:
        """Forget the outputs bound to ``producer`` (closed and replaced)."""
        self._outputs = {k: out for k, out in self._outputs.items() if k[0] is not producer}

    def _output(self, spec: HandlerSpec, producer: Producer) -> Output:
        key = (producer, spec.topic)
        out = self._outputs.get(key)
        if out is None:
            out = Output(
                producer, spec.output, spec.key_codec, spec.value_codec, lambda: self.transaction
            )
            self._outputs[key] = out
        return out


class CommitProtocol(abc.ABC):
    """One delivery guarantee: when positions are committed relative to handling."""

    guarantee: str

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.fenced = False
        # Set when an error escaped: from then on nothing commits (not on revoke, not at close).
        self.failed = False

    def start(self) -> None:
        """Make producers, claim resources; called once before the first poll."""

    @abc.abstractmethod
    def process(self, records: list[Record]) -> None:
        """Handle one polled batch, committing as the guarantee requires."""

    def tick(self, caught_up: bool = False) -> None:
        """Called after every poll, records or not: time-based commits happen here.
        ``caught_up``: that poll returned less than a full batch (nothing more was waiting)."""

    def on_assign(self, partitions: list[TopicPartition]) -> Mapping[TopicPartition, int] | None:
        return None

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """The partitions leave; our generation is still current, so commits still count."""

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """The partitions are already gone; committing for them would be refused."""

    @abc.abstractmethod
    def close(self) -> None:
        """Commit (or abort) what is open and release producers."""

    def abandon(self) -> None:
        """An error is on its way out of ``run()``: undo what is open, commit nothing more,
        release producers. Never raises."""
        self.failed = True
