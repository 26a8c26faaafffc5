"""The embedded engine against a small in-memory model of Kafka's semantics.

A Hypothesis state machine drives one engine file through the public API only (``open_log``,
admin, producers, consumers) and keeps, beside it, what Kafka says must be in the log:

- every partition as a list of entries, one per offset: plain records, transactional records
  (tagged with their transaction) and transaction markers, which take an offset but are never
  returned, so the offsets a consumer sees have gaps;
- every transaction: open, committed or aborted, the first offset it wrote in each partition
  (the LSO stops at the earliest open one), and the consumer offsets sent to it;
- every group's committed offsets, changed by consumer commits and committed transactions only.

Producers linger for an hour and batches never fill up, so a record lands exactly when the test
calls ``flush`` or ``commit_transaction``; that makes every offset predictable, and delivery
reports are checked against the model. The engine stores at most 3 records to a batch here (1000
in use), so reads, seeks and polls start and stop inside batches all the time.

A fenced producer (another instance ran ``init_transactions`` with its transactional id) must
raise ``ProducerFencedError`` from every call that reaches the log, and from every call once it
has been told; calls that are local in Kafka's clients (``send``, ``begin_transaction``) may
succeed until then, and ``flush`` reports the error through delivery reports, as in Kafka.

Two places accept either Kafka's answer or the engine's stricter one (both keep exactly-once):
Kafka validates a transaction's consumer offsets when they are sent (KIP-447) and commits them
even if the group rebalances before the commit, while the engine checks the generation again at
commit and refuses with ``StaleGenerationError``; and a member that takes over a partition with
transactional offsets still pending would wait for them in Kafka (``require_stable``), while the
engine starts from the offsets last committed.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TypeVar

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from assured.errors import AbortableError, ProducerFencedError, StaleGenerationError
from assured.log import (
    Admin,
    Consumer,
    DeliveryReport,
    GroupMetadata,
    Header,
    Isolation,
    Producer,
    Record,
    TopicPartition,
    open_log,
    partition_for_key,
)
from assured.log.embedded import _batches

TOPICS = {"alpha": 3, "beta": 2}
ALL_TPS = tuple(TopicPartition(t, p) for t, n in TOPICS.items() for p in range(n))
MANUAL_GROUP = "manual"  # committed to by consumers outside group management
MEMBER_GROUP = "members"  # the group whose members subscribe and rebalance
TIDS = ("tx-0", "tx-1")
KEYS = tuple(f"key-{i}".encode() for i in range(8))
HEADERS: tuple[tuple[Header, ...], ...] = ((), (("h", b"x"),), (("h", None), ("n", b"1")))
LINGER_MS = 3_600_000.0  # nothing is written before flush() or commit_transaction()
BATCH = 1_000_000  # and no batch ever fills up
MAX_ZOMBIES = 3
MAX_STALE = 4
MAX_MEMBERS = 2

_Client = TypeVar("_Client", bound=Admin | Producer | Consumer)
Row = tuple[int, bytes | None, bytes | None, tuple[Header, ...]]  # offset, key, value, headers


@dataclass(frozen=True)
class Entry:
    """What one offset of a partition holds."""

    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]
    txn: int | None  # the model's transaction, None for a plain record
    marker: bool = False


@dataclass
class Txn:
    status: str = "open"  # open | committed | aborted
    first: dict[TopicPartition, int] = field(default_factory=dict)
    offsets: dict[str, dict[TopicPartition, tuple[int, GroupMetadata]]] = field(
        default_factory=dict
    )


@dataclass
class Sent:
    """One record sent and not yet landed; its delivery reports arrive in ``reports``."""

    topic: str
    partition: int | None  # as passed to send()
    key: bytes | None
    value: bytes
    headers: tuple[Header, ...]
    lands_on: int | None  # the partition it must land on; None: the producer's choice
    reports: list[DeliveryReport] = field(default_factory=list)


@dataclass
class TxnClient:
    """One transactional producer instance."""

    producer: Producer
    tid: str
    fenced: bool = False  # a newer instance with the same transactional id has started
    knows: bool = False  # ...and this one has been told so (an error or an error report)
    in_txn: bool = False
    txn: int | None = None  # the model's transaction, once this one reached the log
    pending: list[Sent] = field(default_factory=list)


@dataclass
class Member:
    consumer: Consumer
    positions: dict[TopicPartition, int] = field(default_factory=dict)  # absent: not yet known


def routes(topic: str) -> st.SearchStrategy[tuple[bytes | None, int | None]]:
    """(key, partition) for send(): keyed, to an explicit partition, or the producer's choice."""
    keys = st.sampled_from(KEYS)
    return st.one_of(
        st.tuples(keys, st.none()),
        st.tuples(st.none() | keys, st.integers(0, TOPICS[topic] - 1)),
        st.tuples(st.none(), st.none()),
    )


# Strategies are built once: building them anew in every step costs more than the step.
BOOLEANS = st.booleans()
ROUTES = {topic: routes(topic) for topic in TOPICS}
A_TOPIC = st.sampled_from(sorted(TOPICS))
A_HEADER = st.sampled_from(HEADERS)
A_TID = st.sampled_from(TIDS)
A_TP = st.sampled_from(ALL_TPS)
SOME_TPS = st.lists(A_TP, min_size=1, max_size=3, unique=True)
OPS_IN_TXN = st.sampled_from(("send", "flush", "commit", "abort", "send_offsets"))
OPS_OUTSIDE = st.just("begin")


@functools.cache
def ints(low: int, high: int) -> st.SearchStrategy[int]:
    return st.integers(low, high)


def row(r: Record) -> Row:
    return (r.offset, r.key, r.value, r.headers)


class EmbeddedLogModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.batch_limit, _batches.MAX_BATCH_RECORDS = _batches.MAX_BATCH_RECORDS, 3
        self.dir = tempfile.mkdtemp(prefix="assured-model-")
        self.clients: list[Admin | Producer | Consumer] = []
        # The model.
        self.entries: dict[TopicPartition, list[Entry]] = {tp: [] for tp in ALL_TPS}
        self.txns: list[Txn] = []
        self.committed: dict[str, dict[TopicPartition, int]] = {MANUAL_GROUP: {}, MEMBER_GROUP: {}}
        self.sent_count = 0
        self.group_generation = -1
        self.member_ids: set[str] = set()
        self.stale: list[GroupMetadata] = []  # metadata of generations the group has left
        # The engine. Clients are made on first use, so that short examples stay cheap.
        self.log = open_log(f"embedded://{self.dir}/log.db")
        self.admin = self._keep(self.log.admin())
        for name, partitions in TOPICS.items():
            self.admin.create_topic(name, partitions=partitions)
        self._plain: dict[int, Producer] = {}
        self.plain_pending: dict[int, list[Sent]] = {0: [], 1: []}
        self.live: dict[str, TxnClient] = {}
        self.zombies: list[TxnClient] = []
        self._readers: dict[bool, Consumer] = {}
        self._committer: Consumer | None = None
        self._outsider: Consumer | None = None
        self.members: list[Member] = []

    def teardown(self) -> None:
        try:
            for client in reversed(self.clients):
                client.close()
            self.log.close()
        finally:
            _batches.MAX_BATCH_RECORDS = self.batch_limit
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- clients -------------------------------------------------------------------------------

    def _keep(self, client: _Client) -> _Client:
        self.clients.append(client)
        return client

    def plain(self, i: int) -> Producer:
        """Producer 0 is idempotent (the default), producer 1 not."""
        if i not in self._plain:
            self._plain[i] = self._keep(
                self.log.producer(idempotent=i == 0, linger_ms=LINGER_MS, batch_size=BATCH)
            )
        return self._plain[i]

    def reader(self, committed_only: bool) -> Consumer:
        if committed_only not in self._readers:
            isolation: Isolation = "read_committed" if committed_only else "read_uncommitted"
            self._readers[committed_only] = self._keep(self.log.consumer(isolation=isolation))
        return self._readers[committed_only]

    @property
    def committer(self) -> Consumer:
        """Outside group management; commits for MANUAL_GROUP, which never has members."""
        if self._committer is None:
            self._committer = self._keep(self.log.consumer(group_id=MANUAL_GROUP))
        return self._committer

    @property
    def outsider(self) -> Consumer:
        """Outside group management, with MEMBER_GROUP's id."""
        if self._outsider is None:
            self._outsider = self._keep(self.log.consumer(group_id=MEMBER_GROUP))
        return self._outsider

    def new_instance(self, tid: str) -> TxnClient:
        producer = self._keep(
            self.log.producer(transactional_id=tid, linger_ms=LINGER_MS, batch_size=BATCH)
        )
        producer.init_transactions()
        return TxnClient(producer, tid)

    def client(self, tid: str) -> TxnClient:
        if tid not in self.live:
            self.live[tid] = self.new_instance(tid)
        return self.live[tid]

    def join_member(self) -> None:
        consumer = self._keep(
            self.log.consumer(
                group_id=MEMBER_GROUP, session_timeout_ms=60_000, heartbeat_interval_ms=1_000
            )
        )
        consumer.subscribe(sorted(TOPICS))
        self.members.append(Member(consumer))

    # -- the model -----------------------------------------------------------------------------

    def high(self, tp: TopicPartition) -> int:
        return len(self.entries[tp])

    def lso(self, tp: TopicPartition) -> int:
        firsts = [t.first[tp] for t in self.txns if t.status == "open" and tp in t.first]
        return min(firsts, default=self.high(tp))

    def visible(self, tp: TopicPartition, start: int, stop: int, committed_only: bool) -> list[Row]:
        out = []
        for offset in range(start, stop):
            e = self.entries[tp][offset]
            if e.marker:
                continue
            if committed_only and e.txn is not None and self.txns[e.txn].status != "committed":
                continue
            out.append((offset, e.key, e.value, e.headers))
        return out

    def pending_offsets(self, group: str, besides: int | None = None) -> set[TopicPartition]:
        """Partitions of ``group`` with offsets waiting in an open transaction (other than
        ``besides``). Kafka orders a consumer commit against those by when the transactional
        offsets were *sent*, not committed; the model keeps out of that corner."""
        return {
            tp
            for i, t in enumerate(self.txns)
            if t.status == "open" and i != besides
            for tp in t.offsets.get(group, {})
        }

    def is_stale(self, md: GroupMetadata) -> bool:
        return md.group_id == MEMBER_GROUP and (
            md.generation != self.group_generation or md.member_id not in self.member_ids
        )

    def open_txn(self) -> int:
        self.txns.append(Txn())
        return len(self.txns) - 1

    def end_txn(self, txn: int, status: str) -> None:
        """Commit or abort: one marker in every partition the transaction wrote to."""
        t = self.txns[txn]
        assert t.status == "open"
        for tp in t.first:
            self.entries[tp].append(Entry(None, None, (), txn, marker=True))
        t.status = status
        if status == "committed":
            for group, offsets in t.offsets.items():
                self.committed[group].update({tp: off for tp, (off, _) in offsets.items()})

    def land(self, sent: list[Sent], txn: int | None) -> None:
        """Records just written (in send order): check their reports, append them."""
        for s in sent:
            assert len(s.reports) == 1, f"{s}: expected one delivery report"
            report = s.reports[0]
            assert report.error is None, f"{s}: {report.error!r}"
            assert report.topic == s.topic
            if s.lands_on is not None:
                assert report.partition == s.lands_on, f"{s} landed on {report.partition}"
            tp = TopicPartition(s.topic, report.partition)
            entries = self.entries[tp]
            assert report.offset == len(entries), f"{s} at {report.offset}, not {len(entries)}"
            entries.append(Entry(s.key, s.value, s.headers, txn))
            if txn is not None:
                self.txns[txn].first.setdefault(tp, report.offset)

    def draw_send(self, data: st.DataObject) -> Sent:
        topic = data.draw(A_TOPIC, label="topic")
        key, partition = data.draw(ROUTES[topic], label="key, partition")
        headers = data.draw(A_HEADER, label="headers")
        self.sent_count += 1
        if partition is not None:
            lands_on: int | None = partition
        elif key is not None:
            lands_on = partition_for_key(key, TOPICS[topic])
        else:
            lands_on = None
        return Sent(topic, partition, key, b"v%d" % self.sent_count, headers, lands_on)

    @staticmethod
    def send(producer: Producer, s: Sent) -> None:
        producer.send(
            s.topic,
            s.value,
            key=s.key,
            headers=s.headers,
            partition=s.partition,
            on_delivery=s.reports.append,
        )

    def draw_offsets(
        self, data: st.DataObject, allowed: Collection[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """Offsets (up to one past the high watermark) for some of ``allowed``. Every draw is
        made whatever ``allowed`` is, so the draws never depend on what the engine chose (such
        as which member got which partition)."""
        chosen = data.draw(SOME_TPS, label="partitions")
        offsets = {tp: data.draw(ints(0, self.high(tp) + 1), label=f"offset {tp}") for tp in chosen}
        return {tp: off for tp, off in offsets.items() if tp in allowed}

    # -- plain producers -----------------------------------------------------------------------

    @rule(data=st.data())
    def plain_produce(self, data: st.DataObject) -> None:
        """An idempotent (or plain) producer sends a few records, and maybe flushes: only then
        do they land, in send order, at the offsets their delivery reports give."""
        i = data.draw(ints(0, 1), label="plain producer")
        for _ in range(data.draw(ints(1, 3), label="records")):
            s = self.draw_send(data)
            self.send(self.plain(i), s)
            self.plain_pending[i].append(s)
        if data.draw(BOOLEANS, label="flush"):
            assert self.plain(i).flush() == 0
            sent, self.plain_pending[i] = self.plain_pending[i], []
            self.land(sent, None)

    # -- transactions --------------------------------------------------------------------------

    def live_clients(self, in_txn: bool) -> list[TxnClient]:
        return [c for c in self.live.values() if c.in_txn == in_txn]

    def land_txn(self, c: TxnClient) -> None:
        if not c.pending:
            return
        if c.txn is None:
            c.txn = self.open_txn()
        sent, c.pending = c.pending, []
        self.land(sent, c.txn)

    def finish(self, c: TxnClient, status: str) -> None:
        if status == "aborted":
            for s in c.pending:  # never written: each fails
                assert len(s.reports) == 1, f"{s}: expected one delivery report"
                assert s.reports[0].error is not None, f"{s} reported delivered, then aborted"
            c.pending = []
        assert not c.pending
        if c.txn is not None:
            self.end_txn(c.txn, status)
        c.in_txn, c.txn = False, None

    def draw_txn(self, data: st.DataObject) -> TxnClient:
        """A live transactional producer, its transaction begun if none was open."""
        c = self.client(data.draw(A_TID, label="transactional id"))
        if not c.in_txn:
            assert c.txn is None
            assert not c.pending
            c.producer.begin_transaction()
            c.in_txn = True
        return c

    @rule(data=st.data())
    def txn_send(self, data: st.DataObject) -> None:
        """Records sent in a transaction, maybe flushed: flushed ones land (and hold the LSO
        back) but stay invisible to read_committed until the transaction commits."""
        c = self.draw_txn(data)
        for _ in range(data.draw(ints(1, 3), label="records")):
            s = self.draw_send(data)
            self.send(c.producer, s)
            c.pending.append(s)
        if data.draw(BOOLEANS, label="flush"):
            assert c.producer.flush() == 0
            self.land_txn(c)

    @precondition(lambda self: any(c.in_txn for c in self.live.values()))
    @rule(data=st.data())
    def txn_end(self, data: st.DataObject) -> None:
        """Commit (flushing first) or abort: a marker in every partition written to; offsets
        sent to the transaction become committed with it, or never."""
        in_txn = self.live_clients(True)
        c = in_txn[data.draw(ints(0, len(in_txn) - 1), label="transactional")]
        if data.draw(BOOLEANS, label="commit"):
            self.commit(c)
        else:
            c.producer.abort_transaction()
            self.finish(c, "aborted")

    def commit(self, c: TxnClient) -> None:
        t = self.txns[c.txn] if c.txn is not None else None
        stale = t is not None and any(
            self.is_stale(md) for offsets in t.offsets.values() for _, md in offsets.values()
        )
        try:
            c.producer.commit_transaction()
        except StaleGenerationError:
            # The engine re-checks the group generation at commit; Kafka would commit. Either
            # way, the records were flushed first and nothing of it may become visible.
            assert stale, "commit refused as stale, but every offset's generation is current"
            c.producer.abort_transaction()
            self.land_txn(c)
            self.finish(c, "aborted")
            return
        self.land_txn(c)
        self.finish(c, "committed")

    @rule(data=st.data())
    def txn_send_offsets(self, data: st.DataObject) -> None:
        """Consumer offsets (of a consumer outside group management, or of a current member)
        made part of a transaction."""
        c = self.draw_txn(data)
        who = data.draw(ints(-1, len(self.members) - 1), label="member (-1: committer)")
        md = (self.committer if who < 0 else self.members[who].consumer).group_metadata()
        busy = self.pending_offsets(md.group_id, c.txn)
        offsets = self.draw_offsets(data, [tp for tp in ALL_TPS if tp not in busy])
        if not offsets:
            return
        c.producer.send_offsets_to_transaction(offsets, md)
        if c.txn is None:
            c.txn = self.open_txn()
        group = self.txns[c.txn].offsets.setdefault(md.group_id, {})
        group.update({tp: (off, md) for tp, off in offsets.items()})

    @precondition(lambda self: bool(self.stale))
    @rule(data=st.data())
    def txn_send_stale_offsets(self, data: st.DataObject) -> None:
        """Offsets from a generation the group has left (KIP-447 fencing): refused, and the
        transaction can only abort."""
        c = self.draw_txn(data)
        md = self.stale[data.draw(ints(0, len(self.stale) - 1), label="stale metadata")]
        assert c.producer.flush() == 0
        self.land_txn(c)
        tp = data.draw(A_TP, label="partition")
        with pytest.raises(StaleGenerationError):
            c.producer.send_offsets_to_transaction({tp: 0}, md)
        with pytest.raises(AbortableError):
            c.producer.commit_transaction()
        c.producer.abort_transaction()
        self.finish(c, "aborted")

    # -- fencing -------------------------------------------------------------------------------

    @rule(data=st.data())
    def fence(self, data: st.DataObject) -> None:
        """A new instance with the same transactional id: the old one is fenced, and its open
        transaction aborted (its unflushed records are never written). The old one may try to
        go on at once, with whatever it had open."""
        tid = data.draw(A_TID, label="transactional id")
        at_once = data.draw(BOOLEANS, label="zombie acts at once")
        old = self.live.get(tid)
        self.live[tid] = self.new_instance(tid)
        if old is None:
            return
        old.fenced = True
        if old.txn is not None:
            self.end_txn(old.txn, "aborted")
        self.zombies.append(old)
        if len(self.zombies) > MAX_ZOMBIES:
            self.zombies.pop(0).producer.close()
        if at_once:
            self.zombie_acts(old, data)

    @precondition(lambda self: bool(self.zombies))
    @rule(data=st.data())
    def zombie(self, data: st.DataObject) -> None:
        self.zombie_acts(
            self.zombies[data.draw(ints(0, len(self.zombies) - 1), label="zombie")], data
        )

    def zombie_acts(self, z: TxnClient, data: st.DataObject) -> None:
        """Anything a fenced instance does that reaches the log raises ProducerFencedError;
        once told, everything does. Purely local calls (send, begin_transaction) and flush
        (which reports errors through delivery reports, as in Kafka) need not raise."""
        op = data.draw(OPS_IN_TXN if z.in_txn else OPS_OUTSIDE, label="op")
        must_raise = {
            "begin": z.knows,
            "send": z.knows,
            "flush": False,
            "commit": z.knows or bool(z.pending) or z.txn is not None,
            "abort": z.knows or z.txn is not None,
            "send_offsets": True,
        }[op]
        s = self.draw_send(data) if op == "send" else None
        try:
            if op == "begin":
                z.producer.begin_transaction()
            elif op == "send":
                assert s is not None
                self.send(z.producer, s)
            elif op == "flush":
                assert z.producer.flush() == 0
            elif op == "commit":
                z.producer.commit_transaction()
            elif op == "abort":
                z.producer.abort_transaction()
            else:
                z.producer.send_offsets_to_transaction(
                    {ALL_TPS[0]: 0}, self.committer.group_metadata()
                )
        except ProducerFencedError:
            z.knows = True
            z.pending = []  # never written; their reports carry some error, whichever
            return
        assert not must_raise, f"{op} on a fenced producer returned normally"
        if op == "begin":
            z.in_txn = True
        elif s is not None:
            z.pending.append(s)
        elif op == "flush":
            for sent in z.pending:
                assert len(sent.reports) == 1, f"{sent}: expected one delivery report"
                assert isinstance(sent.reports[0].error, ProducerFencedError), sent.reports
                z.knows = True
            z.pending = []
        elif op in ("commit", "abort"):
            z.in_txn, z.pending = False, []

    # -- reading -------------------------------------------------------------------------------

    @rule(data=st.data())
    def consume(self, data: st.DataObject) -> None:
        """assign() + seek(), poll until nothing comes: read_committed returns exactly the
        committed or plain records below the LSO; read_uncommitted every record below the high
        watermark, aborted and open ones too. Never a marker; always in offset order."""
        tp = data.draw(A_TP, label="partition")
        committed_only = data.draw(BOOLEANS, label="read_committed")
        high = self.high(tp)
        seek: int | None = None
        if data.draw(BOOLEANS, label="seek"):
            seek = data.draw(ints(0, high + 2), label="seek to")
        batch = data.draw(ints(1, 8), label="max_records")
        reader = self.reader(committed_only)
        reader.assign([tp])
        if seek is not None:
            reader.seek(tp, seek)
        start = 0 if seek is None or seek > high else seek  # out of range: reset to earliest
        upper = self.lso(tp) if committed_only else high
        expected = self.visible(tp, start, upper, committed_only)
        got: list[Record] = []
        for _ in range(len(expected) // batch + 3):
            records = reader.poll(max_records=batch, timeout=0)
            assert len(records) <= batch
            if not records:
                break
            got.extend(records)
        assert all(r.tp == tp for r in got)
        assert [row(r) for r in got] == expected
        assert reader.position(tp) == max(start, upper)

    # -- commits -------------------------------------------------------------------------------

    @rule(data=st.data())
    def manual_commit(self, data: st.DataObject) -> None:
        """A consumer outside group management commits for a group with no members."""
        busy = self.pending_offsets(MANUAL_GROUP)
        offsets = self.draw_offsets(data, [tp for tp in ALL_TPS if tp not in busy])
        if not offsets:
            return
        if data.draw(BOOLEANS, label="explicit"):
            self.committer.commit(offsets)
        else:  # commit() takes the positions
            self.committer.assign(list(offsets))
            for tp, off in offsets.items():
                self.committer.seek(tp, off)
            self.committer.commit()
        self.committed[MANUAL_GROUP].update(offsets)
        assert self.committer.committed(list(offsets)) == offsets

    @rule(data=st.data())
    def group_commit(self, data: st.DataObject) -> None:
        """A member commits, explicitly or its positions: accepted, its generation being
        current (the group is stable between steps). A consumer outside the group may commit
        for it only while it has no members."""
        who = data.draw(ints(-1, len(self.members) - 1), label="member (-1: outsider)")
        by_position = data.draw(BOOLEANS, label="positions")
        offsets = self.draw_offsets(data, ALL_TPS)
        busy = self.pending_offsets(MEMBER_GROUP)
        if who < 0:
            offsets = {tp: off for tp, off in offsets.items() if tp not in busy}
            if not offsets:
                return
            if self.members:
                with pytest.raises(StaleGenerationError):
                    self.outsider.commit(offsets)
                return
            self.outsider.commit(offsets)
        else:
            m = self.members[who]
            assignment = m.consumer.assignment()
            if by_position and not busy & set(assignment) and set(assignment) <= set(m.positions):
                m.consumer.commit()
                offsets = {tp: m.positions[tp] for tp in assignment}
            else:
                offsets = {
                    tp: off for tp, off in offsets.items() if tp in assignment and tp not in busy
                }
                if not offsets:
                    return
                m.consumer.commit(offsets)
            assert m.consumer.committed(list(offsets)) == offsets
        self.committed[MEMBER_GROUP].update(offsets)

    # -- the group -----------------------------------------------------------------------------

    def poll_member(self, m: Member) -> None:
        """One poll; what it returns must be, per partition, every read_committed record from
        the member's position (or, just assigned, from the group's committed offset)."""
        before = m.consumer.group_metadata().generation
        records = m.consumer.poll(max_records=100_000, timeout=0)
        if m.consumer.group_metadata().generation != before:  # revoked, or a new assignment
            m.positions = {}
        assignment = m.consumer.assignment()
        by_tp: dict[TopicPartition, list[Row]] = {}
        for r in records:
            by_tp.setdefault(r.tp, []).append(row(r))
        assert set(by_tp) <= set(assignment), f"records from unassigned partitions {by_tp}"
        busy = self.pending_offsets(MEMBER_GROUP)
        for tp in assignment:
            got = by_tp.get(tp, [])
            start = m.positions.get(tp)
            may_wait = False
            if start is None:
                committed = self.committed[MEMBER_GROUP].get(tp)
                start = committed if committed is not None and committed <= self.high(tp) else 0
                may_wait = tp in busy  # Kafka waits for pending transactional offsets
            lso = self.lso(tp)
            expected = self.visible(tp, start, lso, committed_only=True)
            if got == expected:
                m.positions[tp] = max(start, lso)
                assert m.consumer.position(tp) == m.positions[tp], tp
            else:
                assert may_wait, f"{tp} from {start}: got {got}, expected {expected}"
                assert not got, f"{tp} from {start}: got {got}, expected {expected}"

    def settle(self) -> None:
        """Poll every member until the group is stable and each has taken its assignment:
        assignments are disjoint and cover every partition."""
        if not self.members:
            group = self.admin.describe_group(MEMBER_GROUP)
            assert group.state == "Empty", group
            assert not group.members, group
            self.member_ids = set()
            return
        for _ in range(50):
            for m in self.members:
                self.poll_member(m)
            group = self.admin.describe_group(MEMBER_GROUP)
            if (
                group.state == "Stable"
                and len(group.members) == len(self.members)
                and all(
                    m.consumer.group_metadata().generation == group.generation for m in self.members
                )
            ):
                break
        else:
            raise AssertionError(f"the group never settled: {group}")
        owned = [tp for m in self.members for tp in m.consumer.assignment()]
        assert len(owned) == len(set(owned)), f"assignments overlap: {owned}"
        assert set(owned) == set(ALL_TPS), f"assignments leave partitions out: {owned}"
        described = {d.member_id: set(d.assignment) for d in group.members}
        for m in self.members:
            md = m.consumer.group_metadata()
            assert described[md.member_id] == set(m.consumer.assignment())
        assert group.generation > self.group_generation
        self.group_generation = group.generation
        self.member_ids = set(described)

    @rule()
    def members_poll(self) -> None:
        for m in self.members:
            self.poll_member(m)

    @rule(data=st.data())
    def rebalance(self, data: st.DataObject) -> None:
        """A member joins or leaves (between none and two); all poll until the group is
        stable. The generations it left behind are stale from then on."""
        before = [m.consumer.group_metadata() for m in self.members]
        join = data.draw(BOOLEANS, label="join")
        if not self.members or (join and len(self.members) < MAX_MEMBERS):
            self.join_member()
        else:
            leaver = data.draw(ints(0, len(self.members) - 1), label="leaver")
            self.members.pop(leaver).consumer.close()
        self.settle()
        self.stale = (self.stale + before)[-MAX_STALE:]
        assert all(self.is_stale(md) for md in self.stale)

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def watermarks_follow_the_model(self) -> None:
        for tp in ALL_TPS:
            w = self.admin.watermarks(tp)
            assert w.low <= w.lso <= w.high, f"{tp}: {w}"
            assert (w.low, w.lso, w.high) == (0, self.lso(tp), self.high(tp)), f"{tp}: {w}"

    @invariant()
    def committed_offsets_follow_the_model(self) -> None:
        for group, offsets in self.committed.items():
            assert self.admin.committed_offsets(group) == offsets, group


EmbeddedLogModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEmbeddedLogModel = EmbeddedLogModel.TestCase

# A pass takes well under a minute. A failure is shrunk for up to five minutes (Hypothesis's own
# limit), which the suite's default timeout of 300 s would cut short before the report.
pytestmark = pytest.mark.timeout(600)
