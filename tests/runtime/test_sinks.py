"""Sinks on their own: epoch fencing of a zombie owner, and the inbox that makes at-least-once
effects idempotent."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import psycopg
import pytest

from assured import App, Message, TopicPartition, open_log
from assured.sinks import PostgresSink, Sink, SinkFencedError, SinkTransaction, SqliteSink


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Sink:
    if request.param == "sqlite":
        return SqliteSink(tmp_path / "effects.db")
    dsn = request.getfixturevalue("postgres_dsn")
    made = PostgresSink(dsn)
    with made, made.transaction() as tx:
        tx.execute("DROP TABLE IF EXISTS assured_offsets")
        tx.execute("DROP TABLE IF EXISTS assured_inbox")
    return PostgresSink(dsn)


def test_a_newer_claim_fences_the_older_owner(sink: Sink) -> None:
    tp = TopicPartition("charges", 0)
    with sink:
        old = sink.claim("g", [tp])
        assert old == {tp: (None, 1)}
        new = sink.claim("g", [tp])
        assert new == {tp: (None, 2)}
        with pytest.raises(SinkFencedError), sink.transaction() as tx:
            sink.store_offsets(tx, "g", {tp: 10}, {tp: old[tp][1]})
        assert sink.stored_offsets("g") == {}
        with sink.transaction() as tx:
            sink.store_offsets(tx, "g", {tp: 10}, {tp: new[tp][1]})
        assert sink.stored_offsets("g") == {tp: 10}
        assert sink.claim("g", [tp]) == {tp: (10, 3)}


def test_inbox_makes_at_least_once_effects_idempotent(tmp_path: Path) -> None:
    log = open_log(f"embedded://{tmp_path}/log.db")
    with log.admin() as admin:
        admin.create_topic("charges", 1)
    with log.producer() as producer:
        for i in range(5):
            producer.send("charges", f"c{i}".encode(), partition=0)
        producer.flush()
    sink = SqliteSink(tmp_path / "effects.db")
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE charged (id TEXT)")

    def app() -> App:
        made = App(log=log, group="g", guarantee="at-least-once")

        @made.handler("charges", sink=sink)
        def charge(msg: Message, db: SinkTransaction) -> None:
            if db.first_delivery(msg.id):
                db.execute("INSERT INTO charged VALUES (?)", (msg.value.decode(),))

        return made

    app().run(until_idle=0.3)
    # Redeliver everything, as a crash before the commit would: rewind the group.
    with log.consumer(group_id="g") as rewind:
        rewind.assign([TopicPartition("charges", 0)])
        rewind.commit({TopicPartition("charges", 0): 0})
    assert app().run(until_idle=0.3).processed == 5
    with sink, sink.transaction() as tx:
        rows = tx.execute("SELECT id FROM charged ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [f"c{i}" for i in range(5)], "each charged once"


def _marks(sink: Sink, group: str) -> list[tuple[str, int, int]]:
    """The records marked done for ``group``: (topic, partition, offset), by offset."""
    with sink.transaction() as tx:
        rows = tx.execute(
            "SELECT topic, partition, record_offset FROM assured_done WHERE group_id = "
            f"{sink.placeholder} ORDER BY record_offset",
            (group,),
        ).fetchall()
    return [tuple(row) for row in rows]


def test_a_connection_side_by_side_is_fenced_per_partition_and_marks_only_while_its_own(
    sink: Sink,
) -> None:
    """Under exactly-once each connection of records side by side checks, before its commit,
    that every partition of its records is still this owner's (the epoch of its claim) and
    marks its records done: a partition claimed again since is named, and its commit is not
    made (the marks roll back with it)."""
    a, b = TopicPartition("charges", 0), TopicPartition("charges", 1)
    group = "g-fence"

    async def run(epochs: dict[TopicPartition, int]) -> list[TopicPartition | None]:
        side = sink.side_by_side(group, {})
        found: list[TopicPartition | None] = []
        try:
            await side.begin()
            found.append(await side.fence_and_mark([(a, epochs[a])], [("charges", 0, 5)]))
            await side.commit()
            await side.begin()
            both = [(b, epochs[b]), (a, epochs[a])]
            found.append(await side.fence_and_mark(both, [("charges", 0, 6), ("charges", 1, 7)]))
            await side.rollback(RuntimeError("fenced"))
        finally:
            await side.close()
        return found

    with sink:
        first = sink.claim(group, [a, b])
        sink.claim(group, [b])  # b goes to a newer owner: the first one's epoch for it is stale
        found = asyncio.run(run({tp: epoch for tp, (_, epoch) in first.items()}))
        marks = _marks(sink, group)
    assert found == [None, b]
    assert marks == [("charges", 0, 5)]


def test_a_connections_commit_with_its_fences_and_marks_commits_only_while_all_its_own(
    sink: Sink,
) -> None:
    """``commit_marked`` (on PostgreSQL the fences, the marks and COMMIT in one message):
    while every partition is still this owner's, the effects and the marks commit; once one
    of them was claimed by another, that one is named and nothing of the transaction commits,
    and the connection goes on to the next transaction."""
    a, b = TopicPartition("charges", 0), TopicPartition("charges", 1)
    group = "g-commit-marked"
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE IF NOT EXISTS charged_marked (id TEXT)")

    async def run(epochs: dict[TopicPartition, int]) -> list[TopicPartition | None]:
        side = sink.side_by_side(group, {})
        insert = f"INSERT INTO charged_marked VALUES ({sink.placeholder})"
        found: list[TopicPartition | None] = []
        try:
            await side.begin()
            await side.execute(insert, ("kept",))
            found.append(await side.commit_marked([(a, epochs[a])], [("charges", 0, 5)]))
            await side.begin()
            await side.execute(insert, ("fenced",))
            both = [(b, epochs[b]), (a, epochs[a])]
            found.append(await side.commit_marked(both, [("charges", 0, 6), ("charges", 1, 7)]))
            await side.rollback(RuntimeError("fenced"))
            await side.begin()
            await side.execute(insert, ("after",))
            found.append(await side.commit_marked([(a, epochs[a])], []))
        finally:
            await side.close()
        return found

    with sink:
        first = sink.claim(group, [a, b])
        sink.claim(group, [b])  # b goes to a newer owner: the first one's epoch for it is stale
        found = asyncio.run(run({tp: epoch for tp, (_, epoch) in first.items()}))
        marks = _marks(sink, group)
        with sink.transaction() as tx:
            charged = tx.execute("SELECT id FROM charged_marked ORDER BY id").fetchall()
    assert found == [None, b, None]
    assert marks == [("charges", 0, 5)]
    assert [c[0] for c in charged] == ["after", "kept"]


@pytest.mark.postgres
def test_a_connections_commit_names_the_partition_fenced_whatever_the_sessions_encoding(
    postgres_dsn: str,
) -> None:
    """From a review: the partition named after a failed fence was looked up by reading the
    offsets rows back, which a handler's ``SET client_encoding = 'SQL_ASCII'`` turned into
    bytes: no row matched, and a partition still this owner's was named (the App would drop
    it). The fence's statement now names the partition by its place among those given."""
    sink = PostgresSink(postgres_dsn)
    a, b = TopicPartition("pay", 0), TopicPartition("pay", 1)
    group = f"g-encoding-{uuid.uuid4().hex[:8]}"
    with sink:
        epochs = {tp: epoch for tp, (_, epoch) in sink.claim(group, [a, b]).items()}
    fences = [(a, epochs[a]), (b, epochs[b])]

    async def run() -> TopicPartition | None:
        side = sink.side_by_side(group, {})
        try:
            await side.begin()
            await side.execute("SET client_encoding = 'SQL_ASCII'")  # a handler's statement
            assert await side.commit_marked(fences, [("pay", 0, 1)]) is None  # the SET stays
            with sink:
                sink.claim(group, [b])  # b goes to a newer owner; a is still ours
            await side.begin()
            return await side.commit_marked(fences, [("pay", 0, 2)])
        finally:
            await side.rollback(RuntimeError("the test is over"))
            await side.close()

    assert asyncio.run(run()) == b


@pytest.mark.postgres
def test_a_connections_commit_cancelled_while_its_fence_waits_never_commits(
    postgres_dsn: str,
) -> None:
    """From a review: cancelled while its fence waited for a claim's lock, the one-message
    commit dropped its connection, but the server went on with the message once the lock was
    free and committed what the App counted as rolled back. The statement is now cancelled
    on the server too: the fence fails there, and COMMIT never runs."""
    sink = PostgresSink(postgres_dsn)
    tp = TopicPartition("pay", 2)
    group = f"g-cancel-{uuid.uuid4().hex[:8]}"
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE IF NOT EXISTS charged_cancel (id TEXT)")
    with sink:
        epoch = sink.claim(group, [tp])[tp][1]

    async def run() -> None:
        claim = await psycopg.AsyncConnection.connect(postgres_dsn)  # a claim under way
        await claim.execute(
            "SELECT 1 FROM assured_offsets WHERE group_id = %s FOR UPDATE", (group,)
        )
        side = sink.side_by_side(group, {})
        await side.begin()
        await side.execute("INSERT INTO charged_cancel VALUES (%s)", (group,))
        task = asyncio.ensure_future(side.commit_marked([(tp, epoch)], [("pay", 2, 7)]))
        await asyncio.sleep(0.5)  # its fence waits for the claim's lock
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await side.close()
        await claim.rollback()  # the claim fails: the lock is free
        await claim.close()
        await asyncio.sleep(1.0)  # a server still on the message would commit by now

    asyncio.run(run())
    with psycopg.connect(postgres_dsn) as conn:
        charged = conn.execute("SELECT id FROM charged_cancel WHERE id = %s", (group,)).fetchall()
        marks = conn.execute(
            "SELECT record_offset FROM assured_done WHERE group_id = %s", (group,)
        ).fetchall()
    assert charged == []
    assert marks == []


@pytest.mark.postgres
def test_the_fence_of_a_connection_side_by_side_holds_off_a_claim_until_its_commit(
    postgres_dsn: str,
) -> None:
    """On PostgreSQL the fence share-locks the partitions' offsets rows: a claim by another
    owner waits for the commit (and then sees its marks), so no claim slips in between the
    check and the commit."""
    sink = PostgresSink(postgres_dsn)
    tp = TopicPartition("charges", 3)
    group = "g-fence-lock"

    async def run(epoch: int) -> str:
        side = sink.side_by_side(group, {})
        try:
            await side.begin()
            assert await side.fence_and_mark([(tp, epoch)], [("charges", 3, 1)]) is None
            with psycopg.connect(postgres_dsn, autocommit=True) as other:
                other.execute("SET lock_timeout = '300ms'")
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    other.execute(
                        "UPDATE assured_offsets SET epoch = epoch + 1 WHERE group_id = %s "
                        "AND topic = %s AND partition = %s",
                        (group, tp.topic, tp.partition),
                    )
            await side.commit()
            return "committed"
        finally:
            await side.close()

    with sink:
        claim = sink.claim(group, [tp])
        assert asyncio.run(run(claim[tp][1])) == "committed"
        assert sink.claim(group, [tp])[tp][1] == claim[tp][1] + 1


def test_the_last_commit_of_a_step_stores_positions_only_while_its_own(sink: Sink) -> None:
    """The step's last commit under exactly-once (one statement on PostgreSQL): for each
    partition still this owner's, the new position (or none: left as it is), the marks below
    it dropped and the step's marks added; a partition claimed again since is named first (in
    partition order), and the caller rolls it all back."""
    a, b, c = (TopicPartition("charges", p) for p in (0, 1, 2))
    group = "g-store"
    p = sink.placeholder

    async def run(epochs: dict[TopicPartition, int]) -> list[TopicPartition | None]:
        side = sink.side_by_side(group, {})
        found: list[TopicPartition | None] = []
        try:
            await side.begin()
            await side.mark_done([("charges", 0, 3), ("charges", 0, 9), ("charges", 1, 2)])
            await side.commit()
            await side.begin()
            found.append(
                await side.store_positions(
                    [("charges", 0, 12), ("charges", 1, 8)],
                    [(a, 10, epochs[a]), (b, None, epochs[b])],
                )
            )
            await side.commit()
            await side.begin()
            found.append(
                await side.store_positions(
                    [("charges", 0, 20)], [(c, 4, epochs[c] - 1), (a, 15, epochs[a])]
                )
            )
            await side.rollback(RuntimeError("fenced"))
        finally:
            await side.close()
        return found

    with sink:
        first = sink.claim(group, [a, b, c])
        found = asyncio.run(run({tp: epoch for tp, (_, epoch) in first.items()}))
        with sink.transaction() as tx:
            marks = tx.execute(
                f"SELECT partition, record_offset FROM assured_done WHERE group_id = {p} "
                "ORDER BY partition, record_offset",
                (group,),
            ).fetchall()
            stored = tx.execute(
                f"SELECT partition, next_offset FROM assured_offsets WHERE group_id = {p} "
                "ORDER BY partition",
                (group,),
            ).fetchall()
    assert found == [None, c]
    assert [tuple(m) for m in marks] == [(0, 12), (1, 2), (1, 8)]  # 3 and 9 were below 10
    before = {tp.partition: position for tp, (position, _) in first.items()}
    assert [tuple(s) for s in stored] == [(0, 10), (1, before[1]), (2, before[2])]
