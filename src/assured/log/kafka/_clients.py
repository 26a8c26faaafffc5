"""Producer and consumer over confluent-kafka, speaking the log protocol."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer as KConsumer
from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka import Producer as KProducer
from confluent_kafka import TopicPartition as KTopicPartition

from assured.errors import UsageError
from assured.log._models import (
    DeliveryReport,
    GroupMetadata,
    Header,
    OffsetReset,
    Record,
    TopicPartition,
)
from assured.log._protocol import (
    Admin,
    AssignCallback,
    Consumer,
    OnDelivery,
    PartitionsCallback,
    Producer,
)
from assured.log.kafka._errors import Scrubber, call, translate, translated

__all__ = ["KafkaConsumer", "KafkaProducer"]

_new_record = functools.partial(tuple.__new__, Record)

_NO_OFFSET = -1001  # librdkafka's OFFSET_INVALID: nothing consumed, stored or committed


class KafkaProducer(Producer):
    def __init__(self, config: dict[str, Any], scrub: Scrubber, transactional_id: str | None):
        self._scrub = scrub
        self._transactional = transactional_id is not None
        with translated(scrub, "creating the Kafka producer"):
            self._p = KProducer(config)
        self._closed = False

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
        if self._closed:
            raise UsageError("this producer is closed")
        if not headers and partition is None and timestamp_ms is None and on_delivery is None:
            try:  # the common case, without building keyword arguments
                self._p.produce(topic, value, key)
                return
            except BufferError:
                self._p.poll(0.1)  # the local queue is full: let deliveries drain it
            except KafkaException as e:
                raise translate(e, self._scrub, f"sending to {topic!r}") from None
        kwargs: dict[str, Any] = {"value": value, "key": key}
        if headers:
            kwargs["headers"] = list(headers)
        if partition is not None:
            kwargs["partition"] = partition
        if timestamp_ms is not None:
            kwargs["timestamp"] = timestamp_ms
        if on_delivery is not None:
            kwargs["on_delivery"] = self._reporter(on_delivery)
        while True:
            try:
                self._p.produce(topic, **kwargs)
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self._p.poll(0.1)
            except KafkaException as e:
                raise translate(e, self._scrub, f"sending to {topic!r}") from None

    def _reporter(self, on_delivery: OnDelivery) -> Callable[[KafkaError | None, Message], None]:
        scrub = self._scrub

        def report(err: KafkaError | None, msg: Message) -> None:
            ts = msg.timestamp()[1]
            if err is None:
                offset = msg.offset()
                on_delivery(
                    DeliveryReport(msg.topic() or "", msg.partition() or 0, offset or 0, ts)
                )
            else:
                error = translate(err, scrub, f"delivering to {msg.topic()!r}")
                on_delivery(DeliveryReport(msg.topic() or "", msg.partition() or -1, -1, ts, error))

        return report

    def poll(self, timeout: float = 0.0) -> int:
        return int(self._p.poll(timeout))

    def flush(self, timeout: float | None = None) -> int:
        return int(self._p.flush(-1 if timeout is None else timeout))

    def init_transactions(self, timeout: float = 30.0) -> None:
        self._need_transactional()
        call(lambda: self._p.init_transactions(timeout), self._scrub, "init_transactions", timeout)

    def begin_transaction(self) -> None:
        self._need_transactional()
        call(self._p.begin_transaction, self._scrub, "begin_transaction")

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group: GroupMetadata, timeout: float = 30.0
    ) -> None:
        self._need_transactional()
        if group.native is None:
            raise UsageError("group metadata must come from a Kafka consumer's group_metadata()")
        ktps = [KTopicPartition(tp.topic, tp.partition, off) for tp, off in offsets.items()]
        call(
            lambda: self._p.send_offsets_to_transaction(ktps, group.native, timeout),
            self._scrub,
            "send_offsets_to_transaction",
            timeout,
        )

    def commit_transaction(self, timeout: float = 30.0) -> None:
        self._need_transactional()
        call(
            lambda: self._p.commit_transaction(timeout), self._scrub, "commit_transaction", timeout
        )

    def abort_transaction(self, timeout: float = 30.0) -> None:
        self._need_transactional()
        call(lambda: self._p.abort_transaction(timeout), self._scrub, "abort_transaction", timeout)

    def _need_transactional(self) -> None:
        if self._closed:
            raise UsageError("this producer is closed")
        if not self._transactional:
            raise UsageError("transactions need a producer made with transactional_id=...")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._p.flush(30)


def _headers(
    raw: Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]],
) -> tuple[Header, ...]:
    pairs = raw.items() if isinstance(raw, Mapping) else raw
    return tuple((k, v.encode() if isinstance(v, str) else v) for k, v in pairs)


def _generation(native: object) -> int:
    """The generation inside confluent-kafka's serialized group metadata ("CGMDv2:" then a
    little-endian int32), for display and tests; -1 where the format is not that one. The
    broker checks the generation itself, from ``native``."""
    if isinstance(native, bytes) and native.startswith(b"CGMDv2:") and len(native) >= 11:
        return int.from_bytes(native[7:11], "little", signed=True)
    return -1


class KafkaConsumer(Consumer):
    def __init__(
        self,
        config: dict[str, Any],
        scrub: Scrubber,
        group_id: str | None,
        reset: OffsetReset,
        admin: Callable[[], Admin],
    ):
        self._scrub = scrub
        self._group_id = group_id
        self._reset = reset
        self._make_admin = admin
        self._admin: Admin | None = None
        with translated(scrub, "creating the Kafka consumer"):
            self._c = KConsumer(config)
        self._assigned: list[TopicPartition] = []
        self._cooperative = "cooperative" in str(config.get("partition.assignment.strategy"))
        self._subscribed = False
        self._closed = False

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
        admin = self._get_admin()
        for t in topics:
            admin.describe_topic(t)  # an unknown topic is an error now, not a silent wait

        def assigned(consumer: KConsumer, ktps: list[KTopicPartition]) -> None:
            tps = [TopicPartition(k.topic, k.partition) for k in ktps]
            self._assigned = sorted(set(self._assigned) | set(tps))
            starts = on_assign(tps) if on_assign is not None else None
            if starts:
                # Start where the caller says (librdkafka takes offsets with the assignment).
                chosen = [
                    KTopicPartition(k.topic, k.partition, starts.get(tp, _NO_OFFSET))
                    for k, tp in zip(ktps, tps, strict=True)
                ]
                if self._cooperative:
                    consumer.incremental_assign(chosen)
                else:
                    consumer.assign(chosen)

        def revoked(_: KConsumer, ktps: list[KTopicPartition]) -> None:
            tps = [TopicPartition(k.topic, k.partition) for k in ktps]
            if on_revoke is not None:
                on_revoke(tps)
            self._assigned = [tp for tp in self._assigned if tp not in set(tps)]

        def lost(_: KConsumer, ktps: list[KTopicPartition]) -> None:
            tps = [TopicPartition(k.topic, k.partition) for k in ktps]
            if on_lost is not None:
                on_lost(tps)
            self._assigned = [tp for tp in self._assigned if tp not in set(tps)]

        with translated(self._scrub, "subscribing"):
            self._c.subscribe(list(topics), on_assign=assigned, on_revoke=revoked, on_lost=lost)
        self._subscribed = True

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self._check_open()
        if self._subscribed:
            raise UsageError("this consumer is subscribed to a group; it cannot also assign()")
        admin = self._get_admin()
        for tp in partitions:
            count = admin.describe_topic(tp.topic).partitions
            if not 0 <= tp.partition < count:
                from assured.errors import UnknownTopicError

                raise UnknownTopicError(
                    f"topic {tp.topic!r} has partitions 0..{count - 1}; "
                    f"there is no partition {tp.partition}"
                )
        with translated(self._scrub, "assigning partitions"):
            self._c.assign([KTopicPartition(tp.topic, tp.partition) for tp in partitions])
        self._assigned = list(partitions)

    def assignment(self) -> list[TopicPartition]:
        return list(self._assigned)

    def _get_admin(self) -> Admin:
        if self._admin is None:
            self._admin = self._make_admin()
        return self._admin

    # -- positions -----------------------------------------------------------------------------

    def position(self, tp: TopicPartition) -> int:
        self._check_open()
        if tp not in self._assigned:
            raise UsageError(f"{tp} is not assigned to this consumer")
        ktp = KTopicPartition(tp.topic, tp.partition)
        with translated(self._scrub, f"reading the position of {tp}"):
            (now,) = self._c.position([ktp])
        if now.offset >= 0:
            return int(now.offset)
        committed = self.committed([tp])[tp]
        if committed is not None:
            return committed
        w = self._get_admin().watermarks(tp)
        if self._reset == "earliest":
            return w.low
        if self._reset == "latest":
            return w.high
        from assured.errors import LogError

        raise LogError(f"no valid offset for {tp} and auto_offset_reset='error'; seek() first")

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._check_open()
        if tp not in self._assigned:
            raise UsageError(f"{tp} is not assigned to this consumer; seek() needs it assigned")
        ktp = KTopicPartition(tp.topic, tp.partition, offset)
        try:
            self._c.seek(ktp)
        except KafkaException as e:
            if e.args[0].code() != KafkaError._STATE:
                raise translate(e, self._scrub, f"seeking {tp} to {offset}") from None
            # Not fetching yet: librdkafka refuses a seek, but takes a start offset on assign.
            with translated(self._scrub, f"seeking {tp} to {offset}"):
                self._c.incremental_unassign([KTopicPartition(tp.topic, tp.partition)])
                self._c.incremental_assign([ktp])

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        with translated(self._scrub, "pausing"):
            self._c.pause([KTopicPartition(tp.topic, tp.partition) for tp in partitions])

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        with translated(self._scrub, "resuming"):
            self._c.resume([KTopicPartition(tp.topic, tp.partition) for tp in partitions])

    # -- fetching ------------------------------------------------------------------------------

    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        self._check_open()
        with translated(self._scrub, "polling"):
            # librdkafka's consume(n) waits for all n; wait for the first, then take the rest
            # of what is already fetched.
            msgs = self._c.consume(max_records, 0)
            if not msgs and timeout > 0:
                msgs = self._c.consume(1, timeout)
                if msgs and max_records > 1:
                    msgs += self._c.consume(max_records - 1, 0)
        out: list[Record] = []
        append = out.append
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise translate(err, self._scrub, "consuming")
            headers = m.headers()
            # tuple.__new__ straight from the message's fields: no Python-level __new__.
            append(
                _new_record(
                    (
                        m.topic(),
                        m.partition(),
                        m.offset(),
                        m.timestamp()[1],
                        m.key(),
                        m.value(),
                        _headers(headers) if headers else (),
                    )
                )
            )
        return out

    # -- commits -------------------------------------------------------------------------------

    def commit(
        self, offsets: Mapping[TopicPartition, int] | None = None, asynchronous: bool = False
    ) -> None:
        self._check_open()
        if self._group_id is None:
            raise UsageError("commit() needs a consumer made with group_id=...")
        if offsets is None:
            with translated(self._scrub, "reading positions"):
                now = self._c.position([KTopicPartition(t, p) for t, p in self._assigned])
            ktps = [k for k in now if k.offset >= 0]
        else:
            ktps = [KTopicPartition(tp.topic, tp.partition, off) for tp, off in offsets.items()]
        if not ktps:
            return
        if asynchronous:
            with translated(self._scrub, "committing offsets"):
                self._c.commit(offsets=ktps, asynchronous=True)
            return
        # A coordinator moving or loading is retriable; a stale generation is not.
        call(
            lambda: self._c.commit(offsets=ktps, asynchronous=False),
            self._scrub,
            "committing offsets",
            30,
        )

    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        self._check_open()
        if self._group_id is None:
            return dict.fromkeys(partitions)
        ktps = [KTopicPartition(tp.topic, tp.partition) for tp in partitions]
        found = call(
            lambda: self._c.committed(ktps, timeout=10), self._scrub, "reading committed", 30
        )
        return {
            TopicPartition(k.topic, k.partition): (k.offset if k.offset >= 0 else None)
            for k in found
        }

    def group_metadata(self) -> GroupMetadata:
        if self._group_id is None:
            raise UsageError("group_metadata() needs a consumer made with group_id=...")
        with translated(self._scrub, "reading group metadata"):
            native = self._c.consumer_group_metadata()
            member = self._c.memberid() or ""
        return GroupMetadata(self._group_id, _generation(native), member, native)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this consumer is closed")

    def close(self) -> None:
        if self._closed:
            return
        try:
            with translated(self._scrub, "closing the consumer"):
                self._c.close()  # runs on_revoke first, which may still commit
        finally:
            self._closed = True
