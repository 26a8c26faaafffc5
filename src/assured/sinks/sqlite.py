"""A SQLite database as a sink: effects and offsets in one SQLite transaction.

Two things can go wrong that a server database would not let happen:

- Another process holds the write lock and does not let go (stopped with SIGSTOP, hung, or
  in a long transaction). Taking the lock is retried with backoff up to ``lock_timeout_s``, then
  :class:`SinkUnreachableError` names the file and what to do.
- The file is deleted or replaced while open. SQLite would go on writing to the unlinked file,
  and every commit would vanish with it. Each commit first checks that the path still names the
  file that is open (one ``stat``); if not, it rolls back and raises :class:`SinkLostError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import sqlite3
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from assured.errors import ConfigError, UsageError
from assured.sinks._base import (
    SideBySide,
    Sink,
    SinkLostError,
    SinkTransaction,
    SinkUnavailableError,
    SinkUnreachableError,
    StrayStatementError,
    _Plain,
    checked_schema,
    ddl,
    ended_by_handler,
    refuse_transaction_control,
)

__all__ = ["SqliteSink"]

T = TypeVar("T")

_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (extended codes share the low byte)

# SQLite asks the authorizer (see SqliteSink._authorize) only when it prepares a statement,
# and Python's sqlite3 keeps prepared statements by their text: a handler's "COMMIT" must never
# find one the runtime prepared while it was allowed. So the runtime commits and rolls back by
# conn.commit() and conn.rollback(), which prepare theirs each time; its BEGINs, worded apart,
# fail inside a transaction whoever runs them.
_BEGIN_IMMEDIATE = "BEGIN IMMEDIATE -- assured"
_BEGIN = "BEGIN -- assured"


class _Connection(sqlite3.Connection):
    """The sink's connection (what ``db.connection`` gives a handler), checked before every
    statement from any path here (``execute``, ``executemany`` row by row, ``executescript``,
    a cursor of any class, ``blobopen``; see :meth:`_check`):

    - SQLite ends a transaction by itself on some errors (``INSERT OR ROLLBACK``,
      ``RAISE(ROLLBACK)`` in a trigger, a full disk); a statement after that would run on its
      own and commit at once, without the positions. None runs: the sink sees the end first
      (see :meth:`_SqliteTransaction._end`).
    - A handler's code writes only in its own attempt's part (see
      :meth:`_SqliteTransaction._part`), not outside the runtime's transaction, between
      parts, or in another record's part (a task a failed record left running).

    The authorizer (see :meth:`SqliteSink._authorize`) could not do this: SQLite asks it only
    when it prepares a statement, and Python's sqlite3 reuses the statements it prepared.
    ``close()`` and ``set_authorizer()`` are refused while handlers run. A cursor built by
    hand (``sqlite3.Cursor(conn)``) is beyond reach."""

    sink: SqliteSink | None = None

    def _check(self) -> None:
        sink = self.sink
        if sink is None or sink._mine:
            return
        tx = sink._inside
        if tx is None:
            if not self.in_transaction:
                raise StrayStatementError(_stray(sink, "outside the runtime's transaction"))
            return
        if tx.ended or not self.in_transaction:
            tx._end(None)
        if sink._via:  # the runtime's own, or a record's through its db side by side
            return
        tx._refuse_outside_own_part()

    def cursor(self, factory: Any = None) -> Any:
        if factory is not None and not isinstance(factory, type):
            cursor = super().cursor(factory)
            if not isinstance(cursor, _CheckedCursor):
                cursor.close()
                raise UsageError(
                    "a cursor factory that is not a class (a function) on the SQLite sink's "
                    "connection: its cursors could write after the transaction ended. Give "
                    "cursor() a subclass of sqlite3.Cursor instead"
                )
        else:
            cursor = super().cursor(_checked(factory or sqlite3.Cursor))
        return self._tracked(cursor)

    # sqlite3's own make their cursor without cursor(): these go through it (see cursor), and
    # the checked cursor's method checks first.
    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        cursor: sqlite3.Cursor = self.cursor().execute(sql, parameters)
        return cursor

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        cursor: sqlite3.Cursor = self.cursor().executemany(sql, parameters)
        return cursor

    def executescript(self, sql_script: str, /) -> sqlite3.Cursor:
        cursor: sqlite3.Cursor = self.cursor().executescript(sql_script)
        return cursor

    def blobopen(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._tracked(super().blobopen(*args, **kwargs))

    def _tracked(self, made: T) -> T:
        """``made`` (a cursor or a blob), closed when the handler's part it is made in ends."""
        tx = self.sink._inside if self.sink is not None else None
        if tx is not None and tx._made is not None:
            tx._made.append(weakref.ref(made))
        return made

    def close(self) -> None:
        self._refused("connection.close()")
        super().close()

    def set_authorizer(self, authorizer: Any) -> None:
        self._refused("connection.set_authorizer()")  # the sink's own refuses COMMIT
        super().set_authorizer(authorizer)

    def _refused(self, what: str) -> None:
        """``what`` is not for handlers: it stops the App (see HandlerEndedTransactionError)."""
        tx = self.sink._inside if self.sink is not None and not self.sink._mine else None
        if tx is not None:
            tx.refused = tx.refused or what
            raise ended_by_handler(what)


class _CheckedCursor:
    """Mixed into a cursor class of the sink's connection: see :class:`_Connection`."""

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        _check_of(self)
        return super().execute(sql, parameters)  # type: ignore[misc]

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        _check_of(self)
        conn = self.connection  # type: ignore[attr-defined]
        if isinstance(conn, _Connection):
            parameters = _each_checked(conn, parameters)
        return super().executemany(sql, parameters)  # type: ignore[misc]

    def executescript(self, sql_script: str, /) -> Any:
        _check_of(self)
        return super().executescript(sql_script)  # type: ignore[misc]


def _stray(sink: SqliteSink, where: str) -> str:
    return (
        f"a statement on the connection of the SQLite sink {sink.path} {where} (from a task "
        "a handler left running, or a connection or transaction kept after its record): it "
        "would commit with other records' work, or on its own, without its position. It did "
        "not run; do every database call before the handler returns"
    )


def _check_of(cursor: Any) -> None:
    conn = cursor.connection
    if isinstance(conn, _Connection):
        conn._check()


def _each_checked(conn: _Connection, parameters: Any) -> Iterator[Any]:
    """``parameters``, checked before each row: the code that makes a row may end the
    transaction (a statement of its own that SQLite answers with a rollback)."""
    for row in parameters:
        conn._check()
        yield row


_CHECKED: dict[type, type] = {}


def _checked(factory: type) -> type:
    """``factory`` (a cursor class, the caller's own perhaps), checked (see _CheckedCursor)."""
    if issubclass(factory, _CheckedCursor):
        return factory
    checked = _CHECKED.get(factory)
    if checked is None:
        checked = _CHECKED[factory] = type(factory.__name__, (_CheckedCursor, factory), {})
    return checked


class CursorLeftOpenError(UsageError):
    """A cursor the sink could not close, made by hand (``sqlite3.Cursor(conn)``), was left
    with a write statement unread (``INSERT ... RETURNING``) when its handler ended: SQLite
    cannot end the record's savepoint or commit the transaction while it is open. Nothing of
    the transaction committed, and the App stops: every record would do the same. (Cursors
    made by the connection are closed when the handler's part ends.)"""

    fatal = True


_LEFT_OPEN = (
    "a cursor of a handler's statement on the SQLite sink is still open (an INSERT, UPDATE or "
    "DELETE ... RETURNING not read to its end, on a cursor made by hand with "
    "sqlite3.Cursor(conn), which the sink cannot close for it): SQLite cannot end the "
    "record's part or commit the transaction while it is. Nothing of the transaction "
    "committed. Read such a cursor to its end (fetchall()) or close() it before the handler "
    "returns, or make it with conn.cursor()"
)


def _in_progress(e: sqlite3.Error) -> bool:
    return "statements in progress" in str(e)


class _SqliteTransaction(SinkTransaction):
    sink: SqliteSink

    def __init__(
        self,
        sink: SqliteSink,
        conn: sqlite3.Connection,
        group: str | None,
        incarnations: Mapping[str, str] | None,
    ):
        super().__init__(sink, group, incarnations)
        self._conn = conn
        self.ended = False  # SQLite ended the transaction by itself: nothing of it commits
        self.cause: BaseException | None = None  # the error it ended on, when seen
        self._made: list[weakref.ref[Any]] | None = None  # cursors and blobs of the part open
        self._held: list[str] = []  # handlers' savepoints open in the part, outermost first
        self.refused: str | None = None  # a BEGIN/COMMIT/ROLLBACK a handler tried (refused)

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        """``sql`` inside the transaction. SQLite ends a transaction by itself on some errors
        (a full disk, an I/O error, running out of memory); a statement after that would run
        on its own and commit at once, so none runs: the transaction's end is the database's
        failure (:class:`SinkUnavailableError`: redo the batch), never a handler's. Seen here,
        the end is followed at once by a new transaction that is only ever rolled back, so
        that a handler that swallows the error and goes on through ``connection`` writes
        nothing that commits."""
        return self._execute(sql, params, own=False)

    def _execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any], own: bool) -> Any:
        """:meth:`execute`; ``own``: a statement of the runtime's (see :meth:`_step`)."""
        sink = self.sink
        if sink._inside is not self and not sink._mine:
            raise StrayStatementError(_stray(sink, "through a transaction used after its block"))
        if self.ended or not self._conn.in_transaction:
            self._end(None)
        if not sink._via:  # the runtime's own, or a record's checked by its RecordDb
            refuse_transaction_control(sql)
        conn = self._conn
        try:
            if own and isinstance(conn, _Connection):
                # The runtime's own statement (checked above as the connection would check
                # it): a plain cursor, nothing of a handler's to check or track; once per
                # record's part, where the checked one cost more than the statement.
                return sqlite3.Cursor(conn).execute(sql, params)
            return conn.execute(sql, params)  # checked (see _Connection._check)
        except sqlite3.Error as e:
            if not conn.in_transaction:
                self._end(e)
            raise

    @contextlib.contextmanager
    def _plain_rows(self) -> Iterator[None]:
        conn = self._conn
        factories = conn.row_factory, conn.text_factory
        conn.row_factory, conn.text_factory = None, str
        try:
            yield
        finally:
            conn.row_factory, conn.text_factory = factories

    @contextlib.contextmanager
    def _trusted(self) -> Iterator[None]:
        sink = self.sink
        was, sink._via = sink._via, True
        try:
            yield
        finally:
            sink._via = was

    def _end(self, cause: BaseException | None) -> NoReturn:
        if not self.ended:
            self.ended = True
            with contextlib.suppress(sqlite3.Error), self.sink._own():
                self._conn.execute(_BEGIN)  # a transaction for strays, rolled back at the end
        self.cause = self.cause or cause
        raise _rolled_back(self.cause) from cause

    @property
    def connection(self) -> sqlite3.Connection:
        return self._conn

    def savepoint(self, release: bool = True) -> contextlib.AbstractContextManager[None]:
        """A handler's savepoint: its statements are the runtime's own (trusted), so it is
        taken, rolled back to or released only by code in its own attempt's part. Code
        whose attempt is over meanwhile (a task left running) leaves it alone at the end:
        it went with that part, or it sits under another record's, whose work a ROLLBACK TO
        would undo."""
        return self._savepoint(release, handler=True)

    def _stray_message(self, where: str) -> str:
        return _stray(self.sink, where)

    @contextlib.contextmanager
    def _savepoint(  # noqa: PLR0912 -- the runtime's and a handler's, one set of statements
        self, release: bool, handler: bool = False
    ) -> Iterator[None]:
        if handler:
            self._refuse_outside_own_part()
        name = self.sink._savepoint_name(handler)
        self._step(f"SAVEPOINT {name}")
        if handler:
            self._held.append(name)  # undone at the part's end if still open then
        try:
            yield
        except BaseException as e:
            if handler and (self._outside_own_part() is not None or name not in self._held):
                raise  # its attempt is over: see savepoint
            if handler:
                del self._held[self._held.index(name) :]
            if self._conn.in_transaction:  # else the database undid it all: let the error say so
                self._step(f"ROLLBACK TO {name}")
                self._step(f"RELEASE {name}")
            else:
                self.cause = self.cause or e  # SQLite ended it on the handler's own statement
            if self.refused is not None:
                raise ended_by_handler(self.refused) from e
            raise
        if handler:
            self._refuse_outside_own_part()
            if name not in self._held:
                return  # undone already, with its part
            del self._held[self._held.index(name) :]
        if self.refused is not None:  # refused, and the handler swallowed the error
            self._step(f"ROLLBACK TO {name}")
            self._step(f"RELEASE {name}")
            raise ended_by_handler(self.refused)
        if release:
            try:
                self._step(f"RELEASE {name}")
            except CursorLeftOpenError:
                self._step(f"ROLLBACK TO {name}")  # nothing of the record stays
                raise

    def _part_began(self) -> None:
        """In a handler's part, the connection's ``row_factory`` and ``text_factory`` are the
        handlers' (as they last set them), out of it sqlite3's defaults, so that the runtime's
        own statements read what they expect. The cursors and blobs made in it are closed at
        its end, before its savepoint ends: one left unread would hold SQLite's RELEASE and
        COMMIT back, and one kept could write after it."""
        conn = self._conn
        conn.row_factory, conn.text_factory = self.sink._factories
        self._made = []
        self._held = []

    def _part_ended(self) -> None:
        conn, sink = self._conn, self.sink
        made, self._made = self._made or [], None
        for ref in made:
            cursor_or_blob = ref()
            if cursor_or_blob is not None:
                with contextlib.suppress(sqlite3.Error):
                    cursor_or_blob.close()
        sink._factories = (conn.row_factory, conn.text_factory)
        conn.row_factory, conn.text_factory = None, str
        held, self._held = self._held, []
        if held and conn.in_transaction:
            # A handler's savepoint block still open as its attempt ends (in a task it did not
            # await): what it did so far is undone, never committed half-way.
            self._step(f"ROLLBACK TO {held[0]}")
            self._step(f"RELEASE {held[0]}")

    def _step(self, sql: str) -> None:
        """The runtime's own SAVEPOINT, ROLLBACK TO or RELEASE; SQLite refuses the first and
        the last while a write statement is still in progress (a cursor made by hand)."""
        try:
            with self._trusted():
                self._execute(sql, (), own=True)
        except sqlite3.OperationalError as e:
            if self._conn.in_transaction and _in_progress(e):
                raise CursorLeftOpenError(_LEFT_OPEN) from e
            raise


class SqliteSink(Sink):
    """Effects in the SQLite database at ``path``. ``durability='full'`` fsyncs every commit.
    ``lock_timeout_s``: how long to wait for another process's write lock before giving up."""

    _ddl = ddl("id INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB")

    def __init__(
        self,
        path: str | Path,
        durability: str = "full",
        lock_timeout_s: float = 30.0,
        schema: str | Iterable[str] = (),
    ) -> None:
        self.path = Path(path)
        self.schema = checked_schema(schema)
        if durability not in ("normal", "full"):
            raise ConfigError(f"durability={durability!r}: 'normal' or 'full'")
        if lock_timeout_s <= 0:
            raise ConfigError(f"lock_timeout_s={lock_timeout_s!r}: a number of seconds above 0")
        self._durability = durability
        self.lock_timeout_s = lock_timeout_s
        self._at_once = False  # a lock held elsewhere raises _LockBusyError (see _SideBySide)
        self._conn: sqlite3.Connection | None = None
        self._inside: _SqliteTransaction | None = None  # the transaction handlers run in
        self._mine = False  # the runtime's own statement (see _own)
        self._via = False  # a statement through the transaction, not the raw connection
        # The row_factory and text_factory handlers last set on the connection (see _part_began)
        self._factories: tuple[Any, Any] = (None, str)
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._lost: str | None = None
        self._tag = secrets.token_hex(4)  # in the names of the runtime's savepoints
        self._names = itertools.count()  # handlers' savepoints
        self._part_name = f"assured_{self._tag}_p"  # every record's part's savepoint

    def _connect(self) -> sqlite3.Connection:
        if self._lost is not None:
            raise SinkLostError(self._lost)
        if self._conn is None:
            if not self.path.parent.is_dir():
                raise ConfigError(f"folder {self.path.parent} for the SQLite sink does not exist")
            # Each wait inside SQLite is short; _locked() retries it up to lock_timeout_s.
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                timeout=min(1.0, self.lock_timeout_s),
                factory=_Connection,
                cached_statements=self._CACHED_STATEMENTS,
            )
            conn.sink = self
            try:
                with self._own():
                    self._locked(conn, "PRAGMA journal_mode=WAL")
                    conn.execute(f"PRAGMA synchronous={self._durability.upper()}")
                    conn.set_authorizer(self._authorize)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self._identity = None if str(self.path) in ("", ":memory:") else self._stat()
        return self._conn

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _moved(self) -> str | None:
        """How the file at ``path`` differs from the open one, if it does."""
        if self._identity is None:
            return None
        now = self._stat()
        if now is None:
            return "deleted"
        return None if now == self._identity else "replaced by another file"

    def _locked(self, conn: sqlite3.Connection, sql: str) -> None:
        """Run ``sql``, which needs a lock, retrying while another process holds it (or, in
        :meth:`_not_waiting`, raising :class:`_LockBusyError` at once)."""
        if self._at_once:
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                conn.execute(sql)
            except sqlite3.OperationalError as e:
                if _busy(e):
                    raise _LockBusyError from e
                raise
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(min(1.0, self.lock_timeout_s) * 1000)}")
            return
        try:
            conn.execute(sql)
            return
        except sqlite3.OperationalError as e:
            if not _busy(e):
                raise
        retrying = Retrying(
            stop=stop_after_delay(self.lock_timeout_s),
            wait=wait_exponential(multiplier=0.01, max=0.5),
            retry=retry_if_exception(_busy),
            reraise=True,
        )
        try:
            retrying(conn.execute, sql)
        except sqlite3.OperationalError as e:
            if not _busy(e):
                raise
            raise SinkUnreachableError(self._stayed_locked()) from e

    def _stayed_locked(self) -> str:
        return (
            f"the SQLite sink {self.path} stayed locked for {self.lock_timeout_s:g}s: another "
            "process holds its write lock (one stopped with SIGSTOP or hung, or a very long "
            "transaction). Nothing was written. Find it with `fuser "
            f"{self.path}` (or lsof), resume it (kill -CONT) or stop it, then start again; "
            "or give the sink a longer lock_timeout_s."
        )

    @contextlib.contextmanager
    def _not_waiting(self) -> Iterator[None]:
        """Within it, a lock another process holds raises :class:`_LockBusyError` at once."""
        self._at_once = True
        try:
            yield
        finally:
            self._at_once = False

    def side_by_side(self, group: str, incarnations: Mapping[str, str]) -> SideBySide:
        return _SideBySide(self, group, incarnations)

    @contextlib.contextmanager
    def transaction(
        self, group: str | None = None, incarnations: Mapping[str, str] | None = None
    ) -> Iterator[SinkTransaction]:
        conn = self._connect()
        with self._own():
            self._locked(conn, _BEGIN_IMMEDIATE)
        tx = _SqliteTransaction(self, conn, group, incarnations)
        self._inside = tx
        try:
            yield tx
        except BaseException:
            self._inside = None
            if conn.in_transaction:
                conn.rollback()
            raise
        self._inside = None
        if tx.refused is not None:  # refused, and the error swallowed outside any savepoint
            conn.rollback()
            raise ended_by_handler(tx.refused)
        moved = self._moved()
        if moved is not None:
            if conn.in_transaction:
                conn.rollback()
            self._lose(moved)
        if tx.ended or not conn.in_transaction:  # ended by the database, error swallowed
            if conn.in_transaction:
                conn.rollback()  # what strays wrote after the end
            raise _rolled_back(tx.cause)
        try:
            conn.commit()
        except sqlite3.Error as e:
            # A COMMIT that fails did not commit (in WAL mode a full disk often shows here,
            # as the pages are written): the database's failure, and the batch is redone.
            if conn.in_transaction:
                conn.rollback()
            if _in_progress(e):  # a handler's, not the database's
                raise CursorLeftOpenError(_LEFT_OPEN) from e
            raise _rolled_back(e) from e

    # The statements sqlite3 keeps prepared per connection (its default is 128).
    _CACHED_STATEMENTS = 5120

    def _savepoint_name(self, handler: bool) -> str:
        """A name for the runtime's next savepoint, after the sink's random tag (a handler's
        SQL cannot name it). A record's part: always the same name, so that sqlite3 reuses
        the three statements it prepared (a new name each time made each SAVEPOINT a new
        statement, prepared anew and an authorizer call each: into SQLite at concurrency 200,
        about a third of the throughput). Each part is released as it ends, and parts never
        nest, so ROLLBACK TO and RELEASE find the part's own savepoint, the newest of the name
        (one left open under it, its RELEASE refused, goes with the commit); a savepoint a
        handler's own SQL left open goes with its part, and one it names from an earlier
        record is no longer there ("no such savepoint": that record fails, loudly). A
        handler's ``savepoint()``: a name of its own, never again (a handler may keep any
        number of them open in its part, and one sharing a name with its part's would undo
        too little)."""
        if handler:
            return f"assured_{self._tag}_h{next(self._names)}"
        return self._part_name

    def _authorize(self, action: int, what: str | None, *_: str | None) -> int:
        """SQLite asks before it prepares each statement: inside a transaction that handlers
        run in, a BEGIN, COMMIT or ROLLBACK (not a savepoint's) is refused, from whatever
        path it comes (``db.connection.commit()``, ``executescript``, a library)."""
        if action == sqlite3.SQLITE_TRANSACTION and self._inside is not None:
            self._inside.refused = self._inside.refused or (what or "a transaction statement")
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    @contextlib.contextmanager
    def _own(self) -> Iterator[None]:
        """The runtime's own statements: a transaction statement inside the transaction, a
        statement outside one (allowed)."""
        inside, mine, self._inside, self._mine = self._inside, self._mine, None, True
        try:
            yield
        finally:
            self._inside, self._mine = inside, mine

    def _lose(self, how: str) -> NoReturn:
        self._lost = (
            f"the SQLite sink file {self.path} was {how} while this process had it open. This "
            f"transaction was rolled back, and nothing was committed to {self.path} since. What "
            "earlier transactions committed (effects and stored offsets) is in the file that was "
            "at that path before. Put that file back (from a backup, if it is gone) and start "
            "again; starting on a new, empty file would lose every effect the old one holds."
        )
        self.close()
        raise SinkLostError(self._lost)

    def _columns(self, tx: SinkTransaction, table: str) -> set[str]:
        return {r[0] for r in tx.execute("SELECT name FROM pragma_table_info(?)", (table,))}

    def close(self) -> None:
        if self._conn is not None:
            with self._own():
                self._conn.close()
            self._conn = None
            self._factories = (None, str)


def _rolled_back(cause: BaseException | None) -> SinkUnavailableError:
    said = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    if isinstance(cause, sqlite3.IntegrityError):  # SQLITE_CONSTRAINT: a statement's doing
        return SinkUnavailableError(
            f"a statement's conflict made SQLite roll back the whole transaction{said}: "
            "INSERT OR ROLLBACK (or ON CONFLICT ROLLBACK), or RAISE(ROLLBACK) in a trigger, "
            "ends the transaction of every record in the batch, not the statement. Nothing of "
            "it was committed, and the batch is redone, where the same record will do the "
            "same. Use OR ABORT or RAISE(ABORT), which undo the statement alone: the record "
            "then fails by itself (retried, then dead-lettered)."
        )
    return SinkUnavailableError(
        f"SQLite rolled the transaction back by itself{said}: nothing of it was committed, and "
        "nothing more runs in it. The disk may be full or failing; the work is redone once "
        "the database takes writes again."
    )


def _busy(e: BaseException) -> bool:
    return (
        isinstance(e, sqlite3.OperationalError)
        and (getattr(e, "sqlite_errorcode", 0) & 0xFF) in _BUSY
    )


class _LockBusyError(Exception):
    """Another process holds the SQLite sink's write lock (see SqliteSink._not_waiting)."""


class _SideBySide(_Plain):
    """Records side by side on the SQLite sink's own connection. Its transaction begins without
    waiting inside SQLite for another process's write lock (its busy handler sleeps, and would
    stop the App's event loop, every record with it, for up to ``lock_timeout_s``): the wait
    is on the event loop instead, so records go on with their other awaits meanwhile."""

    sink: SqliteSink

    async def begin(self) -> None:
        began = time.monotonic()
        pause = 0.005
        while True:
            if self.in_transaction:
                # Begun meanwhile by another record (this one was given up while it waited,
                # and the connection passed on): that transaction is not this one's to begin.
                return
            try:
                with self.sink._not_waiting():
                    await super().begin()
                return
            except _LockBusyError:
                if time.monotonic() + pause - began > self.sink.lock_timeout_s:
                    raise SinkUnreachableError(self.sink._stayed_locked()) from None
                await asyncio.sleep(pause)
                pause = min(0.25, pause * 2)
