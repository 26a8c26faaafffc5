"""``open_log(url)``: a log backend named by URL."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from assured.errors import ConfigError
from assured.log._protocol import ConfigValue, Log

__all__ = ["DEFAULT_LOG_URL", "open_log"]

DEFAULT_LOG_URL = "embedded://./assured.db"


def open_log(url: str | None = None, config: Mapping[str, ConfigValue] | None = None) -> Log:
    """The log at ``url``:

    - ``embedded:///abs/path.db`` or ``embedded://./relative.db`` (the default,
      ``./assured.db``): the embedded engine; options as a query string or in ``config``
      (``durability=full``, ``auto_create_topics=true``, ...).
    - ``kafka://host:9092[,host2:9092]``: Apache Kafka; ``config`` passes librdkafka settings
      through with their dotted names (``security.protocol``, ``sasl.username``, ...).
    """
    url = url or DEFAULT_LOG_URL
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "embedded":
        from assured.log.embedded import EmbeddedLog, settings_from

        raw = unquote(parts.netloc + parts.path)
        if not raw or raw == "/":
            raise ConfigError(
                f"{url!r} names no file; write embedded:///absolute/path.db or "
                "embedded://./relative.db"
            )
        options: dict[str, ConfigValue] = dict(parse_qsl(parts.query, strict_parsing=False))
        options.update(config or {})
        return EmbeddedLog(Path(raw), settings_from(options))
    if scheme == "kafka":
        if not parts.netloc:
            raise ConfigError(f"{url!r} names no broker; write kafka://host:9092[,host2:9092]")
        from assured.log.kafka import KafkaLog

        settings: dict[str, ConfigValue] = dict(parse_qsl(parts.query, strict_parsing=False))
        settings.update(config or {})
        return KafkaLog(parts.netloc, settings)
    raise ConfigError(
        f"unknown log URL {url!r}: use embedded:///path/to/file.db or kafka://host:9092"
    )
