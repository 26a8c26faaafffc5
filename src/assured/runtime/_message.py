"""What a handler receives, and the codecs that turn bytes into values and back."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from operator import itemgetter
from typing import Any, Protocol

from assured.errors import ConfigError
from assured.log import Header, Record

__all__ = ["BYTES", "CODECS", "Codec", "Message", "codec", "make_message"]


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


BYTES: Codec = BytesCodec()
CODECS: dict[str, Codec] = {"bytes": BYTES, "str": StrCodec(), "json": JsonCodec()}


def codec(spec: str | Codec) -> Codec:
    if isinstance(spec, str):
        try:
            return CODECS[spec]
        except KeyError:
            raise ConfigError(f"unknown codec {spec!r}; built in: {sorted(CODECS)}") from None
    missing = [m for m in ("encode", "decode") if not callable(getattr(spec, m, None))]
    if missing:
        raise ConfigError(
            f"codec {spec!r} has no {' or '.join(missing)}() method; a codec turns a value into "
            f"bytes (encode) and back (decode), or is one of {sorted(CODECS)}"
        )
    return spec


class Message(tuple[Any, Any, Record]):
    """One input record, its key and value decoded by the handler's codecs; the rest is the
    record's (``topic``, ``partition``, ``offset``, ``timestamp_ms``, ``headers``, and the raw
    ``record`` itself). Immutable; built in C for every record, so it is a tuple underneath."""

    __slots__ = ()

    key: Any = property(itemgetter(0), doc="The key, decoded.")
    value: Any = property(itemgetter(1), doc="The value, decoded.")
    record: Record = property(itemgetter(2), doc="The raw record.")  # type: ignore[assignment]

    def __new__(cls, key: Any, value: Any, record: Record) -> Message:
        return tuple.__new__(cls, (key, value, record))

    @property
    def topic(self) -> str:
        return self[2].topic

    @property
    def partition(self) -> int:
        return self[2].partition

    @property
    def offset(self) -> int:
        return self[2].offset

    @property
    def timestamp_ms(self) -> int:
        return self[2].timestamp_ms

    @property
    def headers(self) -> tuple[Header, ...]:
        return self[2].headers

    def header(self, name: str) -> bytes | None:
        return self[2].header(name)

    @property
    def id(self) -> str:
        """Where this record sits in the log: ``topic[partition]@offset``, unique per record."""
        r = self[2]
        return f"{r.topic}[{r.partition}]@{r.offset}"

    def __repr__(self) -> str:
        return f"Message(key={self[0]!r}, value={self[1]!r}, id={self.id!r})"


# Message((key, value, record)) without a Python-level __new__: for the hot path.
make_message: Callable[[tuple[Any, Any, Record]], Message] = partial(tuple.__new__, Message)
