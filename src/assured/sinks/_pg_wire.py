"""A record's savepoint and first statement on PostgreSQL, sent straight on libpq (the hot path
of records side by side): one message, its results read by a reader that stays on the socket.

psycopg's ``AsyncConnection.execute`` makes a cursor, runs its send and fetch generators, and
adds a reader to the event loop and removes it again for every call. On the App's one thread
that cost about 100 us a call, two thirds of the call (a loop of savepoint-and-insert calls on
8 connections: 155 us of the client's CPU a call through ``execute``, 52 us here). Only that
one kind of call goes this way; everything else on the connection (BEGIN, COMMIT, marks,
undoing a savepoint) goes through psycopg, after :meth:`Wire.detach`.

Rules this path keeps, as ``execute`` does: results are read to the end (the connection is
left ready for the next call), a failed statement raises psycopg's own error (its SQLSTATE,
its class), and rows come back loaded by the connection's adapters. A call cancelled while its
message is on the wire leaves the connection in an unknown state: :attr:`Wire.broken` says so,
and its owner drops the connection (its transaction never commits).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import psycopg
from psycopg import pq
from psycopg.abc import Transformer
from psycopg.adapt import Transformer as _Transformer

from assured.sinks._base import after_comments

__all__ = ["Wire", "batch_statement", "checked", "loaded_rows", "wire_statement"]

_ERROR = pq.ExecStatus.FATAL_ERROR
_TUPLES = pq.ExecStatus.TUPLES_OK
_DONE = frozenset({pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK})
_COPY = frozenset({pq.ExecStatus.COPY_IN, pq.ExecStatus.COPY_OUT, pq.ExecStatus.COPY_BOTH})
# How long a call waits before it reads the socket itself (see Wire._look).
_LOOK_S = 0.1

# Statements whose results this path reads: one command, rows or none. COPY (which would wait
# for data) and the rest go through psycopg.
_PLAIN = frozenset({"INSERT", "UPDATE", "DELETE", "SELECT", "WITH", "MERGE", "VALUES", "TABLE"})


# Statements that may go in one message with other records' (see runtime._shared_db): those
# that change rows. A SELECT is more often a call of a function whose effects a savepoint does
# not undo (a session advisory lock, a call to another server), and a batch's statement may
# run again.
_BATCHED = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE"})


def _first_word(sql: str) -> str:
    text = after_comments(sql, nested=True)
    return text[:7].split(None, 1)[0].upper().rstrip("(;") if text.strip() else ""


@functools.lru_cache(maxsize=512)
def wire_statement(sql: str) -> bool:
    """Whether ``sql`` (already known to be one statement) is a kind this path reads."""
    return _first_word(sql) in _PLAIN


@functools.lru_cache(maxsize=512)
def batch_statement(sql: str) -> bool:
    """Whether ``sql`` (already known to be one statement) may go in a batch's message."""
    return _first_word(sql) in _BATCHED


class Wire:
    """Calls on ``conn``'s libpq connection, one at a time (the caller's turn on it is its
    own: a record holds its connection for its whole part). Between calls a reader stays on
    the socket; :meth:`detach` takes it off before psycopg uses the connection."""

    __slots__ = ("_fd", "_looking", "_loop", "_results", "_waiting", "broken", "conn")

    def __init__(self, conn: psycopg.AsyncConnection[Any]):
        self.conn = conn
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._waiting: asyncio.Future[list[pq.abc.PGresult]] | None = None
        self._results: list[pq.abc.PGresult] = []
        self._looking: asyncio.AbstractEventLoop | None = None  # where the look's timer runs
        self.broken = False  # a call ended half-way: the connection's state is unknown

    def detach(self) -> None:
        """Take the reader off the socket (psycopg adds and removes its own)."""
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None

    def _attach(self, loop: asyncio.AbstractEventLoop, again: bool = False) -> None:
        """Put the reader on the socket; ``again``: whatever the event loop holds for it
        (a reader taken off, or another's put on, under a waiting call), ours goes back."""
        if again:
            self._loop = loop  # so that detach takes off whatever is there, on the same socket
        self.detach()
        if not again:
            self._fd = self.conn.pgconn.socket
        loop.add_reader(self._fd, self._readable)
        self._loop = loop

    def _readable(self) -> None:
        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
            if self._waiting is None:
                return  # between calls: a notice, or the server going away (the next call says)
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    waiting, self._waiting = self._waiting, None
                    results, self._results = self._results, []
                    if waiting is not None and not waiting.done():
                        waiting.set_result(results)
                    return
                if result.status in _COPY:  # libpq would hand it out for ever
                    raise psycopg.InterfaceError("COPY is not read on this path")
                self._results.append(result)
        except Exception as e:  # the connection broke: the waiting call raises it
            self.detach()
            failed, self._waiting = self._waiting, None
            if failed is not None and not failed.done():
                failed.set_exception(e)

    def _look(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every ``_LOOK_S`` while calls come: a call waiting then (the reader may have been
        taken off the socket under it, by psycopg or a detach from a task left running) has
        what came read and the reader put back. So a call never waits for ever on a lost
        wakeup. One timer a connection, not one a call: it stops at a look that finds no
        call waiting, and the next call starts it again."""
        if self._looking is not loop:  # a timer of an event loop used before
            return
        if self._waiting is None:
            self._looking = None
            return
        self._attach(loop, again=True)
        self._readable()
        loop.call_later(_LOOK_S, self._look, loop)

    async def run(self, query: bytes) -> list[pq.abc.PGresult]:
        """Send ``query`` (simple protocol) and return its results once all have come; a
        failed statement's result among them (the caller raises it)."""
        pgconn = self.conn.pgconn
        loop = asyncio.get_running_loop()
        pgconn.send_query(query)  # raises psycopg.OperationalError on a broken connection
        try:
            while pgconn.flush():  # the message did not fit in the socket's buffer
                await _writable(loop, pgconn.socket)
            if self._loop is not loop:
                self._attach(loop)
            waiting: asyncio.Future[list[pq.abc.PGresult]] = loop.create_future()
            self._waiting = waiting
            self._readable()  # anything already read in
            if self._looking is not loop:
                self._looking = loop
                loop.call_later(_LOOK_S, self._look, loop)
            return await waiting
        except BaseException:
            self._waiting = None
            self._results = []
            self.broken = True  # what the server did with the message is not known
            self.detach()
            raise


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


def checked(results: list[pq.abc.PGresult], encoding: str) -> pq.abc.PGresult:
    """The last result, once none of them is an error (raised as psycopg raises it)."""
    for result in results:
        if result.status == _ERROR:
            raise psycopg.errors.error_from_result(result, encoding=encoding)
        if result.status not in _DONE:  # nothing this path sends gives another
            raise psycopg.InterfaceError(f"unexpected result from PostgreSQL: {result.status!r}")
    if not results:
        raise psycopg.InterfaceError("no result from PostgreSQL")
    return results[-1]


def loaded_rows(result: pq.abc.PGresult, conn: psycopg.AsyncConnection[Any]) -> list[Any]:
    """The rows of a result, loaded by the connection's adapters, as tuples. A transformer
    for each result, as psycopg makes one for each query: its text loaders keep the client
    encoding of the time they were made (a handler may SET client_encoding)."""
    if result.status != _TUPLES or not result.ntuples:
        return []
    transformer: Transformer = _Transformer.from_context(conn)
    transformer.set_pgresult(result)
    rows: list[Any] = transformer.load_rows(0, result.ntuples, tuple)
    return rows
