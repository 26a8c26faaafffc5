"""A broker whose ``offset.metadata.max.bytes`` is below what assured writes (4,000 characters,
Kafka's default limit being 4,096): at-least-once keeps the records handled above its committed
positions in the commits' metadata, and a commit carrying more than the broker takes is refused
whole. On a broker of its own, started with a 64-byte limit."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import cast

import pytest

from assured import App, Message, TopicPartition, open_log
from assured.errors import HarnessError
from assured.log import Log
from assured.runtime._completed import decode
from assured.testing.kafka import KafkaCluster

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def small_metadata_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Log]:
    cluster = KafkaCluster(
        workdir=tmp_path_factory.mktemp("kafka-small-metadata"),
        extra_config={"offset.metadata.max.bytes": "64"},
    )
    try:
        cluster.start()
    except HarnessError as e:
        pytest.fail(f"could not start a Kafka broker: {e}", pytrace=False)
    log = open_log(f"kafka://{cluster.bootstrap}")
    try:
        yield log
    finally:
        log.close()
        cluster.stop()


def test_at_least_once_learns_the_brokers_metadata_limit_and_its_commits_land(
    small_metadata_log: Log, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: every commit with records handled above its position was refused (a warning
    each time), so while a slow record ran nothing was committed, and none of the records
    handled above it was remembered. Now the first refusal lowers what commits carry (said
    once, with what to set), and the next commits land: the position, and the records handled
    above it, as far as the limit allows."""
    log = small_metadata_log
    topic, group = f"meta-{time.time_ns()}", "g-meta"
    with log.admin() as admin:
        admin.create_topic(topic, 1)
    with log.producer() as producer:
        for i in range(120):
            producer.send(topic, b"v%d" % i, key=b"k%d" % i, partition=0)
        producer.flush()
    app = App(log=log, group=group, guarantee="at-least-once", commit_interval_ms=50)
    slow = threading.Event()
    seen: Counter[int] = Counter()

    @app.handler(topic, concurrency=60, ordering="unordered")
    async def handle(msg: Message) -> None:
        # Every third record from offset 5 on is held until the test has looked: the records
        # handled above the position come in runs of two, which take more than 64 characters.
        while msg.offset % 3 == 2 and msg.offset >= 5 and not slow.is_set():
            await asyncio.sleep(0.02)
        seen[msg.offset] += 1

    tp = TopicPartition(topic, 0)
    runs = threading.Thread(target=app.run, kwargs={"until_idle": 2.0}, daemon=True)
    # The consumer's own logger: `assured audit`, run in-process by other tests, leaves it
    # at CRITICAL (brokers die on purpose there).
    with caplog.at_level(logging.WARNING, logger="assured.log.kafka"):
        runs.start()
        try:
            found: tuple[int, str] | None = None
            free = {o for o in range(120) if o < 5 or o % 3 != 2}  # the records not held
            with log.consumer(group_id=group) as reader:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    # Once every record not held is handled, the metadata naming them takes
                    # more than 64 characters: refused, then committed shorter.
                    refusals = any("offset.metadata.max.bytes" in r.message for r in caplog.records)
                    done = free <= set(seen)
                    found = reader.committed_metadata([tp]).get(tp)
                    if done and refusals and found is not None and decode(found[1], found[0]):
                        break
                    time.sleep(0.1)
        finally:
            slow.set()
            runs.join(60)
    assert not runs.is_alive()
    assert found is not None
    position, text = found
    assert position == 5  # the slow record's: nothing below it is left
    remembered = decode(text, position)
    assert remembered  # records handled above it, as many as fit
    assert remembered <= {o for o in range(6, 120) if o % 3 != 2}
    assert 0 < len(text) <= 64
    refused = [r.getMessage() for r in caplog.records if "offset.metadata.max.bytes" in r.message]
    assert 1 <= len(refused) <= 3, refused  # said as the limit is lowered, not at every commit
    assert "Set offset.metadata.max.bytes to 4096" in refused[0]
    assert set(seen) == set(range(120))  # at least once: none lost
    with log.admin() as admin:
        assert admin.committed_offsets(group, [topic])[tp] == 120


def test_a_synchronous_commit_whose_metadata_is_refused_commits_the_position_without_it(
    small_metadata_log: Log,
) -> None:
    """The same refusal met by a synchronous commit (a revoke's, a stop's): the positions are
    committed without the metadata at once, and the consumer's limit is lowered for the next."""
    log = small_metadata_log
    topic, group = f"meta-sync-{time.time_ns()}", "g-meta-sync"
    with log.admin() as admin:
        admin.create_topic(topic, 1)
    tp = TopicPartition(topic, 0)
    with log.consumer(group_id=group) as consumer:
        consumer.assign([tp])
        assert consumer.offset_metadata_limit == 4000
        consumer.commit({tp: 3}, metadata={tp: "x" * 200})
        assert consumer.offset_metadata_limit == 100
        assert consumer.committed_metadata([tp]) == {tp: (3, "")}
        consumer.commit({tp: 4}, metadata={tp: "y" * 40})  # within the broker's 64: kept
        assert consumer.committed_metadata([tp]) == {tp: (4, "y" * 40)}


def test_a_refused_commit_of_a_partition_gone_since_is_not_sent_again(
    small_metadata_log: Log,
) -> None:
    """From a review: the positions of a commit refused for its metadata are sent again without
    it; one of a partition that left meanwhile (revoked, lost) was sent too, under this
    member's generation, and could land behind what the partition's new owner committed. The
    answer is played here as librdkafka serves it, after the partition left."""
    from confluent_kafka import KafkaError

    from assured.log.kafka._clients import KafkaConsumer

    log = small_metadata_log
    topic = f"meta-gone-{time.time_ns()}"
    with log.admin() as admin:
        admin.create_topic(topic, 2)
    gone, kept = TopicPartition(topic, 0), TopicPartition(topic, 1)
    with log.consumer(group_id="g-meta-gone") as opened:
        consumer = cast(KafkaConsumer, opened)
        consumer.assign([gone, kept])
        consumer._in_flight = True  # as _send_waiting_commit leaves it
        consumer._sent = {(topic, 0): (5, "x" * 100), (topic, 1): (7, "y" * 100)}
        consumer._forget([gone])
        consumer._async_commit_done(KafkaError(KafkaError.OFFSET_METADATA_TOO_LARGE), [])
        assert consumer._waiting == {(topic, 1): (7, "")}  # the kept partition's alone
        assert consumer.offset_metadata_limit == 50
