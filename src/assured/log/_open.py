"""``open_log(url)``: a log backend named by URL."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from assured._secrets import redact_url
from assured.errors import ConfigError
from assured.log._protocol import ConfigValue, Log

__all__ = ["DEFAULT_LOG_URL", "LogURL", "open_log", "parse_log_url"]

DEFAULT_LOG_URL = "embedded://./assured.db"

_FORMS = "embedded:///absolute/path.db, embedded://./relative.db or kafka://host:9092"


@dataclass(frozen=True)
class LogURL:
    """A log URL, checked: its backend, where it points and its query options."""

    scheme: str  # "embedded" or "kafka"
    path: Path | None  # the engine file (embedded)
    brokers: str  # host:port[,host:port] (kafka)
    options: dict[str, str]


def parse_log_url(url: str | None) -> LogURL:
    """``url`` (``None``: :data:`DEFAULT_LOG_URL`) checked for its form, without opening
    anything: a :class:`ConfigError` that says which forms are meant if it is malformed."""
    if url is None:
        url = DEFAULT_LOG_URL
    if not url.strip():
        raise ConfigError(f"the log URL is empty; write {_FORMS}")
    shown = repr(redact_url(url))  # error messages never carry a password
    try:
        parts = urlsplit(url)
    except ValueError as e:  # e.g. an unclosed '[' read as an IPv6 address
        raise ConfigError(f"log URL {shown} is malformed ({e}); write {_FORMS}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("embedded", "kafka"):
        raise ConfigError(f"unknown log URL {shown}: use {_FORMS}")
    # "embedded:/x" and "embedded:x" parse, but would name a file the user did not mean.
    if not url[len(scheme) + 1 :].startswith("//"):
        raise ConfigError(f"log URL {shown} lacks the '//' after '{scheme}:'; write {_FORMS}")
    try:
        options = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        raise ConfigError(
            f"log URL {shown}: options go as ?key=value&key2=value2 after the path"
        ) from None
    if parts.fragment:
        raise ConfigError(f"log URL {shown}: no '#' fragment is allowed; write {_FORMS}")
    if scheme == "kafka":
        return LogURL("kafka", None, _brokers(shown, parts.netloc, parts.path), options)
    return LogURL("embedded", _engine_file(shown, parts.netloc, parts.path), "", options)


def _brokers(shown: str, brokers: str, path: str) -> str:
    if not brokers:
        raise ConfigError(f"{shown} names no broker; write kafka://host:9092[,host2:9092]")
    if path not in ("", "/"):
        raise ConfigError(f"{shown}: a kafka:// URL has no path; write kafka://host:9092")
    for broker in brokers.split(","):
        host, _, port = broker.rpartition(":")
        if not broker or (host and not port.isdigit()) or broker.endswith(":"):
            raise ConfigError(
                f"{shown}: each broker is host:port; write kafka://host:9092[,host2:9092]"
            )
        if host and not 0 < int(port) < 65_536:
            raise ConfigError(f"{shown}: port {port} of {host} is not between 1 and 65535")
    return brokers


def _engine_file(shown: str, where: str, path: str) -> Path:
    # embedded://<where><path>: where is empty (an absolute path), "." or ".." (relative to
    # the working folder) or "~" (the home folder). Anything else would silently become a
    # folder under the working one: "embedded://tmp/x.db" is almost always a slash short.
    raw = unquote(where + path)
    if not raw or raw == "/" or raw.endswith("/"):
        raise ConfigError(
            f"{shown} names no file; write embedded:///absolute/path.db or embedded://./relative.db"
        )
    if where not in ("", ".", "..") and not where.startswith("~"):
        raise ConfigError(
            f"{shown} is ambiguous: write embedded:///{raw} for an absolute path or "
            f"embedded://./{raw} for one relative to the working folder"
        )
    return Path(raw)


def open_log(
    url: str | None = None,
    config: Mapping[str, ConfigValue] | None = None,
    *,
    create: bool = True,
) -> Log:
    """The log at ``url``:

    - ``embedded:///abs/path.db`` or ``embedded://./relative.db`` (the default,
      ``./assured.db``): the embedded engine; options as a query string or in ``config``
      (``durability=full``, ``auto_create_topics=true``, ...). ``create=False`` refuses to
      make a new engine file: for readers, for whom a missing file means a wrong path.
    - ``kafka://host:9092[,host2:9092]``: Apache Kafka; ``config`` passes librdkafka settings
      through with their dotted names (``security.protocol``, ``sasl.username``, ...).

    A malformed URL, a missing folder, or (with ``create=False``) a missing file is a
    :class:`ConfigError`: nothing was made.
    """
    parsed = parse_log_url(url)
    if parsed.scheme == "embedded":
        from assured.log.embedded import EmbeddedLog, settings_from

        assert parsed.path is not None
        path = parsed.path.expanduser().absolute()
        if not path.parent.is_dir():
            raise ConfigError(
                f"folder {path.parent} does not exist; create it, or give the log another path"
            )
        embedded: dict[str, ConfigValue] = dict(parsed.options)
        embedded.update(config or {})
        return EmbeddedLog(path, settings_from(embedded), create=create)
    from assured.log.kafka import KafkaLog

    settings: dict[str, ConfigValue] = dict(parsed.options)
    settings.update(config or {})
    return KafkaLog(parsed.brokers, settings)
