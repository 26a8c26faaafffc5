"""Sinks on their own: epoch fencing of a zombie owner, and the inbox that makes at-least-once
effects idempotent."""

from __future__ import annotations

from pathlib import Path

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
