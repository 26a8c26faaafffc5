"""``Admin.end_offsets``: where many partitions end, in one call, agreeing with ``watermarks``."""

from __future__ import annotations

from collections.abc import Callable

from assured.log import Log, TopicPartition
from tests.contract.conftest import unique


def test_end_offsets_are_the_last_stable_offsets_or_the_high_watermarks(
    log: Log, topic: Callable[..., str]
) -> None:
    name = topic(partitions=3)
    tps = [TopicPartition(name, p) for p in range(3)]
    with log.producer() as plain:
        for p, n in enumerate((4, 0, 2)):
            for i in range(n):
                plain.send(name, f"r{i}".encode(), partition=p)
        plain.flush(30)
    # An open transaction on partition 2 holds its last stable offset back.
    producer = log.producer(transactional_id=unique("tx"))
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(name, b"pending", partition=2)
    producer.flush(30)
    try:
        with log.admin() as admin:
            committed = admin.end_offsets(tps)
            uncommitted = admin.end_offsets(tps, isolation="read_uncommitted")
            marks = {tp: admin.watermarks(tp) for tp in tps}
            assert admin.end_offsets([]) == {}
    finally:
        producer.abort_transaction()
        producer.close()
    assert committed == {tp: w.lso for tp, w in marks.items()}
    assert uncommitted == {tp: w.high for tp, w in marks.items()}
    assert [committed[tp] for tp in tps] == [4, 0, 2]
    assert [uncommitted[tp] for tp in tps] == [4, 0, 3]
