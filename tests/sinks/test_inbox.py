"""The inbox keys deliveries by consumer group and by topic incarnation, and offsets stored for
a topic that was deleted and created again are not used for the new one (issue 18, item 6)."""

from __future__ import annotations

import pytest

from assured.log import TopicPartition
from assured.sinks import Sink
from tests.sinks.conftest import Msg, SinkFactory


@pytest.fixture
def sink(new_sink: SinkFactory) -> Sink:
    made = new_sink()
    made.setup()
    return made


def test_each_group_has_an_inbox_of_its_own(sink: Sink) -> None:
    m = Msg("charges", 0, 7)
    with sink.transaction(group="billing") as tx:
        assert tx.first_delivery(m)
        assert not tx.first_delivery(m)
    with sink.transaction(group="audit") as tx:
        assert tx.first_delivery(m), "another group's delivery is not this group's"
    with sink.transaction(group="billing") as tx:
        assert not tx.first_delivery(m)


def test_a_topic_created_again_delivers_afresh(sink: Sink) -> None:
    m = Msg("charges", 0, 0)  # offsets start again at 0 in the new topic
    with sink.transaction(group="g", incarnations={"charges": "id-1"}) as tx:
        assert tx.first_delivery(m)
    with sink.transaction(group="g", incarnations={"charges": "id-2"}) as tx:
        assert tx.first_delivery(m)
        assert not tx.first_delivery(m)
    with sink.transaction(group="g", incarnations={"charges": "id-1"}) as tx:
        assert not tx.first_delivery(m)


def test_a_message_id_string_is_keyed_like_the_message(sink: Sink) -> None:
    with sink.transaction(group="g", incarnations={"charges": "id-1"}) as tx:
        assert tx.first_delivery(Msg("charges", 2, 9))
        assert not tx.first_delivery("charges[2]@9"), "msg.id is the same delivery"
        assert tx.first_delivery("order-17"), "any other string is the caller's own key"
        assert not tx.first_delivery("order-17")
    with sink.transaction(group="other") as tx:
        assert tx.first_delivery("order-17")


def test_a_delivery_commits_with_the_transaction(sink: Sink) -> None:
    m = Msg("charges", 0, 1)

    def crash_before_commit() -> None:
        with sink.transaction(group="g") as tx:
            assert tx.first_delivery(m)
            raise RuntimeError("crash before commit")

    with pytest.raises(RuntimeError):
        crash_before_commit()
    with sink.transaction(group="g") as tx:
        assert tx.first_delivery(m), "the rolled-back delivery was not recorded"


def test_a_transaction_without_a_group_keeps_the_old_behaviour(sink: Sink) -> None:
    with sink.transaction() as tx:
        assert tx.group == ""
        assert tx.first_delivery("charges[0]@1")
        assert not tx.first_delivery("charges[0]@1")


def test_an_old_inbox_is_upgraded_in_place(new_sink: SinkFactory) -> None:
    old = new_sink()
    with old.transaction() as tx:  # the tables as assured made them before issue 18
        tx.execute(
            "CREATE TABLE assured_offsets (group_id TEXT NOT NULL, topic TEXT NOT NULL, "
            "partition INTEGER NOT NULL, next_offset BIGINT, epoch BIGINT NOT NULL DEFAULT 0, "
            "PRIMARY KEY (group_id, topic, partition))"
        )
        tx.execute("CREATE TABLE assured_inbox (message_id TEXT PRIMARY KEY)")
        for i in (1, 2):
            tx.execute(old._sql("INSERT INTO assured_inbox VALUES (?)"), (f"charges[0]@{i}",))
        tx.execute("INSERT INTO assured_offsets VALUES ('g', 'charges', 0, 3, 4)")
    old.close()

    sink = new_sink()
    sink.setup()
    sink.setup()  # twice: nothing more to do
    with sink.transaction(group="g", incarnations={"charges": "id-1"}) as tx:
        assert {"group_id", "message_id"} <= sink._columns(tx, "assured_inbox")
        assert not tx.first_delivery(Msg("charges", 0, 1)), "delivered before the upgrade"
        assert not tx.first_delivery("charges[0]@2")
        assert tx.first_delivery(Msg("charges", 0, 3))
    tp = TopicPartition("charges", 0)
    assert sink.claim("g", [tp], {"charges": "id-1"}) == {tp: (3, 5)}, "offsets kept"
    assert sink.claim("g", [tp], {"charges": "id-1"}) == {tp: (3, 6)}


def test_an_old_inbox_made_again_after_an_upgrade_joins_the_kept_one(
    new_sink: SinkFactory,
) -> None:
    # An older assured ran once more on an upgraded database and made its inbox again.
    sink = new_sink()
    with sink.transaction() as tx:
        tx.execute("CREATE TABLE assured_inbox_v1 (message_id TEXT PRIMARY KEY)")
        tx.execute("INSERT INTO assured_inbox_v1 VALUES ('charges[0]@1')")
        tx.execute("CREATE TABLE assured_inbox (message_id TEXT PRIMARY KEY)")
        tx.execute("INSERT INTO assured_inbox VALUES ('charges[0]@1')")
        tx.execute("INSERT INTO assured_inbox VALUES ('charges[0]@2')")
    sink.setup()
    with sink.transaction(group="g") as tx:
        assert not tx.first_delivery(Msg("charges", 0, 1))
        assert not tx.first_delivery(Msg("charges", 0, 2))
        assert tx.first_delivery(Msg("charges", 0, 3))


def test_an_offset_of_an_earlier_topic_incarnation_is_dropped(sink: Sink) -> None:
    tp = TopicPartition("charges", 0)
    first = {"charges": "id-1"}
    (_, epoch) = sink.claim("g", [tp], first)[tp]
    with sink.transaction(group="g", incarnations=first) as tx:
        sink.store_offsets(tx, "g", {tp: 10}, {tp: epoch})
    assert sink.claim("g", [tp], first)[tp][0] == 10
    assert sink.claim("g", [tp])[tp][0] == 10, "no incarnation given: kept"
    assert sink.claim("g", [tp], {"charges": "id-2"})[tp][0] is None, "the topic was re-created"
    assert sink.stored_offsets("g") == {}
    assert not sink.has_offsets("g")


def test_has_offsets(sink: Sink) -> None:
    tp = TopicPartition("charges", 1)
    assert not sink.has_offsets("g")
    (_, epoch) = sink.claim("g", [tp])[tp]
    assert not sink.has_offsets("g"), "claimed, but nothing stored yet"
    with sink.transaction(group="g") as tx:
        sink.store_offsets(tx, "g", {tp: 4}, {tp: epoch})
    assert sink.has_offsets("g")
    assert sink.has_offsets("g", ["charges", "refunds"])
    assert not sink.has_offsets("g", ["refunds"])
    assert not sink.has_offsets("g", [])
    assert not sink.has_offsets("other")
