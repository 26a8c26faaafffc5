"""The runtime's settings: arguments, then ``ASSURED_*`` environment variables, then a TOML
file (``ASSURED_CONFIG_FILE`` or ``config_file=``), then defaults."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = ["GUARANTEES", "AppSettings", "Guarantee"]

Guarantee = Literal["at-most-once", "at-least-once", "exactly-once"]
GUARANTEES: tuple[Guarantee, ...] = ("at-most-once", "at-least-once", "exactly-once")


class AppSettings(BaseSettings):
    """Every knob of an :class:`~assured.App`. Names map onto Kafka's where one exists."""

    model_config = SettingsConfigDict(env_prefix="ASSURED_", frozen=True, extra="forbid")

    log: str = "embedded://./assured.db"
    group: str = "assured"
    guarantee: Guarantee = "at-least-once"
    config_file: str | None = None
    log_config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # Commit cadence: whichever comes first. Exactly-once: one transaction per interval.
    commit_interval_ms: int = Field(default=100, ge=0)
    commit_every: int = Field(default=1000, ge=1)
    max_poll_records: int = Field(default=500, ge=1)
    poll_timeout_ms: int = Field(default=100, ge=0)
    session_timeout_ms: int = Field(default=10_000, ge=100)
    heartbeat_interval_ms: int = Field(default=1_000, ge=10)
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)
    transaction_timeout_ms: int = Field(default=60_000, ge=1_000)
    transactional_id: str | None = None  # default: "<group>-<random>" per process
    retry_deadline_ms: int = Field(default=30_000, ge=0)  # transaction ops retried this long
    metrics_port: int | None = None
    # Exactly-once into a database: where to start a partition the database has no position
    # for while the log has committed offsets for the group (the database was replaced or
    # emptied). "fail": stop and say so; "committed": trust the log's offsets; "earliest":
    # handle the partition again from its first record.
    missing_sink_offsets: Literal["fail", "committed", "earliest"] = "fail"

    @field_validator("guarantee", mode="before")
    @classmethod
    def _normal_guarantee(cls, value: Any) -> Any:
        return value.replace("_", "-").lower() if isinstance(value, str) else value

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
        path = init_settings().get("config_file") or os.environ.get("ASSURED_CONFIG_FILE")
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)
