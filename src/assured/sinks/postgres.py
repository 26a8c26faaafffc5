"""A PostgreSQL database as a sink (psycopg 3): effects and offsets in one transaction.

A lost connection (the server restarted or crashed, the backend was terminated, the network
dropped) is the sink's failure, never the handler's: every statement, savepoint and commit of a
transaction turns it into :class:`SinkUnavailableError` (retriable; the transaction rolled back)
or, during COMMIT, :class:`SinkCommitUnknownError` (it may have committed: re-read the stored
offsets). The broken connection is dropped, and the next transaction connects again, retrying
with backoff for up to ``reconnect_timeout_s`` before :class:`SinkUnreachableError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, TypeVar, cast

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import ConnStatus, TransactionStatus
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from assured.errors import ConfigError, ServiceError, UsageError
from assured.log import TopicPartition
from assured.sinks._base import (
    RUNTIME,
    BatchRefusedError,
    CommitWaitError,
    SideBySide,
    Sink,
    SinkCommitUnknownError,
    SinkTransaction,
    SinkUnavailableError,
    SinkUnreachableError,
    StrayStatementError,
    SwallowedStatementError,
    checked_schema,
    conflicted,
    ddl,
    ended_by_handler,
    record_part,
    refuse_transaction_control,
)
from assured.sinks._one_statement import one_statement
from assured.sinks._pg_wire import Wire, batch_statement, checked, loaded_rows, wire_statement

__all__ = ["PostgresSink"]

T = TypeVar("T")

log = logging.getLogger("assured.sinks")

# SQLSTATEs after which the server has closed (or is closing) the connection: class 08
# (connection exception), 57P01-05 (admin shutdown, crash shutdown, cannot connect now, database
# dropped, idle session timeout) and 25P03 (idle in transaction session timeout).
_LOST_PREFIXES = ("08", "57P")
_LOST_STATES = frozenset({"25P03"})
# Server refusals at connect time that pass (psycopg gives them no SQLSTATE, only the text).
_TRANSIENT_REFUSALS = (
    "starting up",
    "shutting down",
    "in recovery",
    "not yet accepting connections",
    "too many clients",
    "connection slots are reserved",
)


# A conflict (see conflicted) at COMMIT (SERIALIZABLE checks there) or in the runtime's own
# statements: the transaction rolls back and its records are handled again. (A handler's own
# statement: its record's, see runtime._handling.)
def _conflict_text(where: str, e: BaseException) -> str:
    return (
        f"a transaction on PostgreSQL at {where} conflicted with another one "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}) and was rolled "
        "back; its records are handled again"
    )


def connection_lost(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any] | None, error: BaseException
) -> bool:
    """Whether ``error``, raised on ``conn``, means the connection is gone."""
    if conn is None or conn.closed:
        return True
    state = getattr(error, "sqlstate", None) or ""
    return state.startswith(_LOST_PREFIXES) or state in _LOST_STATES


def _lost_text(where: str, error: BaseException) -> str:
    why = (
        f"{type(error).__name__}: {str(error).strip()}"
        if isinstance(error, psycopg.Error)
        else "found closed"
    )
    return (
        f"lost the connection to PostgreSQL at {where} during a transaction ({why}). The "
        "transaction was rolled back: nothing of it was committed. The next transaction "
        "reconnects."
    )


_SWALLOWED = (
    "a statement failed inside the handler and the handler went on; PostgreSQL then refuses "
    "every statement of the transaction, so the record's work was rolled back and the record "
    "failed. Let the error propagate (it is retried, then dead-lettered), or check before "
    "writing (INSERT ... ON CONFLICT DO NOTHING instead of catching a unique violation)."
)


def _not_open_text(where: str) -> str:
    return (
        f"the transaction on PostgreSQL at {where} was ended or aborted before the runtime's "
        "COMMIT (a raw COMMIT/ROLLBACK, or an error swallowed); nothing more of it commits, "
        "and the work is redone"
    )


def _commit_unknown_text(where: str, error: BaseException) -> str:
    return (
        f"lost the connection to PostgreSQL at {where} while committing "
        f"({type(error).__name__}: {str(error).strip()}): the transaction may or may not have "
        "committed. Re-read the stored offsets (Sink.stored_offsets) before redoing any of it: "
        "what they cover committed, effects included; the rest did not."
    )


def _rolled_back_text(where: str, done: str | None) -> str:
    return (
        f"PostgreSQL at {where} rolled the transaction back at COMMIT ({done}): a statement "
        "inside it had failed and the error was swallowed. Nothing of it committed; the work "
        "is redone."
    )


# How long a commit beside others of the same window waits for a lock (see CommitWaitError).
_COMMIT_WAIT_MS = 5000


_MARK_ALL = (
    "INSERT INTO assured_done (group_id, topic, partition, record_offset) "
    "SELECT %s, t, p, o FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS m (t, p, o) "
    "ON CONFLICT DO NOTHING"
)


# The fences of a connection's commit under exactly-once and its marks, in one statement: each
# partition's offsets row, if its epoch is still the one given, share-locked in order (a claim
# waits for the commit, then sees the marks); the partitions found come back. The order is the
# one claims lock in (Python's, by code point: COLLATE "C"), whatever the database's collation:
# in another (en-US puts "audit" before "Orders") a claim and a commit could deadlock.
_FENCE_AND_MARK = (
    "WITH held AS (SELECT o.topic, o.partition FROM assured_offsets o "
    "JOIN unnest(%s::text[], %s::int[], %s::bigint[]) AS w (t, p, e) "
    "ON o.topic = w.t AND o.partition = w.p AND o.epoch = w.e WHERE o.group_id = %s "
    'ORDER BY o.topic COLLATE "C", o.partition FOR SHARE OF o), '
    "marked AS (INSERT INTO assured_done (group_id, topic, partition, record_offset) "
    "SELECT %s, t, p, o FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS m (t, p, o) "
    "ON CONFLICT DO NOTHING) "
    "SELECT topic, partition FROM held"
)


# A connection's commit under exactly-once in one message (see commit_marked): the fences and
# marks of _FENCE_AND_MARK, failing when a partition's epoch is no longer the one given (the
# error's text names the first such partition by its place among those given; the CASE is
# over aggregates, so nothing of it is folded before the rows are known), then the bounded
# COMMIT. A failed statement skips the rest of the message: nothing commits.
_FENCED = "assured_fenced"
_FENCED_AT = re.compile(_FENCED + r" (\d+)")
# Filled with literals libpq quoted, and ints.
_FENCE_MARK_COMMIT = (
    "WITH w AS (SELECT * FROM unnest({fences}) WITH ORDINALITY AS w (t, p, e, i)), "  # noqa: S608
    "held AS (SELECT o.topic, o.partition FROM assured_offsets o "
    "JOIN w ON o.topic = w.t AND o.partition = w.p AND o.epoch = w.e WHERE o.group_id = {group} "
    'ORDER BY o.topic COLLATE "C", o.partition FOR SHARE OF o), '
    "marked AS (INSERT INTO assured_done (group_id, topic, partition, record_offset) "
    "SELECT {group}, t, p, o FROM unnest({marks}) AS m (t, p, o) "
    "ON CONFLICT DO NOTHING) "
    "SELECT CASE WHEN count(h.topic) = count(*) THEN 0 ELSE "
    f"('{_FENCED} ' || min(w.i) FILTER (WHERE h.topic IS NULL))::int END "
    "FROM w LEFT JOIN held h ON h.topic = w.t AND h.partition = w.p;\n"
    "SET LOCAL lock_timeout = {wait};\nCOMMIT"
)


# The step's last commit under exactly-once (see SideBySide.store_positions) in one statement:
# each partition's offsets row, if its epoch is still the one given, locked in order and its
# position stored (NULL: left as it is), the marks below a new position dropped and the
# step's marks (all at or above it) added; the partitions stored come back. A partition not
# among them makes the caller roll back, the deletes with the rest.
_STORE_POSITIONS = (
    "WITH w AS (SELECT * FROM unnest(%s::text[], %s::int[], %s::bigint[], %s::bigint[]) "
    "AS w (t, p, n, e)), "
    "mine AS (SELECT o.topic, o.partition, w.n FROM assured_offsets o "
    "JOIN w ON o.topic = w.t AND o.partition = w.p AND o.epoch = w.e WHERE o.group_id = %s "
    'ORDER BY o.topic COLLATE "C", o.partition FOR UPDATE OF o), '
    "stored AS (UPDATE assured_offsets o SET next_offset = COALESCE(mine.n, o.next_offset) "
    "FROM mine WHERE o.group_id = %s AND o.topic = mine.topic AND o.partition = mine.partition "
    "RETURNING o.topic, o.partition), "
    "cleared AS (DELETE FROM assured_done d USING mine WHERE d.group_id = %s "
    "AND d.topic = mine.topic AND d.partition = mine.partition AND d.record_offset < mine.n), "
    "marked AS (INSERT INTO assured_done (group_id, topic, partition, record_offset) "
    "SELECT %s, t, p, o FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS m (t, p, o) "
    "ON CONFLICT DO NOTHING) "
    "SELECT topic, partition FROM stored"
)


# A value merged into a statement as a literal must mean what the same value sent as a
# parameter means: psycopg types an int parameter int2, int4, int8 or numeric by its size, and
# a float float8, where a bare number in SQL would be typed by the server (0.1 a numeric, 300
# an integer: `%s * %s` would then not overflow, nor would a float be rounded as float8).
_INT2, _INT4, _INT8 = 2**15, 2**31, 2**63
_MERGED_MAX = 8192  # a longer text or bytes value goes as a parameter (no hex, no copy)


class _TypedInt(psycopg.adapt.Dumper):
    """An int as a literal cast to the type psycopg would send it as."""

    oid = 0  # the cast is in the literal itself

    def dump(self, obj: int) -> bytes:
        return b"%d" % obj

    def quote(self, obj: int) -> bytes:  # on every record's hot path: no loop, no lookup
        if -_INT4 <= obj < _INT4:
            kind = b"int2" if -_INT2 <= obj < _INT2 else b"int4"
        else:
            kind = b"int8" if -_INT8 <= obj < _INT8 else b"numeric"
        return b"('%d'::%s)" % (obj, kind)  # in parentheses: FETCH FIRST takes it


class _TypedFloat(psycopg.adapt.Dumper):
    """A float as a float8 literal, as psycopg sends it."""

    oid = 0

    def dump(self, obj: float) -> bytes:
        return repr(obj).encode()

    def quote(self, obj: float) -> bytes:
        text = "NaN" if obj != obj else repr(obj).replace("inf", "Infinity")  # noqa: PLR0124
        return b"('%s'::float8)" % text.encode()


# The kinds of value merged in as literals: numbers typed as above, and those psycopg writes
# with a cast of their own ('...'::bytea, '...'::timestamptz, '...'::uuid). Anything else (a
# list, whose array literal would lose its element type; a Decimal; a numpy number, a Json, a
# subclass with a dumper of its own) goes as a parameter. By exact type: a dumper is looked up
# by exact type first.
_MERGEABLE = frozenset(
    {str, bytes, bytearray, bool, int, float, type(None), uuid.UUID}
    | {datetime.date, datetime.datetime, datetime.time, datetime.timedelta}
)


def _literal_kinds(params: Sequence[Any] | Mapping[str, Any]) -> bool:
    """Whether every value can be merged in as a literal that means what the parameter would
    (see _TypedInt and _MERGEABLE), and none is a long text or bytes value."""
    values = params.values() if isinstance(params, Mapping) else params
    for value in values:
        if type(value) not in _MERGEABLE:
            return False
        if isinstance(value, (str, bytes, bytearray)) and len(value) > _MERGED_MAX:
            return False
    return True


def _second_statement(error: psycopg.Error, sql: str) -> None:
    """A handler's SQL without parameters would go by the simple query protocol, which runs
    every statement in the string: ``UPDATE ...; COMMIT`` would end the transaction under the
    records sharing it, committing their effects without their positions. So SQL that is not
    surely one statement (see :func:`one_statement`) goes by the extended protocol (a
    pipeline), where the server refuses a second statement; that refusal is said plainly."""
    if isinstance(error, psycopg.errors.SyntaxError) and "multiple commands" in str(error):
        raise UsageError(
            f"{sql.strip()[:60]!r}: one statement per execute (and per schema= item), as the "
            "server refused a second one (a COMMIT or ROLLBACK in it would end the transaction "
            "that commits effects with their positions); make a call, or an item, for each"
        ) from error


class _DownError(Exception):
    """The server cannot be reached just now (internal: retried until the deadline)."""


class _PostgresTransaction(SinkTransaction):
    sink: PostgresSink

    def __init__(
        self,
        sink: PostgresSink,
        conn: psycopg.Connection[Any],
        group: str | None,
        incarnations: Mapping[str, str] | None,
    ):
        super().__init__(sink, group, incarnations)
        self._conn = conn
        self.lost: str | None = None  # why, once the connection broke
        self._savepoints = 0
        self.refused: str | None = None  # what a handler tried that would end the transaction
        self.ended = False  # its block is over: committed or rolled back

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        # The cursor handed back keeps the transaction's rules: code that kept it (a task
        # left running) cannot run statements on it after its attempt.
        return _HeldCursor(self, self._run(self._conn.execute, sql, params))

    def _run(
        self,
        run: Callable[..., T],
        sql: Any,
        params: Any,
        raw: bool = False,
        **options: Any,
    ) -> T:
        """``run(sql, params)`` (a connection's or a cursor's execute) by the transaction's
        rules: nothing that begins or ends it, and SQL that is not surely one statement by the
        extended protocol (see _second_statement). ``raw``: through ``db.connection``, where
        such a try stops the App (a library that commits would do it for every record)."""
        if self.lost is not None:
            raise SinkUnavailableError(self.lost)
        with self._turn:  # checked and run before the part can end (see SinkTransaction)
            self._own_attempt()
            text = self._allowed(sql, raw)
            try:
                if params or one_statement(text):
                    return run(sql, params, **options)
                with self._conn.pipeline():  # the extended protocol: see _second_statement
                    return run(sql, params, **options)  # read at the pipeline's end
            except psycopg.Error as e:
                if connection_lost(self._conn, e):
                    self.lose(e)
                _second_statement(e, text)
                if conflicted(e) and record_part.get() is RUNTIME:
                    # The runtime's own statement (positions, marks, dead letters: SERIALIZABLE
                    # checks them too): the transaction's failure; a handler's is its record's.
                    raise SinkUnavailableError(_conflict_text(self.sink.where, e)) from e
                raise

    def _own_attempt(self) -> None:
        """Refused: a handler's statement outside its own attempt's part (see
        SinkTransaction._outside_own_part), or through the transaction after its block."""
        if self.ended:
            raise StrayStatementError(
                self._stray_message("through a transaction used after its block")
            )
        self._refuse_outside_own_part()

    def _stray_message(self, where: str) -> str:
        return _stray_text(self.sink.where, where)

    def _allowed(self, sql: Any, raw: bool) -> str:
        """The text of ``sql``, once it is not a statement that begins or ends the
        transaction; such a try through ``db.connection`` (``raw``) is remembered: it stops
        the App (see savepoint)."""
        text = sql if isinstance(sql, str) else _text_of(sql, self._conn)
        try:
            refuse_transaction_control(text)
        except UsageError:
            if raw:
                self.refused = self.refused or text.strip()[:40]
            raise
        return text

    def lose(self, error: BaseException) -> NoReturn:
        """The connection broke: drop it, and raise what every later call will raise too."""
        if self.lost is None:
            self.lost = _lost_text(self.sink.where, error)
            self.sink._discard(self._conn)
        raise SinkUnavailableError(self.lost) from error

    @property
    def connection(self) -> Any:
        """psycopg's connection inside the transaction, without what would end it (see
        :class:`_HeldConnection`)."""
        return _HeldConnection(self)

    @contextlib.contextmanager
    def savepoint(self, release: bool = True) -> Iterator[None]:
        self._savepoints += 1
        name = f"assured_sp_{self._savepoints}"
        self.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException as e:
            if self.lost is None and connection_lost(self._conn, e):
                self.lose(e)
            if self.lost is not None:  # whatever the handler made of it, it is the sink's
                if isinstance(e, SinkUnavailableError):
                    raise
                raise SinkUnavailableError(self.lost) from e
            self.execute(f"ROLLBACK TO SAVEPOINT {name}")
            self.execute(f"RELEASE SAVEPOINT {name}")
            if self.refused is not None:
                raise ended_by_handler(self.refused) from e
            raise
        if self.refused is not None:  # refused, and the handler swallowed the error
            self.execute(f"ROLLBACK TO SAVEPOINT {name}")
            self.execute(f"RELEASE SAVEPOINT {name}")
            raise ended_by_handler(self.refused)
        status = self._conn.info.transaction_status
        if status == TransactionStatus.IDLE:  # ended in here (a raw COMMIT or ROLLBACK)
            self.lose(psycopg.OperationalError("the transaction was ended inside a handler"))
        if status == TransactionStatus.INERROR:
            # A statement failed in here and the code went on: PostgreSQL refuses everything
            # until the transaction ends, and its COMMIT would roll it all back. Undo this part
            # only, and make it the caller's failure, not a silent loss of the whole batch.
            self.execute(f"ROLLBACK TO SAVEPOINT {name}")
            self.execute(f"RELEASE SAVEPOINT {name}")
            raise SwallowedStatementError(_SWALLOWED)
        if release:
            self.execute(f"RELEASE SAVEPOINT {name}")


def _stray_text(where: str, part: str) -> str:
    return (
        f"a statement on PostgreSQL at {where} {part}, from a handler's code (a task a "
        "record left running, or a db kept after its record): it would commit with other "
        "records' work. It did not run; do every database call before the handler returns"
    )


def _text_of(sql: Any, conn: psycopg.Connection[Any]) -> str:
    """The text of a query given as psycopg's ``sql.Composable`` or as bytes."""
    if isinstance(sql, bytes | bytearray):
        return bytes(sql).decode(conn.info.encoding, "replace")
    as_string = getattr(sql, "as_string", None)
    return str(as_string(conn)) if as_string is not None else str(sql)


# What ``db.connection`` refuses on PostgreSQL: calls that would end the transaction the
# runtime commits effects and positions in (or change how it commits).
_ENDS = frozenset(
    {"commit", "rollback", "set_autocommit", "close", "cancel", "cancel_safe", "__exit__"}
    | {"tpc_begin", "tpc_prepare", "tpc_commit", "tpc_rollback", "set_isolation_level"}
)
# Settings that would change how the transaction commits, or how the runtime's own statements
# on the connection run (a client-side cursor factory sends parameters merged, by the simple
# protocol, which runs every statement of a string; a row factory changes what they read).
_SETTINGS = frozenset(
    {"autocommit", "isolation_level", "read_only", "deferrable"}
    | {"cursor_factory", "server_cursor_factory", "row_factory"}
)


class _HeldConnection:
    """What ``db.connection`` gives a handler on PostgreSQL: psycopg's connection, inside the
    runtime's transaction. What would end that transaction is refused (``commit()``,
    ``rollback()``, ``autocommit``, ``close()``, a cursor factory), and ``execute`` and its
    cursors' ``execute`` go by the transaction's rules (no BEGIN, COMMIT or ROLLBACK; one
    statement), so a library handed it cannot commit effects without their positions. The
    rest is psycopg's own: ``transaction()`` (a savepoint inside this transaction), and
    ``pgconn`` and cursors made on it by hand (``psycopg.ClientCursor(conn)``), which are the
    caller's to answer for. It passes for a ``psycopg.Connection`` (``isinstance``), so that
    psycopg's helpers (``TypeInfo.fetch``, an extension's ``register_...``) take it."""

    __slots__ = ("_tx",)

    def __init__(self, tx: _PostgresTransaction):
        object.__setattr__(self, "_tx", tx)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(conn, psycopg.Connection) holds
        return type(self._tx._conn)

    def _refuse(self, what: str) -> NoReturn:
        self._tx.refused = self._tx.refused or what
        raise ended_by_handler(what)

    def __getattr__(self, name: str) -> Any:
        if name in _ENDS:
            self._refuse(f"connection.{name}()")
        self._tx._own_attempt()  # its copy(), transaction(), pgconn: by the attempt's rule
        return getattr(self._tx._conn, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SETTINGS:
            self._refuse(f"connection.{name} = {value!r}")
        setattr(self._tx._conn, name, value)

    def execute(self, query: Any, params: Any = None, **options: Any) -> Any:
        return _HeldCursor(
            self._tx, self._tx._run(self._tx._conn.execute, query, params, raw=True, **options)
        )

    def cursor(self, *args: Any, **kwargs: Any) -> _HeldCursor:
        self._tx._own_attempt()
        return _HeldCursor(self._tx, self._tx._conn.cursor(*args, **kwargs))


# What a psycopg cursor runs statements with, besides execute and executemany.
_RUNS_STATEMENTS = frozenset({"copy", "stream"})


class _HeldCursor:
    """A cursor of :class:`_HeldConnection`: its ``execute`` and ``executemany`` by the
    transaction's rules; the rest psycopg's own."""

    __slots__ = ("_cursor", "_tx")

    def __init__(self, tx: _PostgresTransaction, cursor: psycopg.Cursor[Any]):
        self._tx = tx
        self._cursor = cursor

    def __getattr__(self, name: str) -> Any:
        if name in _RUNS_STATEMENTS:  # by the attempt's rule; its rows read at any time
            self._tx._own_attempt()
        return getattr(self._cursor, name)

    @property
    def connection(self) -> _HeldConnection:
        return _HeldConnection(self._tx)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(cursor, psycopg.Cursor) holds, as it did
        return type(self._cursor)

    def __iter__(self) -> _HeldCursor:  # its own iterator, as psycopg's cursor is
        return self

    def __next__(self) -> Any:
        return next(self._cursor)

    def __enter__(self) -> _HeldCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cursor.close()

    def execute(self, query: Any, params: Any = None, **options: Any) -> _HeldCursor:
        self._tx._run(self._cursor.execute, query, params, raw=True, **options)
        return self

    def executemany(self, query: Any, params_seq: Any, **options: Any) -> None:
        with self._tx._turn:
            self._tx._own_attempt()
            self._tx._allowed(query, raw=True)
            self._cursor.executemany(query, params_seq, **options)  # extended protocol


class PostgresSink(Sink):
    """Effects in the PostgreSQL database at ``dsn`` (``postgresql://user@host:port/db``).

    ``reconnect_timeout_s``: how long a transaction keeps trying to (re)connect, with backoff,
    before giving up with :class:`SinkUnreachableError`.

    ``connections``: how many connections an async handler's records side by side
    (``concurrency`` > 1) may use at once, each opened only when those before it are all busy,
    each async, so its round trips never stop the App's event loop. Records of one key (or
    partition, as ``ordering`` says) share a connection between two group commits. The App's
    own work (claims, stored positions, the dead-letter relay) has one more."""

    placeholder = "%s"
    _ddl = ddl("id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "BYTEA")
    share_lock = " FOR SHARE"

    def __init__(
        self,
        dsn: str,
        reconnect_timeout_s: float = 30.0,
        connect_timeout_s: int = 5,
        schema: str | Iterable[str] = (),
        connections: int = 8,
    ):
        self.schema = checked_schema(schema)
        if reconnect_timeout_s < 0:
            raise ConfigError(f"reconnect_timeout_s={reconnect_timeout_s!r}: seconds, 0 or more")
        if isinstance(connections, bool) or not isinstance(connections, int) or connections < 1:
            raise ConfigError(
                f"connections={connections!r}: how many connections records side by side may "
                "use at once, a whole number of 1 or more"
            )
        self.side_by_side_connections = connections
        # SQL whose savepoint-and-statement message PostgreSQL refused whole (it does not
        # parse): sent in a pipeline from then on, where its savepoint stands before it fails.
        self.refused_whole: set[str] = set()
        self.dsn = dsn
        self.reconnect_timeout_s = reconnect_timeout_s
        self.connect_timeout_s = max(1, int(connect_timeout_s))
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def where(self) -> str:
        """host:port/database of the DSN, without credentials (for messages)."""
        try:
            info = conninfo_to_dict(self.dsn)
        except psycopg.Error:
            return "the configured server"
        host = info.get("host") or info.get("hostaddr") or "localhost"
        return f"{host}:{info.get('port') or 5432}/{info.get('dbname') or info.get('user') or ''}"

    def side_by_side(self, group: str, incarnations: Mapping[str, str]) -> SideBySide:
        """A connection of its own, async (psycopg's ``AsyncConnection``): its round trips
        never stop the App's event loop."""
        return _PostgresSideBySide(self, group, incarnations)

    def _refused(self, error: psycopg.OperationalError) -> ServiceError | _DownError:
        """A failed connect: the server's refusal for good (wrong user, password, database),
        or a server that is away just now (retried)."""
        text = str(error)
        if "FATAL" in text and not any(t in text for t in _TRANSIENT_REFUSALS):
            return ServiceError(
                f"PostgreSQL at {self.where} refused the connection ({text.strip()}); check "
                "the DSN (user, password, database)"
            )
        return _DownError(text.strip())

    def _unreachable(self, error: BaseException) -> SinkUnreachableError:
        return SinkUnreachableError(
            f"cannot reach PostgreSQL at {self.where} ({error}); kept trying for "
            f"{self.reconnect_timeout_s:g}s. Nothing was written. Check that the server runs "
            "and is reachable, then start again (or raise reconnect_timeout_s)."
        )

    def _connect_once(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._discard(self._conn)
        try:
            self._conn = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s
            )
        except psycopg.OperationalError as e:
            refusal = self._refused(e)
            if isinstance(refusal, ServiceError):
                raise refusal from None
            raise refusal from e
        return self._conn

    def _begin(self) -> psycopg.Connection[Any]:
        """A connection with a transaction begun on it. A connection found dead here is
        replaced: nothing had been done on it yet."""
        conn = self._conn
        if conn is not None and not conn.closed:
            try:
                conn.execute("BEGIN")
                return conn
            except psycopg.Error as e:
                if not connection_lost(conn, e):
                    raise
                self._discard(conn)

        def attempt() -> psycopg.Connection[Any]:
            conn = self._connect_once()
            try:
                conn.execute("BEGIN")
            except psycopg.Error as e:
                if not connection_lost(conn, e):
                    raise
                self._discard(conn)
                raise _DownError(str(e).strip()) from e
            return conn

        retrying = Retrying(
            stop=stop_after_delay(self.reconnect_timeout_s),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            retry=retry_if_exception_type(_DownError),
            before_sleep=lambda state: log.warning(
                "PostgreSQL at %s unavailable (%s); connecting again",
                self.where,
                state.outcome.exception() if state.outcome else "?",
            ),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _DownError as e:
            raise self._unreachable(e) from None

    def _discard(self, conn: psycopg.Connection[Any] | None) -> None:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        if conn is self._conn:
            self._conn = None

    @contextlib.contextmanager
    def transaction(
        self, group: str | None = None, incarnations: Mapping[str, str] | None = None
    ) -> Iterator[SinkTransaction]:
        conn = self._begin()
        tx = _PostgresTransaction(self, conn, group, incarnations)
        try:
            yield tx
        except BaseException as e:
            tx.ended = True
            if tx.lost is None and connection_lost(conn, e):
                tx.lose(e)
            if tx.lost is None:
                try:
                    conn.execute("ROLLBACK")
                except psycopg.Error:
                    self._discard(conn)  # the server rolls back what a lost connection held
            elif not isinstance(e, SinkUnavailableError):
                raise SinkUnavailableError(tx.lost) from e
            raise
        tx.ended = True
        if tx.lost is None and conn.closed:  # broken under the raw connection, before COMMIT
            tx.lose(psycopg.OperationalError("the connection broke before COMMIT"))
        if tx.lost is not None:  # a handler caught the error and carried on: never commit
            raise SinkUnavailableError(tx.lost)
        if conn.info.transaction_status != TransactionStatus.INTRANS:
            # Ended or aborted under us (a raw COMMIT/ROLLBACK through the connection, an
            # error swallowed outside any savepoint): what it held is not ours to commit.
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            raise SinkUnavailableError(_not_open_text(self.where))
        try:
            done = conn.execute("COMMIT").statusmessage
        except psycopg.Error as e:
            if conflicted(e):
                raise SinkUnavailableError(_conflict_text(self.where, e)) from e
            if not connection_lost(conn, e):
                raise  # the server refused the commit (a deferred constraint): rolled back
            self._discard(conn)
            raise SinkCommitUnknownError(_commit_unknown_text(self.where, e)) from e
        if done != "COMMIT":  # the server had aborted it (an error swallowed): rolled back
            raise SinkUnavailableError(_rolled_back_text(self.where, done))

    def _setup_lock(self, tx: SinkTransaction) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(hashtext('assured.sinks.setup'))")

    def _columns(self, tx: SinkTransaction, table: str) -> set[str]:
        rows = tx.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s",
            (table,),
        ).fetchall()
        return {r[0] for r in rows}

    def close(self) -> None:
        self._discard(self._conn)


def _gone(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether the server has already closed ``conn`` (its backend ended while the transaction
    sat open: a timeout, an administrator, a restart), read without waiting: a COMMIT sent on
    it would fail with an outcome that looks unknown, though nothing of it can have landed."""
    if conn.closed:
        return True
    pgconn = conn.pgconn
    try:
        # Twice: a server that ends the backend sends its reason first (which libpq keeps as
        # a notice), then closes the socket, and one read may stop between the two.
        pgconn.consume_input()
        pgconn.consume_input()
    except psycopg.OperationalError:
        return True
    return pgconn.status != ConnStatus.OK


class Result:
    """What an awaited ``db.execute`` returns on PostgreSQL side by side: the statement's rows,
    already read, behind the plain cursor's calls (``fetchone()``, ``fetchall()``,
    ``fetchmany()``, iteration, ``rowcount``, ``description``, ``statusmessage``), so a
    handler reads results the same way on SQLite and PostgreSQL."""

    __slots__ = ("_at", "_described", "_description", "_rows", "rowcount", "statusmessage")

    def __init__(
        self,
        rows: list[Any],
        rowcount: int,
        description: Any,
        statusmessage: str | None,
        described: tuple[pq.abc.PGresult, psycopg.AsyncConnection[Any]] | None = None,
    ):
        self._rows = rows
        self._at = 0
        self.rowcount = rowcount
        self._description = description
        self._described = described  # the description, made when asked for
        self.statusmessage = statusmessage

    @classmethod
    async def of(cls, cursor: psycopg.AsyncCursor[Any]) -> Result:
        rows = await cursor.fetchall() if cursor.description is not None else []
        return cls(rows, cursor.rowcount, cursor.description, cursor.statusmessage)

    @classmethod
    def of_result(
        cls, result: pq.abc.PGresult, conn: psycopg.AsyncConnection[Any], rows: list[Any]
    ) -> Result:
        """From a result read straight off libpq (see ``_pg_wire``), as psycopg's cursor
        would have given it: ``rowcount`` the rows returned or affected (-1 when neither)."""
        status = result.command_status
        if result.status == pq.ExecStatus.TUPLES_OK:
            count = result.ntuples
        else:
            tuples = result.command_tuples
            count = tuples if tuples is not None else -1
        return cls(rows, count, None, status.decode() if status else None, (result, conn))

    @property
    def description(self) -> Any:
        if self._described is not None:
            result, conn = self._described
            self._described = None
            if result.nfields or result.status == pq.ExecStatus.TUPLES_OK:
                fields = _Fields(result, conn)
                columns = range(result.nfields)
                self._description = [psycopg.Column(cast(Any, fields), i) for i in columns]
        return self._description

    def fetchone(self) -> Any:
        if self._at >= len(self._rows):
            return None
        self._at += 1
        return self._rows[self._at - 1]

    def fetchmany(self, size: int = 1) -> list[Any]:
        rows = self._rows[self._at : self._at + size]
        self._at += len(rows)
        return rows

    def fetchall(self) -> list[Any]:
        rows = self._rows[self._at :]
        self._at = len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class _Fields:
    """What psycopg's ``Column`` reads of a cursor (its result, encoding and types): the
    columns of a result read straight off libpq, described as psycopg describes them (a test
    compares the two)."""

    __slots__ = ("_encoding", "adapters", "pgresult")

    def __init__(self, result: pq.abc.PGresult, conn: psycopg.AsyncConnection[Any]):
        self.pgresult = result
        self._encoding = conn.info.encoding
        self.adapters = conn.adapters


class _PostgresSideBySide(SideBySide):
    """A connection of its own for records side by side, async (``psycopg.AsyncConnection``),
    with the sync transaction's rules: a lost connection is the sink's failure
    (:class:`SinkUnavailableError`; at COMMIT, :class:`SinkCommitUnknownError`), a statement
    swallowed in a record's part fails that record, and nothing commits that was ended or
    aborted under it. A call cancelled half-way leaves the connection in an unknown state: it
    counts as lost (its transaction never commits)."""

    sink: PostgresSink

    def __init__(self, sink: PostgresSink, group: str, incarnations: Mapping[str, str]):
        super().__init__(sink, group, incarnations)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._literals: psycopg.AsyncClientCursor[Any] | None = None  # merges parameters in
        self._wire: Wire | None = None  # the hot path's reader on the connection's socket
        self._open = False
        self.lost: str | None = None
        self._cuts = 0  # abandon() calls: one during a begin() keeps the new transaction lost
        self._beginning = asyncio.Lock()
        # A savepoint whose statements, and all after them, are to be undone before the
        # connection's next use (records whose first statements a batch ran for them, and who
        # will not have them: see ``runtime._shared_db``).
        self._undo_first: str | None = None
        self._literal_texts: dict[str, str] = {}  # topics and the group, quoted (commit_marked)

    batches = True

    @property
    def in_transaction(self) -> bool:
        return self._open

    def call_under_way(self) -> bool:
        conn = self._conn
        return self._beginning.locked() or (conn is not None and conn.lock.locked())

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(
                self.sink.dsn, autocommit=True, connect_timeout=self.sink.connect_timeout_s
            )
        except psycopg.OperationalError as e:
            refusal = self.sink._refused(e)
            if isinstance(refusal, ServiceError):
                raise refusal from None
            raise refusal from e

    async def begin(self) -> None:
        """BEGIN, on a connection made (or made again) if need be, retrying a server that is
        away with backoff for up to the sink's ``reconnect_timeout_s``. One at a time: a
        record cut off while in here (see RecordDb.cut_off) may still be in it when the next
        record begins on the connection, and must not end after it (its generation, its
        undo forgotten)."""
        async with self._beginning:
            await self._begin()

    async def _begin(self) -> None:
        deadline = time.monotonic() + self.sink.reconnect_timeout_s
        pause = 0.05
        cut = self._cuts
        self._unwire()
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await self._connect()
                await self._conn.execute("BEGIN")
                break
            except (_DownError, psycopg.Error) as e:
                if isinstance(e, psycopg.Error) and not connection_lost(self._conn, e):
                    raise
                await self._discard()
                if time.monotonic() + pause > deadline:
                    raise self.sink._unreachable(e) from None
                log.warning(
                    "PostgreSQL at %s unavailable (%s); connecting again", self.sink.where, e
                )
                await asyncio.sleep(pause)
                pause = min(2.0, pause * 2)
        self._open = True
        if self._cuts == cut:  # else abandoned meanwhile: this transaction must not commit
            self.lost = None
        self._undo_first = None
        self.generation += 1

    def _lose(self, error: BaseException) -> NoReturn:
        if self.lost is None:
            self.lost = _lost_text(self.sink.where, error)
        raise SinkUnavailableError(self.lost) from error

    def _unwire(self) -> None:
        """psycopg is to use the connection: the hot path's reader leaves its socket."""
        if self._wire is not None:
            self._wire.detach()

    def _broken(self) -> bool:
        return self._wire is not None and self._wire.broken

    async def _run(
        self, call: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], wired: bool = False
    ) -> T:
        if self.lost is not None:
            raise SinkUnavailableError(self.lost)
        conn = self._conn
        assert conn is not None, "no transaction is open"
        assert self._open, "no transaction is open"
        if self._undo_first is not None:
            await self._take_back()
        if not wired:
            self._unwire()
        try:
            return await call(conn)
        except psycopg.Error as e:
            if connection_lost(conn, e) or self._broken():
                self._lose(e)
            if conflicted(e) and record_part.get() is RUNTIME:
                # The runtime's own statement (see _PostgresTransaction._run): the
                # transaction's failure, and its records are handled again.
                raise SinkUnavailableError(_conflict_text(self.sink.where, e)) from e
            raise
        except asyncio.CancelledError:
            # psycopg cancels the statement on the server and waits for it to end, leaving
            # the transaction aborted: the record's savepoint undoes it (cancelled before its
            # savepoint was taken, the undo fails, and the window's transaction rolls back:
            # nothing of it commits); when it could not, it closed the connection. A call on
            # the wire (see _pg_wire) is left half-way: the connection is lost (dropped at the
            # step's commit, whose transaction then never commits), and its statement is
            # cancelled on the server, so that it holds no lock meanwhile.
            if (
                conn.closed
                or conn.pgconn.pipeline_status != pq.PipelineStatus.OFF
                or self._broken()
            ):
                self._cut_short()
            if self._broken():
                with contextlib.suppress(Exception):
                    await conn.cancel_safe(timeout=5)
            raise
        except BaseException:
            if self._broken():  # a call on the wire cut short otherwise
                self._cut_short()
            raise

    def undo_later(self, savepoint: str) -> None:
        """Undo ``savepoint`` and every statement after it before the next call or COMMIT."""
        if self._undo_first is None:
            self._undo_first = savepoint

    async def _take_back(self) -> None:
        """The undo :meth:`undo_later` asked for, if any; a failed one loses the connection,
        so that its transaction never commits statements that were to be undone."""
        savepoint, self._undo_first = self._undo_first, None
        if savepoint is None:
            return
        try:
            await self._undo(savepoint)
        except psycopg.Error as e:
            self._lose(e)
        except BaseException:  # cancelled: whether the undo landed is not known
            self._cut_short()
            raise

    def abandon(self) -> None:
        self._cut_short()

    def _cut_short(self) -> None:
        self._cuts += 1
        if self.lost is None:
            self.lost = (
                f"a call to PostgreSQL at {self.sink.where} was cancelled half-way and "
                "could not be stopped cleanly: the connection is dropped, its transaction "
                "rolled back"
            )

    async def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] = (),
        savepoint: str | None = None,
    ) -> Result:
        if savepoint is not None and self._conn is not None and wire_statement(sql):
            merged = self._merged(self._conn, savepoint, sql, params)
            if merged is not None:  # the hot path: one message, read straight off libpq
                try:
                    return await self._run(lambda conn: self._wired(conn, merged, sql), wired=True)
                except psycopg.Error as e:
                    _second_statement(e, sql)
                    raise

        async def one(conn: psycopg.AsyncConnection[Any]) -> Result:
            if savepoint is None and (params or one_statement(sql)):
                return await Result.of(await conn.execute(sql, params))
            if savepoint is None:
                async with conn.pipeline():  # the extended protocol: see _second_statement
                    cursor = await conn.execute(sql, params)
                return await Result.of(cursor)
            merged = self._merged(conn, savepoint, sql, params)
            if merged is not None:  # one message, two statements: half the CPU of a pipeline
                cursor = await conn.execute(merged, prepare=False)
                cursor.nextset()
                return await Result.of(cursor)
            async with conn.pipeline():  # one round trip for the two (its end waits for both)
                await conn.execute(f"SAVEPOINT {savepoint}")
                cursor = await conn.execute(sql, params)
            return await Result.of(cursor)

        try:
            return await self._run(one)
        except psycopg.Error as e:
            _second_statement(e, sql)
            raise

    async def _wired(self, conn: psycopg.AsyncConnection[Any], query: str, sql: str) -> Result:
        """``query`` (a savepoint and ``sql``, see _merged) sent straight on libpq."""
        results = await self._send(conn, query)
        if results and results[0].status == pq.ExecStatus.FATAL_ERROR:
            self._refused_whole([sql], results[0], conn)
        result = checked(results, conn.info.encoding)
        return Result.of_result(result, conn, loaded_rows(result, conn))

    async def _send(self, conn: psycopg.AsyncConnection[Any], query: str) -> list[Any]:
        wire = self._wire
        if wire is None or wire.conn is not conn:
            self._unwire()
            wire = self._wire = Wire(conn)
        async with conn.lock:  # psycopg's own turn on the connection
            return await wire.run(query.encode(conn.info.encoding))

    def _refused_whole(
        self, sqls: list[str], result: Any, conn: psycopg.AsyncConnection[Any]
    ) -> NoReturn:
        """The first savepoint of a message failed, so none of it ran (a statement in it does
        not parse: PostgreSQL parses a message whole first), and the transaction is aborted
        with no savepoint of the record's to go back to: the sink's failure (the records in
        flight are redone). ``sqls``, known to be at fault, go in a pipeline from then on;
        with none known (a batch), :class:`BatchRefusedError` says to send them alone."""
        error = psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
        unparsed = (error.sqlstate or "").startswith("42")  # syntax error, or access rule
        if unparsed:
            if len(self.sink.refused_whole) > 1000:
                self.sink.refused_whole.clear()
            self.sink.refused_whole.update(sqls)
        self.lost = (
            f"PostgreSQL at {self.sink.where} refused a message of records' statements whole "
            f"({type(error).__name__}: {error}); the transaction is rolled back and its "
            "records redone"
            + (", the statement at fault in a message of its own" if unparsed else "")
        )
        if unparsed and not sqls:
            raise BatchRefusedError(self.lost) from error
        raise SinkUnavailableError(self.lost) from error

    def first_text(
        self, savepoint: str, sql: str, params: Sequence[Any] | Mapping[str, Any]
    ) -> str | None:
        """A record's savepoint and first statement as one piece of a batch's message (see
        :meth:`execute_firsts`), or None when it cannot go in one."""
        conn = self._conn
        if conn is None or not self._open or not batch_statement(sql):
            return None
        return self._merged(conn, savepoint, sql, params)

    async def execute_firsts(
        self, pieces: Sequence[tuple[str, str]]
    ) -> tuple[Result, list[Result]]:
        """Records' savepoints and first statements (``(savepoint, first_text)``, in order) in
        one message: the first record's result (its error raised, as :meth:`execute` raises
        it: then none of the others ran), and the results of the others that ran, in order.
        When one of them failed, it and those after it are undone at once (they go again
        later, on their own turn, and the error is met by its own record); so the results
        returned are of statements that stand."""
        texts = [text for _, text in pieces]
        count = len(texts)

        async def send(conn: psycopg.AsyncConnection[Any]) -> list[Any]:
            # Each piece on lines of its own: a comment closing one statement ends there.
            results = await self._send(conn, "\n;\n".join(texts))
            if results and results[0].status == pq.ExecStatus.FATAL_ERROR:
                self._refused_whole([], results[0], conn)  # whose statement: not known
            checked(results[:2], conn.info.encoding)  # the first record's error: its own
            if len(results) > 2 * count or (
                len(results) < 2 * count
                and not any(r.status == pq.ExecStatus.FATAL_ERROR for r in results)
            ):  # which statement ran is not known: nothing of the transaction may commit
                self._lose(
                    psycopg.InterfaceError(
                        f"{len(results)} results from PostgreSQL for {count} savepoints and "
                        "statements in one message"
                    )
                )
            return results

        try:
            results = await self._run(send, wired=True)
        except psycopg.Error as e:
            _second_statement(e, texts[0])
            raise
        conn = self._conn
        assert conn is not None
        stood: list[Result] = []
        try:
            encoding = conn.info.encoding
            head = Result.of_result(results[1], conn, loaded_rows(results[1], conn))
            for i in range(1, count):
                pair = results[2 * i : 2 * i + 2]
                if len(pair) < 2 or any(r.status == pq.ExecStatus.FATAL_ERROR for r in pair):
                    if pair:  # its savepoint, or more, ran: undone before anything else
                        self.undo_later(pieces[i][0])
                        await self._take_back()
                    break
                checked(pair, encoding)
                stood.append(Result.of_result(pair[1], conn, loaded_rows(pair[1], conn)))
        except SinkUnavailableError:
            raise
        except asyncio.CancelledError:  # while undoing: which of them stand is not known
            self._cut_short()
            raise
        except Exception as e:  # a result not read: which of them stand is not known
            self._lose(e)
        return head, stood

    def _merged(
        self,
        conn: psycopg.AsyncConnection[Any],
        savepoint: str,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any],
    ) -> str | None:
        """``SAVEPOINT s; <sql>`` with the parameters merged in (psycopg's client-side
        binding, quoting for this connection), when ``sql`` is surely one statement (see
        :func:`one_statement`) and every parameter has a literal form; else None: the two go
        in a pipeline, where the server itself refuses a second statement. One difference
        shows: a column that is a bare value, unnamed as a parameter (``?column?``), is
        named by its literal's cast (``int8``, ``date``) in ``description``."""
        if not one_statement(sql) or not _literal_kinds(params) or sql in self.sink.refused_whole:
            return None
        if self._literals is None or self._literals.connection is not conn:
            self._literals = psycopg.AsyncClientCursor(conn)
            self._literals.adapters.register_dumper(int, _TypedInt)
            self._literals.adapters.register_dumper(float, _TypedFloat)
        try:  # the statement alone: psycopg keeps its parse, which a savepoint name defeats
            return f"SAVEPOINT {savepoint}; " + self._literals.mogrify(sql, params)
        except (psycopg.Error, TypeError, ValueError, LookupError):
            return None  # the pipeline's server-side binding says what is wrong, or copes

    async def mark_done(self, records: Sequence[tuple[str, int, int]]) -> None:
        """One statement over arrays: executemany's pipeline cost more CPU than the rows."""
        if not records:
            return
        topics, partitions, offsets = (list(column) for column in zip(*records, strict=True))

        async def mark(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(_MARK_ALL, (self.group, topics, partitions, offsets))

        await self._run(mark)

    async def store_positions(
        self,
        marks: Sequence[tuple[str, int, int]],
        positions: Sequence[tuple[TopicPartition, int | None, int]],
    ) -> TopicPartition | None:
        """All of it in one statement (one round trip, where a statement a partition took
        up to nine on the App's busy thread)."""
        wanted = sorted(positions)
        columns = (
            [tp.topic for tp, _, _ in wanted],
            [tp.partition for tp, _, _ in wanted],
            [position for _, position, _ in wanted],
            [epoch for _, _, epoch in wanted],
        )
        done = (list(column) for column in zip(*marks, strict=True)) if marks else ([], [], [])
        group = self.group

        async def store(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, int]]:
            cursor = await conn.execute(
                _STORE_POSITIONS, (*columns, group, group, group, group, *done)
            )
            return [(topic, partition) for topic, partition in await cursor.fetchall()]

        stored = set(await self._run(store))
        for tp, _, _ in wanted:
            if (tp.topic, tp.partition) not in stored:
                return tp
        return None

    async def fence_and_mark(
        self, epochs: Sequence[tuple[TopicPartition, int]], marks: Sequence[tuple[str, int, int]]
    ) -> TopicPartition | None:
        """The fences and the marks in one statement (one round trip for a connection's
        commit, however many partitions its records came from)."""
        wanted = sorted(epochs)
        fences = (
            [tp.topic for tp, _ in wanted],
            [tp.partition for tp, _ in wanted],
            [epoch for _, epoch in wanted],
        )
        done = (list(column) for column in zip(*marks, strict=True)) if marks else ([], [], [])

        async def check(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, int]]:
            cursor = await conn.execute(_FENCE_AND_MARK, (*fences, self.group, self.group, *done))
            return [(topic, partition) for topic, partition in await cursor.fetchall()]

        held = set(await self._run(check))
        for tp, _ in wanted:
            if (tp.topic, tp.partition) not in held:
                return tp
        return None

    async def commit_marked(
        self, epochs: Sequence[tuple[TopicPartition, int]], marks: Sequence[tuple[str, int, int]]
    ) -> TopicPartition | None:
        """The fences, the marks and the bounded COMMIT in one message, straight on libpq:
        one round trip and no psycopg cursor for a connection's commit, on the App's busy
        thread. A partition claimed by another fails the fences' statement, which names it,
        so the COMMIT never runs; that partition is returned, the transaction rolled back.
        Raises as :meth:`commit` does; a connection lost once the message is sent leaves the
        outcome unknown (:class:`SinkCommitUnknownError`)."""
        conn = self._conn
        wanted = sorted(epochs)
        try:
            conn = await self._committable()
            query = _FENCE_MARK_COMMIT.format(
                fences=self._arrays(conn, wanted), group=self._quoted(conn, self.group),
                marks=self._marks(conn, marks), wanted=len(wanted), wait=_COMMIT_WAIT_MS,
            )  # fmt: skip
            try:
                results = await self._send(conn, query)
            except psycopg.Error as e:  # the message went out: COMMIT may have run
                raise SinkCommitUnknownError(_commit_unknown_text(self.sink.where, e)) from e
            except asyncio.CancelledError:
                # The server goes on with the message: stopped on it (a fence waiting for a
                # claim's lock then fails, and COMMIT never runs), the connection dropped.
                # Whether a COMMIT already under way landed, only the database says.
                self._cut_short()
                with contextlib.suppress(Exception):
                    await conn.cancel_safe(timeout=5)
                raise
            if len(results) != 3 or results[0].status == pq.ExecStatus.FATAL_ERROR:
                at = await self._fences_failed(conn, results)  # raises, unless fenced
                self._open = False
                if not 0 < at <= len(wanted):  # never names one of ours by mistake
                    raise psycopg.InterfaceError(f"a fence failed at {at} of {len(wanted)}")
                return wanted[at - 1][0]
            try:
                checked(results[1:], conn.info.encoding)
            except psycopg.Error as e:
                self._commit_failed(conn, e, bounded=True)
            done = results[2].command_status
            if done != b"COMMIT":  # the server had aborted it (an error swallowed)
                raise SinkUnavailableError(
                    _rolled_back_text(self.sink.where, done.decode() if done else None)
                )
        except BaseException:
            await self._commit_over(conn)
            raise
        self._open = False
        return None

    async def _fences_failed(self, conn: psycopg.AsyncConnection[Any], results: list[Any]) -> int:
        """The fences' statement of :meth:`commit_marked` failed (so the COMMIT never ran):
        when a partition was claimed by another, its place (from 1) among those given, the
        transaction rolled back; else raises what happened, as :meth:`_run` would."""
        try:
            checked(results[:1], conn.info.encoding)
        except psycopg.Error as e:
            fenced_at = _FENCED_AT.search(str(e)) if e.sqlstate == "22P02" else None
            if fenced_at is not None:
                await self._quietly_roll_back()
                return int(fenced_at.group(1))
            if connection_lost(conn, e):
                self._lose(e)
            if conflicted(e):
                raise SinkUnavailableError(_conflict_text(self.sink.where, e)) from e
            raise
        raise psycopg.InterfaceError(  # which of it ran is not known: nothing of it commits
            f"{len(results)} results from PostgreSQL for a commit's 3 statements"
        )

    def _quoted(self, conn: psycopg.AsyncConnection[Any], text: str) -> str:
        """``text`` as a literal for ``conn`` (kept: a window's topics and group are few)."""
        quoted = self._literal_texts.get(text)
        if quoted is None:
            encoding = conn.info.encoding
            quoted = pq.Escaping(conn.pgconn).escape_literal(text.encode(encoding)).decode(encoding)
            if len(self._literal_texts) > 1000:
                self._literal_texts.clear()
            self._literal_texts[text] = quoted
        return quoted

    def _arrays(
        self, conn: psycopg.AsyncConnection[Any], rows: Sequence[tuple[TopicPartition, int]]
    ) -> str:
        """The fences' three arrays (topics, partitions, epochs) as literals."""
        topics = ",".join(self._quoted(conn, tp.topic) for tp, _ in rows)
        partitions = ",".join(str(int(tp.partition)) for tp, _ in rows)
        epochs = ",".join(str(int(epoch)) for _, epoch in rows)
        return f"ARRAY[{topics}]::text[], '{{{partitions}}}'::int[], '{{{epochs}}}'::bigint[]"

    def _marks(
        self, conn: psycopg.AsyncConnection[Any], marks: Sequence[tuple[str, int, int]]
    ) -> str:
        """The marks' three arrays (topics, partitions, offsets) as literals."""
        topics = ",".join(self._quoted(conn, topic) for topic, _, _ in marks)
        partitions = ",".join(str(int(partition)) for _, partition, _ in marks)
        offsets = ",".join(str(int(offset)) for _, _, offset in marks)
        return f"ARRAY[{topics}]::text[], '{{{partitions}}}'::int[], '{{{offsets}}}'::bigint[]"

    async def plain(self, savepoint: str | None) -> SinkTransaction:
        raise UsageError(
            "db.hold() gives a plain transaction only on SQLite; on PostgreSQL records side by "
            "side use async connections: await db.execute(...) instead"
        )

    async def end_region(self, savepoint: str, error: BaseException | None) -> None:
        if error is not None:
            if self.lost is None and self._conn is not None and connection_lost(self._conn, error):
                self.lost = _lost_text(self.sink.where, error)
            if self.lost is not None:  # whatever the handler made of it, it is the sink's
                if isinstance(error, SinkUnavailableError):
                    return
                raise SinkUnavailableError(self.lost) from error
            await self._undo(savepoint)
            return
        if self.lost is not None:
            raise SinkUnavailableError(self.lost)
        conn = self._conn
        assert conn is not None
        status = conn.info.transaction_status
        if status == TransactionStatus.IDLE:  # ended in here (a raw COMMIT or ROLLBACK)
            self._lose(psycopg.OperationalError("the transaction was ended inside a handler"))
        if status == TransactionStatus.INERROR:
            await self._undo(savepoint)  # only this record's part (see the sync savepoint)
            raise SwallowedStatementError(_SWALLOWED)

    async def _undo(self, savepoint: str) -> None:
        async def undo(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.pipeline():
                await conn.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
                await conn.execute(f"RELEASE SAVEPOINT {savepoint}")

        await self._run(undo)

    def _commit_failed(
        self, conn: psycopg.AsyncConnection[Any], e: psycopg.Error, bounded: bool
    ) -> NoReturn:
        """What a COMMIT that failed with ``e`` raises."""
        state = getattr(e, "sqlstate", None)
        if bounded and state in ("55P03", "40P01"):  # lock_not_available, or a deadlock
            raise CommitWaitError(
                f"a commit on PostgreSQL at {self.sink.where} waited too long for a "
                f"lock, or in a deadlock ({type(e).__name__}: a deferred constraint's "
                "check?), and was rolled back; its records are handled again"
            ) from e
        if conflicted(e):  # SERIALIZABLE checks at COMMIT too: rolled back
            raise SinkUnavailableError(_conflict_text(self.sink.where, e)) from e
        if not connection_lost(conn, e):
            raise e  # the server refused the commit (a deferred constraint): rolled back
        raise SinkCommitUnknownError(_commit_unknown_text(self.sink.where, e)) from e

    async def _committable(self) -> psycopg.AsyncConnection[Any]:
        """The connection, its open transaction ready for COMMIT: pending undos done; raises
        when it was lost, broke, or the transaction was ended or aborted under it (rolled
        back for sure)."""
        if self.lost is not None:
            raise SinkUnavailableError(self.lost)
        conn = self._conn
        assert conn is not None, "no transaction is open"
        assert self._open, "no transaction is open"
        await self._take_back()  # statements of records that never had them, if any
        if _gone(conn):  # broken under it before COMMIT: rolled back for sure
            self._lose(psycopg.OperationalError("the connection broke before COMMIT"))
        if conn.info.transaction_status != TransactionStatus.INTRANS:
            raise SinkUnavailableError(_not_open_text(self.sink.where))
        return conn

    async def _commit_over(self, conn: psycopg.AsyncConnection[Any] | None) -> None:
        """A commit failed (or was cancelled): the transaction is over; a connection in an
        unknown state is dropped, one still in a transaction rolled back."""
        self._open = False
        if self.lost is not None or conn is None or conn.closed or self._broken():
            await self._discard()
        elif conn.info.transaction_status != TransactionStatus.IDLE:
            await self._quietly_roll_back()

    async def commit(self, bounded: bool = False) -> None:
        conn = self._conn
        try:
            conn = await self._committable()
            self._unwire()
            try:
                if bounded:  # our own two statements, in one message
                    cursor = await conn.execute(
                        f"SET LOCAL lock_timeout = {_COMMIT_WAIT_MS}; COMMIT", prepare=False
                    )
                    cursor.nextset()
                else:
                    cursor = await conn.execute("COMMIT")
                done = cursor.statusmessage
            except psycopg.Error as e:
                self._commit_failed(conn, e, bounded)
            if done != "COMMIT":  # the server had aborted it (an error swallowed)
                raise SinkUnavailableError(_rolled_back_text(self.sink.where, done))
        except BaseException:
            await self._commit_over(conn)
            raise
        self._open = False

    async def rollback(self, error: BaseException) -> None:
        self._undo_first = None
        if not self._open:
            return
        self._open = False
        if self.lost is not None or self._conn is None or self._conn.closed:
            await self._discard()  # the server rolls back what a lost connection held
            return
        await self._quietly_roll_back()

    async def _quietly_roll_back(self) -> None:
        assert self._conn is not None
        self._unwire()
        try:
            await self._conn.execute("ROLLBACK")
        except BaseException:
            await self._discard()

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        self._open = False
        self._undo_first = None
        self._unwire()
        self._wire = None
        if conn is not None:
            with contextlib.suppress(BaseException):
                await conn.close()

    async def close(self) -> None:
        await self._discard()
