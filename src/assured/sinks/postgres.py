"""A PostgreSQL database as a sink (psycopg 3): effects and offsets in one transaction.

A lost connection (the server restarted or crashed, the backend was terminated, the network
dropped) is the sink's failure, never the handler's: every statement, savepoint and commit of a
transaction turns it into :class:`SinkUnavailableError` (retriable; the transaction rolled back)
or, during COMMIT, :class:`SinkCommitUnknownError` (it may have committed: re-read the stored
offsets). The broken connection is dropped, and the next transaction connects again, retrying
with backoff for up to ``reconnect_timeout_s`` before :class:`SinkUnreachableError`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from assured.errors import ConfigError, ServiceError
from assured.sinks._base import (
    Sink,
    SinkCommitUnknownError,
    SinkTransaction,
    SinkUnavailableError,
    SinkUnreachableError,
    SwallowedStatementError,
    checked_schema,
    ddl,
    refuse_transaction_control,
)

__all__ = ["PostgresSink"]

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


def connection_lost(conn: psycopg.Connection[Any], error: BaseException) -> bool:
    """Whether ``error``, raised on ``conn``, means the connection is gone."""
    if conn.closed:
        return True
    state = getattr(error, "sqlstate", None) or ""
    return state.startswith(_LOST_PREFIXES) or state in _LOST_STATES


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

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        if self.lost is not None:
            raise SinkUnavailableError(self.lost)
        refuse_transaction_control(sql)
        try:
            return self._conn.execute(sql, params)
        except psycopg.Error as e:
            if connection_lost(self._conn, e):
                self.lose(e)
            raise

    def lose(self, error: BaseException) -> NoReturn:
        """The connection broke: drop it, and raise what every later call will raise too."""
        if self.lost is None:
            why = (
                f"{type(error).__name__}: {str(error).strip()}"
                if isinstance(error, psycopg.Error)
                else "found closed"
            )
            self.lost = (
                f"lost the connection to PostgreSQL at {self.sink.where} during a transaction "
                f"({why}). The transaction was rolled back: nothing of it was committed. The "
                "next transaction reconnects."
            )
            self.sink._discard(self._conn)
        raise SinkUnavailableError(self.lost) from error

    @property
    def connection(self) -> psycopg.Connection[Any]:
        return self._conn

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
            raise
        status = self._conn.info.transaction_status
        if status == TransactionStatus.IDLE:  # ended in here (a raw COMMIT or ROLLBACK)
            self.lose(psycopg.OperationalError("the transaction was ended inside a handler"))
        if status == TransactionStatus.INERROR:
            # A statement failed in here and the code went on: PostgreSQL refuses everything
            # until the transaction ends, and its COMMIT would roll it all back. Undo this part
            # only, and make it the caller's failure, not a silent loss of the whole batch.
            self.execute(f"ROLLBACK TO SAVEPOINT {name}")
            self.execute(f"RELEASE SAVEPOINT {name}")
            raise SwallowedStatementError(
                "a statement failed inside the handler and the handler went on; PostgreSQL "
                "then refuses every statement of the transaction, so the record's work was "
                "rolled back and the record failed. Let the error propagate (it is retried, "
                "then dead-lettered), or check before writing (INSERT ... ON CONFLICT DO "
                "NOTHING instead of catching a unique violation)."
            )
        if release:
            self.execute(f"RELEASE SAVEPOINT {name}")


class PostgresSink(Sink):
    """Effects in the PostgreSQL database at ``dsn`` (``postgresql://user@host:port/db``).

    ``reconnect_timeout_s``: how long a transaction keeps trying to (re)connect, with backoff,
    before giving up with :class:`SinkUnreachableError`."""

    placeholder = "%s"
    _ddl = ddl("id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "BYTEA")

    def __init__(
        self,
        dsn: str,
        reconnect_timeout_s: float = 30.0,
        connect_timeout_s: int = 5,
        schema: str | Iterable[str] = (),
    ):
        self.schema = checked_schema(schema)
        if reconnect_timeout_s < 0:
            raise ConfigError(f"reconnect_timeout_s={reconnect_timeout_s!r}: seconds, 0 or more")
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

    def _connect_once(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._discard(self._conn)
        try:
            self._conn = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s
            )
        except psycopg.OperationalError as e:
            text = str(e)
            if "FATAL" in text and not any(t in text for t in _TRANSIENT_REFUSALS):
                raise ServiceError(
                    f"PostgreSQL at {self.where} refused the connection ({text.strip()}); check "
                    "the DSN (user, password, database)"
                ) from None
            raise _DownError(text.strip()) from e
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
            raise SinkUnreachableError(
                f"cannot reach PostgreSQL at {self.where} ({e}); kept trying for "
                f"{self.reconnect_timeout_s:g}s. Nothing was written. Check that the server runs "
                "and is reachable, then start again (or raise reconnect_timeout_s)."
            ) from None

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
        if tx.lost is None and conn.closed:  # broken under the raw connection, before COMMIT
            tx.lose(psycopg.OperationalError("the connection broke before COMMIT"))
        if tx.lost is not None:  # a handler caught the error and carried on: never commit
            raise SinkUnavailableError(tx.lost)
        if conn.info.transaction_status != TransactionStatus.INTRANS:
            # Ended or aborted under us (a raw COMMIT/ROLLBACK through the connection, an
            # error swallowed outside any savepoint): what it held is not ours to commit.
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            raise SinkUnavailableError(
                f"the transaction on PostgreSQL at {self.where} was ended or aborted before "
                "the runtime's COMMIT (a raw COMMIT/ROLLBACK, or an error swallowed); nothing "
                "more of it commits, and the work is redone"
            )
        try:
            done = conn.execute("COMMIT").statusmessage
        except psycopg.Error as e:
            if not connection_lost(conn, e):
                raise  # the server refused the commit (a deferred constraint): rolled back
            self._discard(conn)
            raise SinkCommitUnknownError(
                f"lost the connection to PostgreSQL at {self.where} while committing "
                f"({type(e).__name__}: {str(e).strip()}): the transaction may or may not have "
                "committed. Re-read the stored offsets (Sink.stored_offsets) before redoing "
                "any of it: what they cover committed, effects included; the rest did not."
            ) from e
        if done != "COMMIT":  # the server had aborted it (an error swallowed): rolled back
            raise SinkUnavailableError(
                f"PostgreSQL at {self.where} rolled the transaction back at COMMIT ({done}): a "
                "statement inside it had failed and the error was swallowed. Nothing of it "
                "committed; the work is redone."
            )

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
