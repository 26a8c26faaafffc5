"""What every commit protocol shares: the consumer, the handlers, and where outputs go."""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from assured.log import Consumer, Log, Producer, Record, TopicPartition
from assured.runtime._handling import HandlerSpec, Output, handle_record
from assured.runtime._settings import AppSettings
from assured.runtime.metrics import RuntimeMetrics
from assured.sinks import Sink, SinkTransaction

__all__ = ["CommitProtocol", "Runtime", "next_offsets"]

log = logging.getLogger("assured.runtime")


def next_offsets(records: Sequence[Record]) -> dict[TopicPartition, int]:
    """The offset to commit per partition after ``records``: the last one's offset + 1."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        if r.offset + 1 > out.get(tp, -1):
            out[tp] = r.offset + 1
    return out


def first_offsets(records: Sequence[Record]) -> dict[TopicPartition, int]:
    out: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        if tp not in out:
            out[tp] = r.offset
    return out


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
    _outputs: dict[tuple[int, str], Output] = field(default_factory=dict)

    def handle(self, record: Record, producer: Producer, tx: SinkTransaction | None = None) -> None:
        """``record`` through its handler; outputs (and dead letters) via ``producer``, effects
        into ``tx`` when the handler has a sink."""
        spec = self.specs[record.topic]
        target: Output | SinkTransaction | None
        if spec.sink is not None:
            target = tx
        elif spec.output is not None:
            target = self._output(spec, producer)
        else:
            target = None
        handle_record(spec, record, target, producer, self.metrics, self.settings.guarantee)

    def _output(self, spec: HandlerSpec, producer: Producer) -> Output:
        key = (id(producer), spec.topic)
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

    def start(self) -> None:
        """Make producers, claim resources; called once before the first poll."""

    @abc.abstractmethod
    def process(self, records: list[Record]) -> None:
        """Handle one polled batch, committing as the guarantee requires."""

    def tick(self) -> None:
        """Called after every poll, records or not: time-based commits happen here."""

    def on_assign(self, partitions: list[TopicPartition]) -> Mapping[TopicPartition, int] | None:
        return None

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """The partitions leave; our generation is still current, so commits still count."""

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """The partitions are already gone; committing for them would be refused."""

    @abc.abstractmethod
    def close(self) -> None:
        """Commit (or abort) what is open and release producers."""
