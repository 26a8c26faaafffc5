"""The log protocol over Apache Kafka, through confluent-kafka (librdkafka).

``open_log("kafka://host1:9092,host2:9092", config={...})``. Any librdkafka setting passes
through ``config`` with its dotted name (``security.protocol``, ``sasl.mechanism``,
``sasl.username``, ``sasl.password``, ``ssl.ca.location``, ...); secret values never appear in
reprs, log lines or error messages.

What assured fixes, whatever ``config`` says: consumers never auto-commit nor auto-store
offsets; producers are idempotent unless asked not to be; keyed records are partitioned with
``murmur2_random``, as Java clients and the embedded engine do. A record that is not written is
never a silent success (``flush()`` raises ``DeliveryError``, a transaction cannot commit);
what the caller must do with each error is written at the top of ``_errors.py``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from confluent_kafka.admin import AdminClient

from assured.errors import ConfigError
from assured.log._models import Isolation, OffsetReset
from assured.log._protocol import ConfigValue, Log, check_consumer_options
from assured.log.kafka._admin import KafkaAdmin, admin_client
from assured.log.kafka._clients import KafkaConsumer, KafkaProducer
from assured.log.kafka._errors import Scrubber, ScrubbingFilter

__all__ = ["KafkaAdmin", "KafkaConsumer", "KafkaLog", "KafkaProducer"]

_FORCED_CONSUMER = {"enable.auto.commit": False, "enable.auto.offset.store": False}
# librdkafka's names for the reset policies, by ours.
_RESETS: dict[str, OffsetReset] = {
    "earliest": "earliest", "smallest": "earliest", "beginning": "earliest",
    "latest": "latest", "largest": "latest", "end": "latest", "error": "error",
}  # fmt: skip
_ASSIGNORS = {"range": "range", "roundrobin": "roundrobin", "sticky": "cooperative-sticky"}


class KafkaLog(Log):
    """Apache Kafka at ``bootstrap`` (``host:port[,host:port]``)."""

    def __init__(self, bootstrap: str, config: Mapping[str, ConfigValue] | None = None):
        self.bootstrap = bootstrap
        self._config: dict[str, Any] = {"bootstrap.servers": bootstrap, **(config or {})}
        self.scrub = Scrubber(self._config)
        self.url = f"kafka://{bootstrap}"
        self._logger = logging.getLogger("assured.log.kafka.librdkafka")
        self._lock = threading.Lock()
        self._admin_client: AdminClient | None = None
        if not any(isinstance(f, ScrubbingFilter) for f in self._logger.filters):
            self._logger.addFilter(ScrubbingFilter(self.scrub))

    def __repr__(self) -> str:
        return f"KafkaLog({self.bootstrap!r}, config={self.scrub.config(self._config)!r})"

    def _client_config(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        return {**self._config, **extra, "logger": self._logger}

    def admin(self) -> KafkaAdmin:
        # One AdminClient per log, for its lifetime: an AdminClient destroyed while a request
        # it made is still in flight (a timed-out wait, a broker down) crashes the process
        # when the answer comes back. Its requests are independent, so sharing it is safe.
        with self._lock:
            if self._admin_client is None:
                self._admin_client = admin_client(self._client_config({}), self.scrub)
        return KafkaAdmin(self._admin_client, self._client_config({}), self.scrub)

    def producer(
        self,
        *,
        transactional_id: str | None = None,
        idempotent: bool = True,
        transaction_timeout_ms: int = 60_000,
        linger_ms: float = 5.0,
        batch_size: int = 1000,
        client_id: str | None = None,
        config: Mapping[str, ConfigValue] | None = None,
    ) -> KafkaProducer:
        extra: dict[str, Any] = {
            "enable.idempotence": idempotent or transactional_id is not None,
            "partitioner": "murmur2_random",
            "linger.ms": linger_ms,
            "batch.num.messages": batch_size,
        }
        if client_id:
            extra["client.id"] = client_id
        if transactional_id is not None:
            extra["transactional.id"] = transactional_id
            extra["transaction.timeout.ms"] = transaction_timeout_ms
        extra.update(config or {})
        return KafkaProducer(self._client_config(extra), self.scrub, transactional_id)

    def consumer(
        self,
        *,
        group_id: str | None = None,
        isolation: Isolation = "read_committed",
        auto_offset_reset: OffsetReset = "earliest",
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 1_000,
        max_poll_interval_ms: int = 300_000,
        assignor: str = "range",
        client_id: str | None = None,
        config: Mapping[str, ConfigValue] | None = None,
    ) -> KafkaConsumer:
        check_consumer_options(isolation, auto_offset_reset)
        if assignor not in _ASSIGNORS:
            raise ConfigError(f"assignor={assignor!r}: one of {sorted(_ASSIGNORS)}")
        extra: dict[str, Any] = {
            # librdkafka needs a group id even to read hand-assigned partitions; such a
            # consumer gets a private one and never commits.
            "group.id": group_id or f"assured-reader-{uuid.uuid4().hex[:12]}",
            "isolation.level": isolation,
            "auto.offset.reset": auto_offset_reset,
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": heartbeat_interval_ms,
            "max.poll.interval.ms": max_poll_interval_ms,
            "partition.assignment.strategy": _ASSIGNORS[assignor],
        }
        if client_id:
            extra["client.id"] = client_id
        extra.update(config or {})
        extra.update(_FORCED_CONSUMER)
        # The policy that counts is the one librdkafka is given, maybe through ``config``.
        reset = _RESETS.get(str(extra["auto.offset.reset"]), auto_offset_reset)
        return KafkaConsumer(self._client_config(extra), self.scrub, group_id, reset, self.admin)

    def close(self) -> None:
        """Nothing to release: each client closes its own connections."""
