"""A password in the config never appears in an error message, a repr or a log line."""

from __future__ import annotations

import logging

import pytest

from assured.errors import AssuredError, DeliveryError
from assured.log import open_log

pytestmark = pytest.mark.kafka

SECRET = "hunter2-do-not-print-me"


def test_password_never_shown(kafka_bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []

    # 1. The broker speaks PLAINTEXT; a SASL client fails its handshake and says so in logs.
    log = open_log(
        f"kafka://{kafka_bootstrap}",
        config={
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN",
            "sasl.username": "alice",
            "sasl.password": SECRET,
            "debug": "security,broker",
        },
    )
    seen.append(repr(log))
    admin = log.admin()
    admin.timeout = 4  # type: ignore[attr-defined]
    with pytest.raises(AssuredError) as failed:
        admin.list_topics()
    seen.append(str(failed.value))
    producer = log.producer(config={"message.timeout.ms": 2000})
    producer.send("anything", b"v")
    with pytest.raises(DeliveryError) as undelivered:
        producer.flush(3)
    seen.append(str(undelivered.value))

    # 2. A secret where librdkafka echoes values back: an invalid setting's error message.
    with pytest.raises(AssuredError) as bad:
        open_log(
            f"kafka://{kafka_bootstrap}",
            config={"sasl.password": SECRET, "security.protocol": SECRET},
        ).producer()
    seen.append(str(bad.value))

    seen += [r.getMessage() for r in caplog.records]
    assert any("sasl" in line.lower() or "SASL" in line for line in seen), "the logs were read"
    assert "***" in repr(log)
    leaks = [line for line in seen if SECRET in line]
    assert leaks == []
