"""Whether a handler's SQL is, for sure, one PostgreSQL statement whose ``%`` placeholders all
stand where a value may: the condition for sending it with its record's savepoint in one
message (``SAVEPOINT s; <sql>``, its parameters merged in by psycopg's client-side binding).

That message goes by the simple query protocol, which runs every statement in it. So a string
with a second statement (``INSERT ...; COMMIT``) would end the window's transaction under the
records sharing it; the server refuses such a string only by the extended protocol, which the
other path uses. And a placeholder inside a quoted string or a comment would let a value's own
quotes or line breaks end it. The scan below follows PostgreSQL's lexer where that is simple
and says no wherever it is not (dollar quotes, backslashes, escape strings), so a wrong answer
can only send a statement by the slower path, never run two.
"""

from __future__ import annotations

import functools

__all__ = ["after_comment", "one_statement"]

_BLANK = frozenset(" \t\n\r\f\v")
# Characters that may not stand right before a quote that opens a plain string literal: after
# a letter, digit or ``&`` a quote opens a prefixed one (E'..', U&'..', B'..', X'..'; a typed
# literal such as date '...' is fine but rare), refused, as some of those read backslashes.
_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_&")


@functools.lru_cache(maxsize=512)
def one_statement(sql: str) -> bool:
    """True only if ``sql`` holds exactly one statement (a trailing ``;`` and comments
    allowed), uses no dollar quotes, backslashes or prefixed strings, and has no ``%`` inside
    a string, a quoted name or a comment other than ``%%``; otherwise False."""
    i, n = 0, len(sql)
    ended = False  # a ';' was seen: only blanks and comments may follow
    seen = False  # anything but blanks and comments
    if any(ord(c) < 32 and c not in _BLANK for c in sql):
        return False  # a NUL would end the string libpq sends; other controls are no SQL
    while i < n:
        if sql[i] in _BLANK:
            i += 1
            continue
        if sql.startswith(("--", "/*"), i):
            i = _comment(sql, i)
        elif ended:
            return False  # a second statement
        elif sql[i] == ";":
            ended = True
            i += 1
        else:
            seen = True
            i = _token(sql, i)
        if i < 0:
            return False
    return seen


def _token(sql: str, i: int) -> int:
    """The index after what starts at ``i`` (a literal, a quoted name, a placeholder, or one
    character), or -1 where the scan gives up."""
    c = sql[i]
    if c in "$\\":
        return -1  # a dollar quote (or $1), a backslash: not followed here
    if c == "'":
        return -1 if i > 0 and sql[i - 1] in _WORD else _quoted(sql, i, "'")
    if c == '"':
        return _quoted(sql, i, '"')
    if c == "%":
        return _placeholder(sql, i)
    return i + 1


def _comment(sql: str, i: int) -> int:
    """The index after the comment at ``i``, or -1 if it holds a ``%`` (a value merged into a
    comment could end it) or is never closed."""
    end = after_comment(sql, i)
    return -1 if end < 0 or "%" in sql[i:end] else end


def after_comment(sql: str, i: int, nested: bool = True) -> int:
    """The index after the comment that starts at ``i`` (``--`` to an LF or a CR, as
    PostgreSQL ends it, or ``/* */``, nested as PostgreSQL nests them unless ``nested`` is
    False, as in SQLite), or -1 for a block comment never closed."""
    if not sql.startswith("/*", i):
        ends = [at for at in (sql.find("\n", i), sql.find("\r", i)) if at >= 0]
        return min(ends) if ends else len(sql)
    if not nested:
        end = sql.find("*/", i + 2)
        return -1 if end < 0 else end + 2
    depth = 0
    while i < len(sql):
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return -1


def _quoted(sql: str, start: int, quote: str) -> int:
    """The index after the literal or quoted name opened at ``start`` (a doubled quote stands
    for itself), or -1: never closed, or holding a backslash or a placeholder."""
    i = start + 1
    while True:
        end = sql.find(quote, i)
        if end < 0:
            return -1
        inside = sql[i:end]
        if "\\" in inside or "%" in inside.replace("%%", ""):
            return -1
        if sql.startswith(quote * 2, end):
            i = end + 2
            continue
        return end + 1


def _placeholder(sql: str, i: int) -> int:
    """The index after the placeholder at ``i`` (``%s``, ``%t``, ``%(name)s``, ``%(name)t``;
    ``%%`` is a percent sign), or -1 for any other: a binary one (client-side binding has
    none), or a name that is not a plain word (it could hide a quote)."""
    if sql.startswith(("%s", "%t", "%%"), i):
        return i + 2
    if sql.startswith("%(", i):
        close = sql.find(")", i)
        name = sql[i + 2 : close] if close > 0 else ""
        plain = name and all(ch in _WORD and ch != "&" for ch in name)
        if plain and sql.startswith(("s", "t"), close + 1):
            return close + 2
    return -1
