"""What a handler receives, and the codecs that turn bytes into values and back.

A codec is ``"bytes"``, ``"str"``, ``"json"``, an object with ``encode``/``decode``, or a pydantic
model class: each record is then validated into the model (``msg.value`` is a model instance)
and whatever a handler sends is written as JSON. A record that does not decode is not retried
(a retry cannot change its bytes): it goes to the dead-letter topic at once, with a
:class:`DecodeError` saying why in its headers. "Does not decode" is what a codec raises as
``ValueError`` (bad UTF-8 or JSON, a pydantic ``ValidationError``), ``TypeError`` or
:class:`DecodeError`; anything else it raises (a schema registry out of reach) is retried like
a handler's error, and the log's own errors go to the commit protocol as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from operator import itemgetter
from typing import Any, Generic, Protocol

import pydantic
import pydantic_core
from typing_extensions import TypeVar  # a default (PEP 696): a bare Message is Message[Any]

from assured.errors import AssuredError, ConfigError
from assured.log import Header, Record

__all__ = [
    "BYTES",
    "CODECS",
    "Codec",
    "DecodeError",
    "Message",
    "ModelCodec",
    "codec",
    "codec_name",
    "error_text",
    "is_decode_failure",
    "make_message",
]

V = TypeVar("V", default=Any)


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


class ModelCodec:
    """A pydantic model class as a codec: a record's bytes are JSON validated into the model;
    what a handler sends (a model instance, or anything pydantic can write as JSON) is JSON."""

    def __init__(self, model: type[pydantic.BaseModel]):
        self.model = model
        self._validate = model.model_validate_json

    def encode(self, value: Any) -> bytes:
        return pydantic_core.to_json(value)

    def decode(self, data: bytes) -> Any:
        return self._validate(data)

    def __repr__(self) -> str:
        return f"ModelCodec({self.model.__qualname__})"


BYTES: Codec = BytesCodec()
CODECS: dict[str, Codec] = {"bytes": BYTES, "str": StrCodec(), "json": JsonCodec()}


def codec(spec: str | Codec | type[Any]) -> Codec:
    """The codec ``spec`` names: a built-in name, a codec object, or a pydantic model class."""
    if isinstance(spec, str):
        try:
            return CODECS[spec]
        except KeyError:
            raise ConfigError(
                f"unknown codec {spec!r}; built in: {sorted(CODECS)}, or a pydantic model "
                "class, or an object with encode() and decode()"
            ) from None
    if isinstance(spec, type):
        if issubclass(spec, pydantic.BaseModel):
            return ModelCodec(spec)
        hint = (
            f"pass an instance, {spec.__name__}(), not the class"
            if callable(getattr(spec, "decode", None))
            else "a codec is one of "
            f"{sorted(CODECS)}, a pydantic model class, or an object with encode() and decode()"
        )
        raise ConfigError(f"codec {spec.__qualname__} is a class; {hint}")
    missing = [m for m in ("encode", "decode") if not callable(getattr(spec, m, None))]
    if missing:
        raise ConfigError(
            f"codec {spec!r} has no {' or '.join(missing)}() method; a codec turns a value into "
            f"bytes (encode) and back (decode), or is one of {sorted(CODECS)}"
        )
    return spec


def codec_name(c: Codec) -> str:
    """How a codec is called in messages: its built-in name, its model, or its type."""
    for name, known in CODECS.items():
        if known is c:
            return f"the {name} codec"
    if isinstance(c, ModelCodec):
        return c.model.__qualname__
    return type(c).__qualname__


class DecodeError(AssuredError):
    """A record's key or value did not decode with its handler's codec (not JSON, or not
    valid for the handler's pydantic model). The record is dead-lettered without a retry:
    its bytes will not change. A handler may raise it too (about something else it parses);
    then it is retried like any other error of the handler."""

    def __init__(self, message: str, record: Record):
        super().__init__(message)
        self.record = record


def is_decode_failure(error: BaseException) -> bool:
    """Did a codec refuse the bytes (retrying cannot help), rather than fail for a moment or
    fail in the log? Bad UTF-8 and bad JSON are ``ValueError``s, and so is pydantic's
    ``ValidationError``; an :class:`AssuredError` other than :class:`DecodeError` is the log's
    (even a ``ConfigError``, which is a ``ValueError`` too)."""
    if isinstance(error, DecodeError):
        return True
    return isinstance(error, ValueError | TypeError) and not isinstance(error, AssuredError)


def error_text(error: BaseException) -> str:
    """``str(error)``, or a note saying it could not be had: a user's exception whose
    ``__str__`` raises must not stop a dead letter, nor the App."""
    try:
        return str(error)
    except Exception as e:
        return f"<str() of this {type(error).__name__} raised {type(e).__name__}>"


def decode_failed(record: Record, part: str, c: Codec, error: Exception) -> DecodeError:
    """The :class:`DecodeError` for ``record``'s ``part`` ("key" or "value"). Never quotes the
    input (it may be a secret): a validation error says where and what, not what was there."""
    where = f"{record.topic}[{record.partition}]@{record.offset}"
    if isinstance(error, pydantic.ValidationError):
        problems = "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"]
            for e in error.errors(include_url=False, include_input=False)
        )
        text = f"the {part} of {where} does not validate as {codec_name(c)}: {problems}"
    elif isinstance(error, DecodeError):
        text = f"the {part} of {where} does not decode with {codec_name(c)}: {error_text(error)}"
    else:
        what = f"{type(error).__name__}: {error_text(error)}"
        text = f"the {part} of {where} does not decode with {codec_name(c)}: {what}"
    decode_error = DecodeError(" ".join(text.split()), record)
    decode_error.__cause__ = error
    return decode_error


class Message(tuple[Any, Any, Record], Generic[V]):
    """One input record, its key and value decoded by the handler's codecs; the rest is the
    record's (``topic``, ``partition``, ``offset``, ``timestamp_ms``, ``headers``, and the raw
    ``record`` itself). Immutable; built in C for every record, so it is a tuple underneath.

    ``Message[Charge]`` types a handler whose ``value_codec`` is the pydantic model ``Charge``:
    ``msg.value`` is then a ``Charge``."""

    __slots__ = ()

    key: Any = property(itemgetter(0), doc="The key, decoded.")
    value: V = property(itemgetter(1), doc="The value, decoded.")  # type: ignore[assignment]
    record: Record = property(itemgetter(2), doc="The raw record.")  # type: ignore[assignment]

    def __new__(cls, key: Any, value: V, record: Record) -> Message[V]:
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
make_message: Callable[[tuple[Any, Any, Record]], Message[Any]] = partial(tuple.__new__, Message)
