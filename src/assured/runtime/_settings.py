"""The runtime's settings: arguments, then ``ASSURED_*`` environment variables, then a TOML
file (``ASSURED_CONFIG_FILE`` or ``config_file=``), then defaults.

Secrets stay out of sight: a password in the log URL and the values of secret-looking
``log_config`` keys (``sasl.password``, ``ssl.key.pem``, ``sasl.oauthbearer.client.secret``, ...)
show as ``***`` in ``repr()``, ``str()``, ``model_dump()``, ``model_dump_json()`` and every error,
while the attributes keep the real values for librdkafka. A mistake is a one-line
:class:`~assured.errors.ConfigError` naming the setting, where it came from and what is wrong,
never showing a secret value."""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_serializer, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from assured._secrets import redact_config, redact_url
from assured.errors import ConfigError

__all__ = ["GUARANTEES", "AppSettings", "Guarantee"]

Guarantee = Literal["at-most-once", "at-least-once", "exactly-once"]
GUARANTEES: tuple[Guarantee, ...] = ("at-most-once", "at-least-once", "exactly-once")
_ENV_PREFIX = "ASSURED_"
_SECRET_FIELDS = ("log", "log_config")  # values never shown in errors


class AppSettings(BaseSettings):
    """Every knob of an :class:`~assured.App`. Names map onto Kafka's where one exists.

    Each can be given as an argument, as ``ASSURED_<NAME>`` in the environment (``log_config``
    as JSON) or as a key of the TOML file named by ``config_file``/``ASSURED_CONFIG_FILE``.
    """

    model_config = SettingsConfigDict(env_prefix=_ENV_PREFIX, frozen=True, extra="forbid")

    log: str = Field(
        default="embedded://./assured.db",
        description="Log URL: embedded:///path/file.db (the default ./assured.db) or "
        "kafka://host:9092[,host2:9092].",
    )
    group: str = Field(default="assured", min_length=1, description="Consumer group id.")
    guarantee: Guarantee = Field(
        default="at-least-once",
        description="at-most-once, at-least-once (the default) or exactly-once.",
    )
    config_file: str | None = Field(
        default=None, description="A TOML file of settings; it must exist when named."
    )
    log_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Backend settings by name (librdkafka's on Kafka: security.protocol, "
        "sasl.password, ...); secret values are shown as ***.",
    )
    commit_interval_ms: int = Field(
        default=100,
        ge=0,
        description="Commit at least this often (exactly-once: a transaction spans at most "
        "this long; see commit_mode).",
    )
    commit_mode: Literal["adaptive", "fixed"] = Field(
        default="adaptive",
        description='Exactly-once to topics: "adaptive" commits as soon as the consumer has '
        "caught up (low latency when input trickles) and at the interval under load; "
        '"fixed" only at the interval.',
    )
    commit_every: int = Field(
        default=1000, ge=1, description="Commit after this many records, if sooner."
    )
    max_poll_records: int = Field(default=500, ge=1, description="Records fetched per poll.")
    poll_timeout_ms: int = Field(default=100, ge=0, description="Longest wait of one poll.")
    session_timeout_ms: int = Field(
        default=10_000,
        ge=100,
        description="A member not heard from for this long leaves the group.",
    )
    heartbeat_interval_ms: int = Field(
        default=1_000, ge=10, description="How often a member tells the group it is alive."
    )
    max_poll_interval_ms: int = Field(
        default=300_000,
        ge=1_000,
        description="A member that does not poll for this long (a slow handler) leaves the "
        "group; its uncommitted work is redone elsewhere.",
    )
    transaction_timeout_ms: int = Field(
        default=60_000,
        ge=1_000,
        description="Exactly-once: a transaction open longer is aborted by the log.",
    )
    transactional_id: str | None = Field(
        default=None,
        description='Exactly-once producer id; default "<group>-<random>" per process.',
    )
    retry_deadline_ms: int = Field(
        default=30_000,
        ge=0,
        description="How long transaction and commit calls are retried before the App stops.",
    )
    remember_handled: bool = Field(
        default=True,
        description="At-least-once with records in a window (concurrency > 1, or an async def "
        "into a sink): each commit also keeps, in its offset "
        "metadata, the records handled above each partition's committed position, so that the "
        "next owner skips them instead of handling them again.",
    )
    drain_timeout_ms: int = Field(
        default=30_000,
        ge=0,
        description="At a stop (SIGTERM), how long records still running side by side get to "
        "finish before they are given up (handled again by the next owner; at-most-once: lost).",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65_535,
        description="Serve Prometheus metrics on this port (off by default).",
    )
    missing_sink_offsets: Literal["fail", "committed", "earliest"] = Field(
        default="fail",
        description="Exactly-once into a database: where to start a partition the database "
        'has no position for while the log has committed offsets for the group. "fail": stop '
        'and say so; "committed": trust the log\'s offsets; "earliest": handle the partition '
        "again from its first record.",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise ConfigError(_one_line(e, values)) from None
        except SettingsError as e:  # an ASSURED_* value that is not the JSON its field needs
            raise ConfigError(
                f"{e}: an ASSURED_* variable for a dict setting must be a JSON object, e.g. "
                f'{_ENV_PREFIX}LOG_CONFIG=\'{{"acks": "all"}}\''
            ) from None

    @field_validator("guarantee", mode="before")
    @classmethod
    def _normal_guarantee(cls, value: Any) -> Any:
        return value.replace("_", "-").lower() if isinstance(value, str) else value

    # -- secrets never shown -------------------------------------------------------------------

    @field_serializer("log")
    def _show_log(self, url: str) -> str:
        return redact_url(url)

    @field_serializer("log_config")
    def _show_log_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return redact_config(config)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name == "log":
                yield name, redact_url(value)
            elif name == "log_config":
                yield name, redact_config(value)
            else:
                yield name, value

    # -- sources -------------------------------------------------------------------------------

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path, origin = _config_file(init_settings())
        if path:
            if not Path(path).is_file():
                raise ConfigError(
                    f"config file {path!r} (from {origin}) does not exist; give the path of a "
                    "TOML file of settings, or leave it out"
                )
            try:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
                raise ConfigError(
                    f"config file {path!r} is not valid TOML: {e}; fix it or leave it out"
                ) from None
        return tuple(sources)


def _config_file(given: dict[str, Any]) -> tuple[str | None, str]:
    if given.get("config_file"):
        return str(given["config_file"]), "config_file="
    env = os.environ.get(f"{_ENV_PREFIX}CONFIG_FILE")
    return (env, f"{_ENV_PREFIX}CONFIG_FILE") if env else (None, "")


def _origin(name: str, given: dict[str, Any]) -> tuple[str, str | None]:
    """Where setting ``name`` came from, and the file it is in when that is the TOML file."""
    if name in given:
        return f"{name}=", None
    env = f"{_ENV_PREFIX}{name.upper()}"
    if any(k.upper() == env for k in os.environ):
        return env, None
    path, _ = _config_file(given)
    return (f"{path!r}", path) if path else (name, None)


def _one_line(error: ValidationError, given: dict[str, Any]) -> str:
    """A pydantic error as one line: each bad setting, where it came from, what is wrong; no
    value of a secret setting, ever."""
    known = sorted(AppSettings.model_fields)
    parts: list[str] = []
    for item in error.errors(include_url=False, include_input=False):
        loc = [str(p) for p in item["loc"]]
        name = loc[0] if loc else "?"
        if name == "log_config" and len(loc) > 2:  # one line per key, not per allowed type
            loc, item["msg"] = loc[:2], "must be a string, a number or a boolean"
        where, _ = _origin(name, given)
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            source = f" in {where}" if where.startswith("'") else ""
            parts.append(f"unknown setting {name!r}{source}{hint}")
            continue
        label = ".".join(loc)
        if name in _SECRET_FIELDS:
            shown = ""
        else:
            value = _value(name, given)
            shown = "" if value is None else f" = {value!r}"
        source = "" if where in (f"{name}=", name) else f" (from {where})"
        part = f"{label}{shown}{source}: {item['msg']}"
        if part not in parts:
            parts.append(part)
    return "invalid App settings: " + "; ".join(parts)


def _value(name: str, given: dict[str, Any]) -> Any:
    if name in given:
        return given[name]
    env = f"{_ENV_PREFIX}{name.upper()}"
    for key, value in os.environ.items():
        if key.upper() == env:
            return value
    return None
