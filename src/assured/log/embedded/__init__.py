"""The embedded engine: Kafka's model in one SQLite (WAL) file, shared by any number of
processes on one machine. ``open_log("embedded:///path/to/file.db")``.

URL options (query string): ``durability=normal|full`` (fsync on every commit with ``full``),
``auto_create_topics=true`` with ``default_partitions=N``, ``busy_timeout_ms``,
``retention_check_interval_ms``.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from assured.errors import ConfigError, EngineFileError
from assured.log._models import Isolation, OffsetReset, TopicPartition
from assured.log._protocol import ConfigValue, Log, check_consumer_options
from assured.log.assignors import ASSIGNORS
from assured.log.embedded._admin import EmbeddedAdmin
from assured.log.embedded._batches import decode
from assured.log.embedded._consumer import EmbeddedConsumer
from assured.log.embedded._engine import Engine
from assured.log.embedded._producer import EmbeddedProducer
from assured.log.embedded._schema import Durability, rid

__all__ = ["EmbeddedAdmin", "EmbeddedConsumer", "EmbeddedLog", "EmbeddedProducer", "Engine"]


@dataclass(frozen=True)
class EmbeddedSettings:
    durability: Durability = "normal"
    auto_create_topics: bool = False
    default_partitions: int = 1
    busy_timeout_ms: int = 30_000
    retention_check_interval_ms: int = 300_000


def _flag(name: str, value: ConfigValue) -> bool:
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r}: expected true or false")


def _int(name: str, value: ConfigValue) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected a whole number") from None


def settings_from(options: Mapping[str, ConfigValue]) -> EmbeddedSettings:
    known = {
        "durability",
        "auto_create_topics",
        "default_partitions",
        "busy_timeout_ms",
        "retention_check_interval_ms",
    }
    unknown = set(options) - known
    if unknown:
        raise ConfigError(
            f"unknown embedded log option(s) {sorted(unknown)}; known: {sorted(known)}"
        )
    durability = str(options.get("durability", "normal")).lower()
    if durability not in ("normal", "full"):
        raise ConfigError(f"durability={durability!r}: expected 'normal' or 'full'")
    return EmbeddedSettings(
        durability="full" if durability == "full" else "normal",
        auto_create_topics=_flag("auto_create_topics", options.get("auto_create_topics", False)),
        default_partitions=_int("default_partitions", options.get("default_partitions", 1)),
        busy_timeout_ms=_int("busy_timeout_ms", options.get("busy_timeout_ms", 30_000)),
        retention_check_interval_ms=_int(
            "retention_check_interval_ms", options.get("retention_check_interval_ms", 300_000)
        ),
    )


class EmbeddedLog(Log):
    """A log in one engine file. Cheap to make; every client opens its own connection."""

    def __init__(
        self, path: Path | str, settings: EmbeddedSettings | None = None, *, create: bool = True
    ):
        """``create=False``: the file must exist already (a reader's missing file is a wrong
        path, not a new log); a :class:`ConfigError` says so and nothing is made."""
        self.path = Path(path).expanduser().absolute()
        self.settings = settings or EmbeddedSettings()
        self.url = f"embedded://{self.path}"
        self._create = create
        self._engine().close()  # validate (or create) the file now, not at first use

    def _engine(self) -> Engine:
        return Engine(
            self.path, self.settings.durability, self.settings.busy_timeout_ms / 1000, self._create
        )

    def admin(self) -> EmbeddedAdmin:
        return EmbeddedAdmin(self._engine())

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
    ) -> EmbeddedProducer:
        cfg = dict(config or {})
        # Unset, the topic's max.message.bytes alone is the limit (what describe shows).
        max_request = _int("message.max.bytes", cfg.pop("message.max.bytes", sys.maxsize))
        delivery = _int("delivery.timeout.ms", cfg.pop("delivery.timeout.ms", 120_000))
        if cfg:
            raise ConfigError(
                f"the embedded producer does not know {sorted(cfg)}; it takes "
                "message.max.bytes and delivery.timeout.ms"
            )
        s = self.settings
        return EmbeddedProducer(
            self._engine(),
            transactional_id=transactional_id,
            idempotent=idempotent,
            transaction_timeout_ms=transaction_timeout_ms,
            linger_ms=linger_ms,
            batch_size=batch_size,
            max_request_size=max_request,
            delivery_timeout_ms=delivery,
            auto_create=s.default_partitions if s.auto_create_topics else None,
            retention_check_interval_ms=s.retention_check_interval_ms,
        )

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
    ) -> EmbeddedConsumer:
        if config:
            raise ConfigError(f"the embedded consumer takes no extra config, got {sorted(config)}")
        check_consumer_options(isolation, auto_offset_reset)
        if assignor not in ASSIGNORS:
            raise ConfigError(f"assignor={assignor!r}: one of {sorted(ASSIGNORS)}")
        if heartbeat_interval_ms >= session_timeout_ms:
            raise ConfigError("heartbeat_interval_ms must be below session_timeout_ms")
        return EmbeddedConsumer(
            self._engine(),
            self._engine() if group_id is not None else None,
            group_id=group_id,
            isolation=isolation,
            auto_offset_reset=auto_offset_reset,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            max_poll_interval_ms=max_poll_interval_ms,
            assignor=assignor,
            client_id=client_id or f"{socket.gethostname()}-{os.getpid()}",
        )

    def check(self, topics: Iterable[str] = ()) -> None:
        """Refuse a damaged file before writing to it: SQLite's own check of the file's pages,
        then every record batch of ``topics`` decoded (as long as a consume of them takes).
        :class:`EngineFileError` says what is damaged; nothing is written either way."""
        engine = self._engine()
        try:
            with engine.read() as c:
                found = [" ".join(row[0].split()) for row in c.execute("PRAGMA quick_check(1)")]
                if found != ["ok"]:
                    raise EngineFileError(
                        f"engine file {self.path} is corrupt ({'; '.join(found)}). Nothing "
                        "was written to it; restore it from a copy, or move it aside and start "
                        "a new one."
                    )
                for name in topics:
                    info = engine.topic(name, refresh=True)
                    for partition, part in enumerate(info.part_ids if info else ()):
                        base = rid(part, 0)
                        rows = c.execute(
                            "SELECT id, last, data FROM batches WHERE id >= ? AND id < ?",
                            (base, rid(part + 1, 0)),
                        )
                        where = TopicPartition(name, partition)
                        for first, last, data in rows:
                            decode(data, where, first - base, last - first + 1)
        finally:
            engine.close()

    def close(self) -> None:
        """Nothing to release: each client closes its own connection."""
