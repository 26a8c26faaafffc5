"""A topic's incarnation: a topic deleted and created again under the same name is told apart
(its offsets start at 0 again, so ``topic[p]@offset`` alone would name two records)."""

from __future__ import annotations

import time

from assured.log import Log
from tests.contract.conftest import unique


def test_a_recreated_topic_has_a_new_topic_id(log: Log) -> None:
    name = unique("inc")
    with log.admin() as admin:
        admin.create_topic(name, 1)
        first = admin.describe_topic(name).topic_id
        assert first is not None
        assert admin.describe_topic(name).topic_id == first, "stable while the topic lives"
        admin.delete_topic(name)
        deadline = time.monotonic() + 30
        while True:  # Kafka deletes asynchronously: a create may be refused for a moment
            try:
                admin.create_topic(name, 1)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        second = admin.describe_topic(name).topic_id
    assert second is not None
    assert second != first
