"""Record batches: the engine stores records many to a SQLite row, as Kafka stores them many to
a record batch.

A batch holds consecutive records of one partition written by one append (one producer batch,
or one transaction marker). Its row in ``batches`` carries what the engine filters and retains
by (first and last offset, largest timestamp, size, transaction state); its ``data`` blob holds
the records column by column: a tuple of timestamps, of keys, of values and of encoded headers,
the key and header columns None when every record has none. One SQLite step and one C-level
decode then yield hundreds of records, where one row per record paid SQLite's per-row cost and
a Python tuple per row on top.

The blob is Python's ``marshal`` format, version 4 (stable since Python 3.4 and readable by
every later release): the one decoder in the standard library that turns bytes into tuples of
ints, bytes and None at C speed. It is only ever fed blobs this engine wrote; a damaged blob is
reported as a corrupt engine file, never trusted.
"""

from __future__ import annotations

import marshal
from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import Any

from assured.errors import EngineFileError

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_RECORDS",
    "Columns",
    "Row",
    "decode",
    "encode",
    "iter_rows",
    "row_size",
    "split",
    "table_rows",
]

MAX_BATCH_RECORDS = 1000
MAX_BATCH_BYTES = 1 << 20  # a larger append is stored as several batches
_MARSHAL_VERSION = 4

Row = tuple[int, bytes | None, bytes | None, bytes | None]  # ts, key, value, encoded headers
# (timestamps, keys or None, values, encoded headers or None), one entry per record
Columns = tuple[tuple[int, ...], Any, tuple[Any, ...], Any]


def row_size(row: Row) -> int:
    """The bytes a record counts for in retention.bytes: key, value and headers."""
    _ts, key, value, headers = row
    return (
        (len(key) if key else 0) + (len(value) if value else 0) + (len(headers) if headers else 0)
    )


def iter_rows(data: bytes, where: object, offset: int) -> Iterator[Row]:
    """The records of a batch blob as rows, one by one (for the rare walks over single
    records; reading goes through :func:`decode`)."""
    ts, keys, values, headers = decode(data, where, offset)
    none = repeat(None)
    return zip(  # noqa: B905 - the columns' lengths were checked by decode()
        ts, none if keys is None else keys, values, none if headers is None else headers
    )


def split(rows: Sequence[Row], size: int) -> Iterator[tuple[Sequence[Row], int]]:
    """``rows`` (of ``size`` bytes in all) as batches of at most :data:`MAX_BATCH_RECORDS`
    records and about :data:`MAX_BATCH_BYTES` bytes (a single larger record is a batch of
    its own); yields (rows, bytes) per batch."""
    if len(rows) <= MAX_BATCH_RECORDS and size <= MAX_BATCH_BYTES:
        yield rows, size
        return
    start, total = 0, 0
    for i, row in enumerate(rows):
        n = row_size(row)
        if i > start and (i - start >= MAX_BATCH_RECORDS or total + n > MAX_BATCH_BYTES):
            yield rows[start:i], total
            start, total = i, 0
        total += n
    yield rows[start:], total


def table_rows(
    first: int, rows: Sequence[Row], size: int, txn: int | None
) -> Iterator[tuple[int, int, int, int, int | None, bytes]]:
    """The ``batches`` rows (id, last, max_ts, bytes, txn, data) that store ``rows`` (of
    ``size`` bytes in all) from row id ``first`` on, in transaction state ``txn``."""
    for chunk, chunk_size in split(rows, size):
        data, max_ts = encode(chunk)
        yield first, first + len(chunk) - 1, max_ts, chunk_size, txn, data
        first += len(chunk)


def encode(rows: Sequence[Row]) -> tuple[bytes, int]:
    """The blob for ``rows`` and their largest timestamp."""
    ts, keys, values, headers = zip(*rows, strict=True)
    # A column of nothing but None is stored as None (an empty key stays b"").
    key_column = None if keys.count(None) == len(keys) else keys
    header_column = None if not any(headers) else headers
    blob = marshal.dumps((ts, key_column, values, header_column), _MARSHAL_VERSION)
    return blob, max(ts)


def decode(data: bytes, where: object, offset: int, count: int | None = None) -> Columns:
    """The columns of the batch blob at ``offset`` of ``where`` (a partition), which holds
    ``count`` records if given; :class:`EngineFileError` if it is damaged."""
    try:
        columns = marshal.loads(data)  # noqa: S302 - only blobs this engine wrote, checked below
        ts, keys, values, headers = columns
        if count is None:
            count = len(ts)
        if (
            type(ts) is not tuple
            or len(ts) != count
            or type(values) is not tuple
            or len(values) != count
            or (keys is not None and len(keys) != count)
            or (headers is not None and len(headers) != count)
        ):
            raise ValueError(f"its columns do not hold the {count} records its row says")
    except (ValueError, TypeError, EOFError) as e:
        raise EngineFileError(
            f"the record batch at {where} offset {offset} is damaged ({e}): the engine file is "
            "corrupt. Restore it from a copy; the records before that offset still read."
        ) from None
    return columns  # type: ignore[no-any-return]
