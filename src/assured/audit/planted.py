"""Deliberately broken commit protocols, to show the audit catches what it exists to catch.

Armed only by ``ASSURED_AUDIT_PLANT`` in a processor's environment (tests do this). Each undoes
one rule the runtime keeps, in as few lines as it takes:

- ``commit-before-handle``: calls itself at-least-once but commits before handling (that is
  at-most-once), so a crash loses records the guarantee promised to keep;
- ``offsets-outside-transaction``: calls itself exactly-once but commits the consumer offsets
  directly, outside the transaction, so an aborted transaction's input is skipped;
- ``commit-poisoned-transaction`` (fix 1 undone): exactly-once, but an error on its way out
  of a batch commits the open transaction instead of aborting it, as v1's ``on_revoke`` and
  ``close`` did: the outputs of the records handled before the error commit without their
  positions, and are made again after the restart (shown by ``handler-errors``' fatal fate);
- ``commit-past-failed-write`` (fix 2 undone): at-least-once, but a failed delivery found at
  the flush before a commit is logged and the positions committed anyway: the records whose
  outputs were lost are never handled again (shown by ``write-stall``);
- ``dead-letters-outside-database`` (fix 3 undone): exactly-once into a database, but dead
  letters go out through a plain producer before the database commits: a crash in between
  sends them again (shown by ``handler-errors`` and ``crash-points``; the crash point sits
  where this design is weakest, after the dead letters went out, in batches that had some);
- ``keep-failed-attempts`` (fix 8 undone): exactly-once, but an output is sent as soon as the
  handler calls ``send``, not when the call returns: a failed attempt's outputs stay, so a
  retry repeats them and a dead-lettered record has effects too (shown by ``handler-errors``);
- ``commit-highest-completed`` (issue 14): exactly-once with records side by side, but each
  partition's position is committed past its highest handled record, not its contiguous
  handled prefix: records below it still in flight are lost if the process dies before they
  finish (shown by ``--concurrency`` with ``--handler-latency-ms`` and ``sigkill``);
- ``side-by-side-without-marks`` (issue 14): exactly-once into a database with records side
  by side, but a group commit stores only each partition's contiguous prefix and no marks for
  the records committed above it: a crash has them handled, and their effects made, again
  (shown by ``--sink sqlite --concurrency`` with ``sigkill``);
- ``stray-sends-kept`` (issue 14): exactly-once, but ``out.send`` takes a send from any code
  as the running attempt's: a thread or task a failed attempt left running sends into the
  retry's or another record's outputs, which commit (shown by ``handler-errors``' stray fate);
- ``remember-unfinished`` (issue 14): at-least-once with records side by side, but the commit's
  offset metadata names every record above the committed position, finished or not: a new
  owner skips the ones that were still running when the process died (shown by
  ``--concurrency`` with ``--handler-latency-ms`` and ``sigkill``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from assured.errors import AssuredError, DeliveryError
from assured.log import Header, Producer, Record, TopicPartition
from assured.runtime._concurrent import Window
from assured.runtime._handling import HandlerSpec, Output
from assured.runtime._shared_db import SharedTransaction
from assured.runtime.crashpoints import crash_point
from assured.runtime.protocols._base import CommitProtocol, Runtime, next_offsets
from assured.runtime.protocols.at_least_once import AtLeastOnce
from assured.runtime.protocols.at_most_once import AtMostOnce
from assured.runtime.protocols.exactly_once import ExactlyOnce
from assured.runtime.protocols.exactly_once_sink import ExactlyOnceSink
from assured.sinks import SinkFencedError

__all__ = ["PLANTS", "planted"]

log = logging.getLogger("assured.audit.planted")


class CommitsBeforeHandling(AtMostOnce):
    guarantee = "at-least-once"

    def process(self, records: list[Record]) -> None:
        self.rt.consumer.commit(next_offsets(records))
        crash_point("after-handle-before-commit")  # where at-least-once would be weakest
        self.rt.handle(records, self.producer)
        self.producer.flush()


class OffsetsOutsideTransaction(ExactlyOnce):
    def commit(self, unhandled: Sequence[Record] = ()) -> bool:
        if self.open and self.pending and not (self.failed or self.fenced):
            self.rt.consumer.commit(self.pending)  # the bug: not part of the transaction
            self.pending.clear()
        return super().commit(unhandled)


class CommitsPoisonedTransaction(ExactlyOnce):
    def abandon(self) -> None:
        with contextlib.suppress(Exception):
            self.commit()  # the bug: what the error interrupted commits; it should abort


class CommitsPastFailedWrites(AtLeastOnce):
    def commit(self, synchronous: bool, unhandled: Sequence[Record] = ()) -> bool:
        if self.pending:
            try:
                self.producer.flush()
            except DeliveryError as e:  # the bug: the positions move past the lost outputs
                log.warning("planted bug: committing although %s", e)
        return super().commit(synchronous, unhandled)


class DeadLettersOutsideTheDatabase(ExactlyOnceSink):
    def start(self) -> None:
        super().start()
        self.plain: Producer = self.rt.log.producer()

    def process(self, records: list[Record]) -> None:
        mine = [r for r in records if TopicPartition(r.topic, r.partition) in self.epochs]
        if not mine:
            return
        offsets = next_offsets(mine)
        sent = 0

        def dead_letter(topic: str, record: Record, headers: list[Header]) -> None:
            nonlocal sent
            self.plain.send(topic, record.value, key=record.key, headers=headers)
            sent += 1

        try:
            with self.sink.transaction(self.rt.settings.group) as tx:
                self.rt.handle(mine, self.plain, tx, dead_letters=dead_letter)
                self.sink.store_offsets(tx, self.rt.settings.group, offsets, self.epochs)
                self.plain.flush()  # the bug: out for good, whatever the database does next
                if sent:
                    crash_point("after-effect-before-offset")
        except SinkFencedError:
            for tp in offsets:
                self.epochs.pop(tp, None)
            return
        with contextlib.suppress(AssuredError):
            self.rt.consumer.commit(offsets, asynchronous=True)

    def close(self) -> None:
        self.plain.close()
        super().close()


class _SendsAtOnce(Output):
    """v1's Output: each send goes straight to the producer, and stays sent if the handler
    then raises."""

    def send(
        self,
        value: Any,
        key: Any = None,
        headers: Sequence[Header] | None = None,
        topic: str | None = None,
        partition: int | None = None,
    ) -> None:
        super().send(value, key, headers, topic, partition)
        pending = list(self._pending)
        self._pending.clear()  # in place: the runtime's handler holds this list
        for target, value_, key_, headers_, partition_ in pending:
            self._producer.send(target, value_, key=key_, headers=headers_, partition=partition_)
            self.sent += 1


def _outputs_of(protocol: CommitProtocol, kind: type[Output]) -> None:
    """The protocol's handlers get outputs of ``kind`` (one per producer and topic)."""
    outputs: dict[tuple[int, str], Output] = {}
    rt = protocol.rt

    def output(spec: HandlerSpec, producer: Producer) -> Output:
        key = (id(producer), spec.topic)
        if key not in outputs:
            transaction = lambda: rt.transaction  # noqa: E731
            outputs[key] = kind(
                producer, spec.output, spec.key_codec, spec.value_codec, transaction
            )
        return outputs[key]

    rt._output = output  # type: ignore[method-assign]


class KeepsFailedAttempts(ExactlyOnce):
    def start(self) -> None:
        super().start()
        _outputs_of(self, _SendsAtOnce)  # the bug: Output of v1


class _AnyoneSends(Output):
    """An Output that takes a send from any code as the running attempt's own."""

    _refuses_strays = False  # the bug


class SendsFromStrays(ExactlyOnce):
    def start(self) -> None:
        super().start()
        _outputs_of(self, _AnyoneSends)


class _HighestCompleted(Window):
    """Each partition's position is taken past its highest handled record, not its contiguous
    handled prefix: records below it still running are passed over."""

    highest: dict[TopicPartition, int]

    def prefix(self) -> tuple[dict[TopicPartition, int], int]:
        highest = self.__dict__.setdefault("highest", {})
        moved: dict[TopicPartition, int] = {}
        n = 0
        for tp, q in self.entries.items():
            done = [e for e in q if e.done]
            for entry in done:
                q.remove(entry)
                self._release(entry)
            n += len(done)
            top = max((e.record.offset + 1 for e in done), default=0)
            if top > highest.get(tp, 0):
                moved[tp] = highest[tp] = top  # the bug: past whatever still runs below
        self.count -= n
        self._front.clear()  # records left the middle of partitions: counted again
        return moved, n


class CommitsHighestCompleted(ExactlyOnce):
    """Exactly-once with records side by side, but each transaction commits the positions past
    the highest handled record of each partition instead of its contiguous handled prefix: a
    slower record below it is still running, and is lost if the process dies before it ends."""

    def start(self) -> None:
        super().start()
        self.rt.window_class = _HighestCompleted  # the bug


class _RemembersUnfinished(Window):
    """Names every record above a partition's first unhandled one, handled or not."""

    def handled_above(self) -> dict[TopicPartition, tuple[int, list[int]]]:
        return {
            tp: (q[0].record.offset, [e.record.offset for e in q])  # the bug: not only e.done
            for tp, q in self.entries.items()
            if len(q) > 1 and not q[0].done
        }


class RemembersUnfinished(AtLeastOnce):
    """At-least-once with records side by side, but the commit's metadata names the records
    still running above the position as handled: a crash has the next owner skip them."""

    def start(self) -> None:
        super().start()
        self.rt.window_class = _RemembersUnfinished  # the bug


class _Unmarked(SharedTransaction):
    marked = False  # the bug: what committed above the prefix is not remembered


class CommitsWithoutMarks(ExactlyOnceSink):
    """Exactly-once into a database with records side by side, but the records committed
    above a partition's contiguous prefix are not marked done: a restart starts at the prefix
    and makes their effects again."""

    def start(self) -> None:
        super().start()
        self.rt.shared_class = _Unmarked  # the bug


PLANTS: dict[str, Callable[[Runtime], CommitProtocol]] = {
    "commit-before-handle": CommitsBeforeHandling,
    "offsets-outside-transaction": OffsetsOutsideTransaction,
    "commit-poisoned-transaction": CommitsPoisonedTransaction,
    "commit-past-failed-write": CommitsPastFailedWrites,
    "dead-letters-outside-database": DeadLettersOutsideTheDatabase,
    "keep-failed-attempts": KeepsFailedAttempts,
    "commit-highest-completed": CommitsHighestCompleted,
    "side-by-side-without-marks": CommitsWithoutMarks,
    "remember-unfinished": RemembersUnfinished,
    "stray-sends-kept": SendsFromStrays,
}


def planted(name: str) -> Callable[[Runtime], CommitProtocol]:
    try:
        return PLANTS[name]
    except KeyError:
        raise ValueError(f"unknown planted bug {name!r}; known: {sorted(PLANTS)}") from None
