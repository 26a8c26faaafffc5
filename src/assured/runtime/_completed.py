"""Records handled above a committed position, kept in the commit's offset metadata.

Under at-least-once, records side by side finish out of order, and a partition's committed
position is its contiguous handled prefix: records handled above it are handled again by the
next owner. So each commit also carries, per partition, the offsets handled above that position
(their outputs flushed before the commit, as the prefix's are), and a new owner skips them.

The text is ``a1:<position>:<runs>:<check>``: ``<position>`` is the committed offset it was
written with; ``<runs>`` the handled offsets above it as comma-separated ``<gap>.<length>`` runs
in base 36 (the gap from the end of the previous run, or from the position); ``<check>`` the
CRC-32 of what precedes it, in base 36. It is held under
:data:`~assured.log.MAX_OFFSET_METADATA` by dropping the highest runs: what it leaves out is
handled again, which at-least-once allows. A text that is not ours, fails its check, names more
than :data:`MOST` offsets, or was written with another position (offsets reset by a tool) is
ignored: nothing is skipped.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable

from assured.log._protocol import MAX_OFFSET_METADATA

__all__ = ["decode", "encode"]

log = logging.getLogger("assured.runtime")

_HEAD = "a1"
MOST = 1_000_000  # offsets one text may name; more is not something a window ever held
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _b36(n: int) -> str:
    out = ""
    while True:
        n, d = divmod(n, 36)
        out = _DIGITS[d] + out
        if n == 0:
            return out


def _runs(offsets: list[int]) -> Iterable[tuple[int, int]]:
    """Sorted distinct offsets as (first, length) runs of consecutive ones."""
    first = prev = offsets[0]
    for o in offsets[1:]:
        if o != prev + 1:
            yield first, prev - first + 1
            first = o
        prev = o
    yield first, prev - first + 1


def encode(position: int, handled: Iterable[int], limit: int = MAX_OFFSET_METADATA) -> str:
    """The metadata for a commit of ``position``: ``handled`` offsets above it, as many of the
    lowest as fit in ``limit`` characters ("" when none is above)."""
    above = sorted({o for o in handled if o > position})[:MOST]
    if not above:
        return ""
    text = f"{_HEAD}:{position}:"
    pieces: list[str] = []
    size, end = len(text) + 8, position  # 8: the check and its colon, at most
    for first, length in _runs(above):
        piece = f"{_b36(first - end)}.{_b36(length)}"
        size += len(piece) + (1 if pieces else 0)
        if size > limit:
            break
        pieces.append(piece)
        end = first + length
    if not pieces:
        return ""
    text += ",".join(pieces)
    return f"{text}:{_b36(zlib.crc32(text.encode()))}"


def decode(text: str, committed: int) -> set[int]:
    """The handled offsets above ``committed`` that ``text`` names, if it is ours and was
    written with that very position; otherwise none."""
    if not text.startswith(_HEAD + ":"):
        return set()
    try:
        body, check = text.rsplit(":", 1)
        if int(check, 36) != zlib.crc32(body.encode()):
            raise ValueError("check")
        _, position, runs = body.split(":", 2)
        if int(position) != committed:
            return set()
        out: set[int] = set()
        end = committed
        for piece in filter(None, runs.split(",")):
            gap, length = (int(x, 36) for x in piece.split("."))
            if gap < 1 or length < 1 or len(out) + length > MOST:
                raise ValueError(piece)
            first = end + gap
            out.update(range(first, first + length))
            end = first + length
    except ValueError:
        log.warning(
            "ignoring damaged offset metadata %r: records above %d run again", text[:80], committed
        )
        return set()
    return out
