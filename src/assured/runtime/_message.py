"""What a handler receives, and the codecs that turn bytes into values and back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from assured.errors import ConfigError
from assured.log import Header, Record

__all__ = ["CODECS", "Codec", "Message", "codec"]


class Codec(Protocol):
    """Turns a value into bytes and back. ``None`` stays ``None`` (a Kafka null/tombstone)."""

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


class BytesCodec:
    def encode(self, value: Any) -> bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"the bytes codec sends bytes, not {type(value).__name__}")
        return bytes(value)

    def decode(self, data: bytes) -> Any:
        return data


class StrCodec:
    def encode(self, value: Any) -> bytes:
        return str(value).encode()

    def decode(self, data: bytes) -> Any:
        return data.decode()


class JsonCodec:
    def encode(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()

    def decode(self, data: bytes) -> Any:
        return json.loads(data)


CODECS: dict[str, Codec] = {"bytes": BytesCodec(), "str": StrCodec(), "json": JsonCodec()}


def codec(spec: str | Codec) -> Codec:
    if isinstance(spec, str):
        try:
            return CODECS[spec]
        except KeyError:
            raise ConfigError(f"unknown codec {spec!r}; built in: {sorted(CODECS)}") from None
    return spec


@dataclass(frozen=True, slots=True)
class Message:
    """One input record, its key and value decoded by the handler's codecs."""

    key: Any
    value: Any
    headers: tuple[Header, ...]
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    record: Record  # the raw bytes, as the log holds them

    def header(self, name: str) -> bytes | None:
        return self.record.header(name)

    @property
    def id(self) -> str:
        """Where this record sits in the log: ``topic[partition]@offset``, unique per record."""
        return f"{self.topic}[{self.partition}]@{self.offset}"
