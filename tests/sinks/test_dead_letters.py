"""Dead letters under exactly-once into a database (issue 18, item 3): written in the sink's
transaction, so they commit with the effects and offsets or not at all, and published by the
relay exactly once, even when it is killed at any point or a newer relay takes over."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from assured.errors import UsageError
from assured.log import Log, Record, open_log
from assured.sinks import (
    DeadLetterRelay,
    PostgresSink,
    Sink,
    SqliteSink,
    relay_dead_letters,
)
from assured.sinks._relay import GROUP_HEADER, ID_HEADER, RELAY_POINTS
from tests.sinks.conftest import SinkFactory, read_all

ROOT = Path(__file__).parents[2]


def record(offset: int, topic: str = "charges") -> Record:
    return Record(topic, 0, offset, 0, b"k%d" % offset, b"v%d" % offset, [("trace", b"t1")])


def write_dead_letters(
    sink: Sink, offsets: range, group: str = "g", dlq: str = "charges.dlq"
) -> None:
    with sink.transaction(group=group) as tx:
        for offset in offsets:
            tx.dead_letter(record(offset), topic=dlq, error=ValueError(f"bad {offset}"), attempts=3)


def relayed_ids(log: Log, topic: str, group: str = "g") -> Counter[int]:
    return Counter(
        int(r.header(ID_HEADER) or b"0")
        for r in read_all(log, topic)
        if r.header(GROUP_HEADER) == group.encode()
    )


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Log]:
    opened = open_log(f"embedded://{tmp_path}/log.db")
    yield opened
    opened.close()


def test_a_dead_letter_commits_with_the_transaction_or_not_at_all(
    new_sink: SinkFactory, log: Log
) -> None:
    sink = new_sink()
    sink.setup()

    def crash_before_commit() -> None:
        with sink.transaction(group="g") as tx:
            tx.dead_letter(record(1), topic="charges.dlq", error=ValueError("bad"), attempts=3)
            raise RuntimeError("crash before the database commit")

    with pytest.raises(RuntimeError):
        crash_before_commit()
    assert sink.pending_dead_letters("g") == 0, "it went with the transaction"
    with sink.transaction(group="g") as tx:
        row_id = tx.dead_letter(record(2), topic="charges.dlq", error=KeyError("x"), attempts=4)
        assert tx.dead_letters == [row_id]
    assert sink.pending_dead_letters("g") == 1
    assert relay_dead_letters(sink, log, "g") == 1
    assert sink.pending_dead_letters("g") == 0
    (published,) = read_all(log, "charges.dlq")
    assert published.key == b"k2"
    assert published.value == b"v2"
    headers = dict(published.headers)
    assert headers["trace"] == b"t1"
    assert headers["assured.error.type"] == b"KeyError"
    assert headers["assured.error.message"] == b"KeyError: 'x'"
    assert headers["assured.origin"] == b"charges[0]@2"
    assert headers["assured.attempts"] == b"4"
    assert headers[GROUP_HEADER] == b"g"
    assert headers[ID_HEADER] == str(row_id).encode()
    assert relay_dead_letters(sink, log, "g") == 0


def test_a_dead_letter_may_come_with_its_headers_made(new_sink: SinkFactory, log: Log) -> None:
    sink = new_sink()
    sink.setup()
    made = [("trace", b"t1"), ("assured.error.type", b"Boom"), ("assured.attempts", b"2")]
    with sink.transaction(group="g") as tx:
        tx.dead_letter(record(3), topic="charges.dlq", headers=made)
    with sink.transaction(group="g") as tx:
        row = tx.execute("SELECT error_type, attempts FROM assured_dead_letters").fetchone()
        assert tuple(row) == ("Boom", 2)
    assert relay_dead_letters(sink, log, "g") == 1
    (published,) = read_all(log, "charges.dlq")
    assert list(published.headers) == [*made, (GROUP_HEADER, b"g"), (ID_HEADER, b"1")]


def test_a_dead_letter_needs_the_group(new_sink: SinkFactory) -> None:
    sink = new_sink()
    sink.setup()
    with pytest.raises(UsageError, match="group"), sink.transaction() as tx:
        tx.dead_letter(record(1), topic="charges.dlq", error=ValueError("bad"), attempts=1)


def test_each_group_relays_its_own_dead_letters(new_sink: SinkFactory, log: Log) -> None:
    sink = new_sink()
    sink.setup()
    write_dead_letters(sink, range(3), group="billing")
    write_dead_letters(sink, range(2), group="audit", dlq="audit.dlq")
    assert relay_dead_letters(sink, log, "billing", batch_size=2) == 3
    assert sink.pending_dead_letters("audit") == 2
    assert relay_dead_letters(sink, log, "audit") == 2
    assert sorted(relayed_ids(log, "charges.dlq", "billing").values()) == [1, 1, 1]
    assert sorted(relayed_ids(log, "audit.dlq", "audit").values()) == [1, 1]


@pytest.mark.parametrize("point", RELAY_POINTS)
def test_a_relay_killed_anywhere_publishes_each_dead_letter_once(
    tmp_path: Path, log: Log, point: str
) -> None:
    sink = SqliteSink(tmp_path / "effects.db")
    sink.setup()
    write_dead_letters(sink, range(4))
    write_dead_letters(sink, range(4, 6), dlq="refunds.dlq")
    sink.close()
    child = subprocess.run(
        [sys.executable, "-m", "tests.sinks._relay_child", str(tmp_path / "effects.db"), log.url,
         "g", point],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert child.returncode == -9, child.stderr
    assert sink.pending_dead_letters("g") == 6, "nothing marked relayed"

    def published() -> Counter[int]:
        with log.admin() as admin:
            topics = set(admin.list_topics())
        return sum(
            (relayed_ids(log, t) for t in ("charges.dlq", "refunds.dlq") if t in topics),
            Counter(),
        )

    # Killed after the log commit, the whole batch is out; before it, nothing is.
    out_already = 6 if point == "after-publish-before-mark" else 0
    assert sum(published().values()) == out_already
    assert relay_dead_letters(sink, log, "g") == 6 - out_already
    assert sink.pending_dead_letters("g") == 0
    assert published() == Counter(range(1, 7)), "every dead letter once: none lost, none twice"
    sink.close()


def test_a_stale_relay_is_fenced_by_a_newer_one(tmp_path: Path, log: Log) -> None:
    sink = SqliteSink(tmp_path / "effects.db")
    sink.setup()
    write_dead_letters(sink, range(3))
    newer = SqliteSink(tmp_path / "effects.db")

    def newer_takes_over(point: str) -> None:
        if point == "inside-transaction":
            assert relay_dead_letters(newer, log, "g") == 3

    stale = DeadLetterRelay(sink, log, "g", hook=newer_takes_over)
    assert stale.run_once() == 0
    assert stale.fenced
    stale.close()
    assert relayed_ids(log, "charges.dlq") == Counter({1: 1, 2: 1, 3: 1})
    assert sink.pending_dead_letters("g") == 0
    newer.close()
    sink.close()


def test_a_newer_relay_finds_what_a_stale_one_published(tmp_path: Path, log: Log) -> None:
    sink = SqliteSink(tmp_path / "effects.db")
    sink.setup()
    write_dead_letters(sink, range(3))
    newer = SqliteSink(tmp_path / "effects.db")

    def newer_takes_over(point: str) -> None:
        if point == "after-publish-before-mark":
            assert relay_dead_letters(newer, log, "g") == 0, "recovered, not published again"

    with DeadLetterRelay(sink, log, "g", hook=newer_takes_over) as stale:
        assert stale.run_once() == 0
        assert stale.fenced
    assert relayed_ids(log, "charges.dlq") == Counter({1: 1, 2: 1, 3: 1})
    assert sink.pending_dead_letters("g") == 0
    newer.close()
    sink.close()


@pytest.mark.postgres
def test_a_dead_letter_that_commits_late_is_not_skipped(pg_dsn: str, log: Log) -> None:
    # PostgreSQL hands out ids at insert: id 1 commits after id 2 was already relayed.
    early, late = PostgresSink(pg_dsn), PostgresSink(pg_dsn)
    early.setup()
    with late.transaction(group="g") as slow:
        slow.dead_letter(record(1), topic="charges.dlq", error=ValueError("1"), attempts=1)
        write_dead_letters(early, range(2, 3))
        assert relay_dead_letters(early, log, "g") == 1
    assert relay_dead_letters(early, log, "g") == 1
    assert relayed_ids(log, "charges.dlq") == Counter({1: 1, 2: 1})
    early.close()
    late.close()


@pytest.mark.kafka
def test_a_relay_killed_after_publishing_to_kafka_publishes_nothing_twice(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    import uuid

    kafka = open_log(f"kafka://{kafka_bootstrap}")
    dlq = f"dlq-{uuid.uuid4().hex[:10]}"
    with kafka.admin() as admin:
        admin.create_topic(dlq, 2)
    group = f"g-{uuid.uuid4().hex[:6]}"
    sink = SqliteSink(tmp_path / "effects.db")
    sink.setup()
    write_dead_letters(sink, range(5), group=group, dlq=dlq)
    sink.close()
    child = subprocess.run(
        [sys.executable, "-m", "tests.sinks._relay_child", str(tmp_path / "effects.db"),
         kafka.url, group, "after-publish-before-mark"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert child.returncode == -9, child.stderr
    assert relayed_ids(kafka, dlq, group) == Counter(range(1, 6)), "published, not marked"
    assert sink.pending_dead_letters(group) == 5
    assert relay_dead_letters(sink, kafka, group) == 0, "recovery found them on the log"
    assert sink.pending_dead_letters(group) == 0
    write_dead_letters(sink, range(5, 7), group=group, dlq=dlq)
    assert relay_dead_letters(sink, kafka, group) == 2
    assert relayed_ids(kafka, dlq, group) == Counter(range(1, 8))
    sink.close()
    kafka.close()
