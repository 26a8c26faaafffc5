"""The scan that lets a record's first statement go with its savepoint in one message (issue
14): it may say "one statement" only when PostgreSQL's own parser finds one, and where a merged
value could not end a quote or a comment. Judged against a real server's parser."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assured.sinks._one_statement import one_statement
from assured.testing.postgres import PostgresServer

SINGLE = [
    "INSERT INTO t (k, v) VALUES (%s, %s)",
    "INSERT INTO t (k, v) VALUES (%(k)s, %(v)t);",
    "SELECT ';' AS \"a;b\", 'it''s; COMMIT' -- a comment; COMMIT\n",
    "SELECT 1 /* ; /* nested; */ still; */ ; -- after",
    "UPDATE t SET n = n %% 7 WHERE name LIKE 'a%%'",
]
REFUSED = [
    "INSERT INTO t VALUES (1); COMMIT",  # a second statement
    "SELECT 1;;",
    "SELECT 1 -- x\r; COMMIT",  # a CR ends a line comment too
    "SELECT $$;$$",  # dollar quotes are not followed
    "SELECT E'\\'; COMMIT; --'",  # nor backslashes (escape strings)
    "SELECT 'a\\'; COMMIT; --'",  # standard_conforming_strings off would read it so
    "SELECT '%s'",  # a value merged inside a quote could end it
    'SELECT 1 AS "%s"',
    "SELECT 1 -- %s\n",  # a value with a line break would end the comment
    "SELECT 1 /* %s */",
    "SELECT %( ')s; COMMIT; --'",  # a name that is not a word could hide a quote
    "SELECT %b",  # binary parameters: client-side binding has none
    "SELECT %d",
    "SELECT 1 /* never closed",
    "SELECT 'never closed",
    "",
    " ; ",
    "DELETE FROM t\x00 WHERE id = %s",  # libpq would send it up to the NUL only
    "SELECT 1\x1b",
]


@pytest.mark.parametrize("sql", SINGLE)
def test_one_statement_is_recognised(sql: str) -> None:
    assert one_statement(sql)


@pytest.mark.parametrize("sql", REFUSED)
def test_anything_unsure_is_refused(sql: str) -> None:
    assert not one_statement(sql)


# Pieces of valid SQL that a scan could misread: quotes, quoted names, comments (nested, ended
# by LF or CR), dollar quotes, escape strings with an escaped quote, backslashes.
_VALUES = [
    "1",
    "';'",
    "'it''s; x'",
    '1 AS "a;b"',
    '1 AS "q"";"',
    "$$;$$",
    "$t$ ; 'x $t$",
    "E'\\';'",
    "'\\'",
    "'%%;'",
    "7 %% 3",
]
_BETWEEN = [" ", "\n", "\r", "/* ; */", "/* /* ; */ ; */", "-- ;\n", "-- ;\r", "--\r\n"]
# Fragments outside the scan's subset: with one of them in, it may say no.
_UNFOLLOWED = ("$", "\\")


@st.composite
def scripts(draw: st.DrawFn) -> tuple[str, int]:
    """Valid SQL of one or more SELECTs, and how many statements it holds."""
    statements = draw(st.integers(min_value=1, max_value=3))
    parts = [draw(st.sampled_from(_BETWEEN)) for _ in range(draw(st.integers(0, 2)))]
    for n in range(statements):
        if n:
            parts.append(";")
        parts.append("SELECT ")
        parts.append(", ".join(draw(st.lists(st.sampled_from(_VALUES), min_size=1, max_size=3))))
        parts.extend(draw(st.lists(st.sampled_from(_BETWEEN), max_size=2)))
    if draw(st.booleans()):
        parts.append(";")
        parts.extend(draw(st.lists(st.sampled_from(_BETWEEN), max_size=2)))
    return "".join(parts), statements


@pytest.fixture(scope="module")
def server(postgres: PostgresServer) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        yield conn


def statements_the_server_finds(conn: psycopg.Connection, sql: str) -> int:
    """1 if PostgreSQL's extended protocol takes ``sql`` as one statement, 2 if it refuses it
    as several; anything else fails the test (the generator made invalid SQL)."""
    try:
        conn.execute(sql.replace("%%", "%"), prepare=True)
    except psycopg.errors.SyntaxError as e:
        refusal = str(e)
    else:
        return 1
    assert "multiple commands" in refusal, (sql, refusal)
    return 2


@pytest.mark.postgres
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(script=scripts())
def test_the_scan_never_says_one_where_the_server_finds_more(
    server: psycopg.Connection, script: tuple[str, int]
) -> None:
    """Where the scan says one statement, the server's parser agrees; where the SQL holds one
    statement and nothing the scan does not follow, the scan says so."""
    sql, made = script
    found = statements_the_server_finds(server, sql)
    assert found == (1 if made == 1 else 2), sql  # the generator's own count is right
    if one_statement(sql):
        assert found == 1, sql
    elif made == 1:
        assert any(c in sql for c in _UNFOLLOWED) or "E'" in sql, sql
