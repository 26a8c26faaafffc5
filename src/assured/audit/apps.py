"""``assured audit --app module:app``: the user's own App under the audit's faults.

The App runs as it is (its handlers, its codecs, its sink) in processes the audit kills; only
where it runs changes: the audit's log (a fresh embedded file unless ``--log``), a copy of a
SQLite sink's file, and per-process settings the faults need (transactional ids, timeouts).
What it is given comes from ``--input topic=FILE.jsonl`` (one record per line, ``{"key": ...,
"value": ..., "headers": {...}}``) or ``--input topic=module:function`` (a function returning
or yielding such dicts). A string goes out as its UTF-8 bytes, ``null`` as no value, any other
JSON value as its JSON text, so the App's own codecs read it.

Each input has an id: its position among all inputs (from 0), or with ``--id-field PATH`` the
field at that dotted path of its JSON value. The id travels in the record's ``assured.audit.id``
header (the App may ignore it; dead letters keep it). An *effect* is one row of
``--effects-sql`` (its first column: the id; run on the sink's database or ``--effects-db``) or
one record of ``--effects-topic`` (the id at ``--id-field`` in its JSON value). The App's
outcome for an input is its effects or its dead letter, and the verdict is judged against the
guarantee the App runs under, or the one ``--expect`` names (an at-least-once App whose effects
are made idempotent promises exactly-once effects).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assured.audit.checker import Effect, read_topic
from assured.audit.workload import Workload
from assured.errors import ConfigError
from assured.log import Header, Isolation, Log, Record, TopicPartition

__all__ = [
    "APP_FAULTS",
    "ID_HEADER",
    "AppTarget",
    "InputRecord",
    "effect_ids_from_sql",
    "effect_ids_from_topic",
    "load_app",
    "read_inputs",
]

ID_HEADER = "assured.audit.id"
READ_COMMITTED: Isolation = "read_committed"
# The runtime's own tables in a sink's database (see assured.sinks._base.ddl).
RUNTIME_TABLES = (
    "assured_offsets",
    "assured_inbox",
    "assured_inbox_v1",
    "assured_dead_letters",
    "assured_dead_letter_relays",
    "assured_done",
)
# Faults that need no help from the handler: the App's own code runs untouched, so the fates the
# audit's own handler acts out (handler-errors, slow-handler, zombie, disk-full) cannot be played.
APP_FAULTS = (
    "sigkill",
    "sigterm",
    "sigstop",
    "crash-points",
    "rebalance",
    "broker-kill",
    "write-stall",
    "db-restart",
    "stuck-coordinator",
)


@dataclass(frozen=True)
class InputRecord:
    topic: str
    id: str
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]
    where: str  # FILE:LINE or module:function#N, for messages
    refused: bool = False  # "expect": "dead-letter": the App must refuse it


@dataclass
class AppTarget:
    """What ``assured audit --app`` was asked (checked by :func:`AppTarget.check`)."""

    app: str  # module:attribute
    inputs: list[tuple[str, str]]  # (topic, FILE.jsonl or module:function)
    id_field: str | None = None
    effects_sql: str | None = None
    effects_topic: str | None = None
    effects_db: str | None = None  # a SQLite file or a postgresql:// DSN; default: the sink's
    expect: str | None = None  # the guarantee the effects must show; default: the App's
    use_postgres: bool = False
    folder: Path = field(default_factory=Path.cwd)  # where module:attribute is imported from

    def check(self) -> None:
        if not self.inputs:
            raise ConfigError(
                "--app needs input: --input topic=FILE.jsonl or --input topic=module:function"
            )
        if (self.effects_sql is None) == (self.effects_topic is None):
            raise ConfigError(
                '--app needs one way to count effects: --effects-sql "SELECT <id> FROM ..." '
                "(one row per effect) or --effects-topic TOPIC --id-field PATH"
            )
        if self.effects_topic is not None and not self.id_field:
            raise ConfigError(
                f"--effects-topic {self.effects_topic}: give --id-field PATH, the field of the "
                "input's JSON value its output carries too, so each output names its input"
            )
        if self.expect is not None and self.expect not in (
            "at-most-once",
            "at-least-once",
            "exactly-once",
        ):
            raise ConfigError(
                f"--expect {self.expect!r}: at-most-once, at-least-once or exactly-once"
            )


def load_app(spec: str, folder: Path) -> Any:
    """The App ``spec`` (``module:attribute``) names, imported from ``folder`` first."""
    from assured.runtime import App

    module_name, colon, attr = spec.partition(":")
    if (
        not colon
        or not attr.isidentifier()
        or not all(part.isidentifier() for part in module_name.split("."))
    ):
        raise ConfigError(f"--app {spec!r}: expected module:attribute (e.g. payments.app:app)")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name + ".").startswith(e.name + "."):
            raise ConfigError(
                f"--app {spec}: no module named {e.name!r} (looked in {folder} and on "
                "sys.path); run from the folder that holds it, or set PYTHONPATH"
            ) from None
        raise ConfigError(f"--app {spec}: importing {module_name!r} failed: {e}") from None
    except Exception as e:
        raise ConfigError(
            f"--app {spec}: importing {module_name!r} failed: {type(e).__name__}: {e}"
        ) from None
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        found = sorted(n for n, v in vars(module).items() if isinstance(v, App))
        raise ConfigError(
            f"--app {spec}: {attr!r} is not an assured App"
            + (f"; the module's Apps: {', '.join(found)}" if found else "")
        )
    if not app._specs:
        raise ConfigError(f"--app {spec}: the App has no handlers")
    return app


# -- input ---------------------------------------------------------------------------------------


def _bytes(value: Any, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    try:
        return json.dumps(value, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}: cannot be sent as JSON ({e})") from None


def _field(value: Any, path: str) -> Any:
    """The value at a dotted ``path`` of a decoded JSON object (KeyError when missing)."""
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(part)
    return value


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"--input: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--input: {path} is not UTF-8 text ({e.reason})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"--input: {path}:{n} is not JSON ({e.msg} at column {e.colno}); one record "
                'per line: {"key": ..., "value": ..., "headers": {...}}'
            ) from None


def _generated(spec: str, folder: Path) -> Iterator[tuple[str, Any]]:
    module_name, _, attr = spec.partition(":")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--input ...={spec}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"--input ...={spec}: not a function")
    try:
        for n, item in enumerate(fn()):
            yield f"{spec}#{n}", item
    except Exception as e:  # its own failure: said in one line, as a bad file would be
        raise ConfigError(
            f"--input ...={spec}: the function failed: {type(e).__name__}: {e}"
        ) from None


def read_inputs(
    inputs: list[tuple[str, str]], folder: Path, id_field: str | None
) -> list[InputRecord]:
    """Every input record, in order, with its id (see the module's docstring)."""
    out: list[InputRecord] = []
    seen: dict[str, str] = {}
    for topic, source in inputs:
        path = Path(source)
        if not path.is_absolute():
            path = folder / path
        is_function = ":" in source and not path.exists()
        items: Iterable[tuple[str, Any]] = (
            _generated(source, folder) if is_function else _read_jsonl(path)
        )
        for where, item in items:
            if not isinstance(item, dict) or not set(item) <= {"key", "value", "headers", "expect"}:
                raise ConfigError(
                    f"--input: {where}: expected an object with key, value, headers and expect "
                    f"(each optional), got {json.dumps(item, default=repr)[:120]}"
                )
            expect = item.get("expect", "effect")
            if expect not in ("effect", "dead-letter"):
                raise ConfigError(
                    f"--input: {where}: expect {expect!r}: effect (the default) or dead-letter "
                    "(an input the App must refuse)"
                )
            value = item.get("value")
            if id_field:
                try:
                    decoded = json.loads(value) if isinstance(value, str | bytes) else value
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise ConfigError(
                        f"--input: {where}: its value is not JSON, so it has no field "
                        f"{id_field!r} (--id-field)"
                    ) from None
                try:
                    mid = str(_field(decoded, id_field))
                except (KeyError, TypeError):
                    raise ConfigError(
                        f"--input: {where}: its value has no field {id_field!r} (--id-field)"
                    ) from None
            else:
                mid = str(len(out))
            if mid in seen:
                raise ConfigError(
                    f"--input: {where}: id {mid!r} was already given at {seen[mid]}; each input "
                    "needs its own id"
                )
            seen[mid] = where
            headers = item.get("headers") or {}
            if not isinstance(headers, dict):
                raise ConfigError(f"--input: {where}: headers must be an object of name: value")
            sent: list[Header] = [
                (str(k), _bytes(v, f"{where} header {k}")) for k, v in headers.items()
            ]
            sent.append((ID_HEADER, mid.encode()))
            out.append(
                InputRecord(
                    topic,
                    mid,
                    _bytes(item.get("key"), f"{where} key"),
                    _bytes(value, f"{where} value"),
                    tuple(sent),
                    where,
                    expect == "dead-letter",
                )
            )
    if not out:
        raise ConfigError("--input: no records in " + ", ".join(s for _, s in inputs))
    return out


# -- effects ------------------------------------------------------------------------------------


def effect_ids_from_sql(db: str, query: str) -> list[str]:
    """The first column of each row of ``query`` on ``db`` (a SQLite file or a DSN)."""
    try:
        if _is_dsn(db):
            import psycopg

            with psycopg.connect(db, connect_timeout=10) as pg:
                pg.read_only = True  # a count, never a change to the App's data
                rows = pg.execute(query).fetchall()
        else:
            uri = Path(db).resolve().as_uri() + "?mode=ro"  # never creates the file
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
                rows = conn.execute(query).fetchall()
    except Exception as e:
        raise ConfigError(f"--effects-sql failed on {_where(db)}: {type(e).__name__}: {e}") from e
    return [str(row[0]) for row in rows]


def effect_ids_from_topic(
    log: Log, topic: str, id_field: str, read: Callable[[Log, str], list[Record]]
) -> list[str]:
    """The id at ``id_field`` in each committed record of ``topic`` (``?partition@offset`` for a
    record without one: it counts as a stray effect)."""
    out = []
    for r in read(log, topic):
        try:
            out.append(str(_field(json.loads(r.value or b"null"), id_field)))
        except (KeyError, TypeError, ValueError):
            out.append(f"?{topic}[{r.partition}]@{r.offset}")
    return out


def _no_such_table(e: BaseException) -> bool:
    cause = e.__cause__
    if isinstance(cause, sqlite3.OperationalError):
        return "no such table" in str(cause)
    return type(cause).__name__ == "UndefinedTable"


def _copy_sqlite(source: Path, copy: Path) -> None:
    """``source`` (the App's file, opened read-only) into ``copy``, without the runtime's own
    state: its positions, inbox and dead letters there are an earlier run's, and would be taken
    for this one's. The App's own tables stay as they are."""
    try:
        src = sqlite3.connect(source.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.OperationalError:  # a WAL file whose -shm cannot be made read-only
        src = sqlite3.connect(source)
    with contextlib.closing(src), contextlib.closing(sqlite3.connect(copy)) as dst:
        src.backup(dst)
        for name in RUNTIME_TABLES:  # by name: an App's own table may start with assured_ too
            dst.execute(f"DROP TABLE IF EXISTS {name}")
        dst.commit()


def _is_dsn(db: str) -> bool:
    """A PostgreSQL connection string (a URL, or key=value pairs), not a SQLite file's path."""
    return db.startswith(("postgresql://", "postgres://")) or "dbname=" in db or "host=" in db


def _where(db: str) -> str:
    if _is_dsn(db):
        from assured._secrets import redact_url

        return redact_url(db)
    return db


# -- one audit of an App ------------------------------------------------------------------------


class AppPlan:
    """What the supervisor needs of the App under audit, learned by importing it once here:
    its guarantee, group, topics and sink; the copy of a SQLite sink's file; the input."""

    def __init__(self, target: AppTarget):
        from assured.sinks import PostgresSink, SqliteSink

        target.check()
        self.target = target
        self.app = load_app(target.app, target.folder)
        settings = self.app.settings
        self.guarantee: str = settings.guarantee
        self.group: str = settings.group
        specs = list(self.app._specs.values())
        self.inputs = [s.topic for s in specs]
        self.outputs = [s.output for s in specs if s.output]
        self.dead_letters = [s.dead_letter for s in specs if s.dead_letter]
        unknown = sorted({t for t, _ in target.inputs} - set(self.inputs))
        if unknown:
            raise ConfigError(
                f"--input {unknown[0]}=...: the App has no handler for {unknown[0]!r}; it reads "
                + ", ".join(map(repr, self.inputs))
            )
        internal = sorted(set(self.inputs) & {*self.outputs, *self.dead_letters})
        if internal:
            raise ConfigError(
                f"--app {target.app}: the App reads {internal[0]!r}, which it also writes; the "
                "audit counts an App's input as what it sends, so it audits one stage at a "
                "time: audit each stage as an App of its own"
            )
        if target.effects_topic is not None and target.effects_topic not in self.outputs:
            raise ConfigError(
                f"--effects-topic {target.effects_topic}: the App writes "
                + (", ".join(map(repr, self.outputs)) or "no topic")
            )
        sinks = {id(s.sink): s.sink for s in specs if s.sink is not None}
        if len(sinks) > 1:
            raise ConfigError(f"--app {target.app}: all handlers of one App share one sink")
        sink = next(iter(sinks.values()), None)
        if sink is not None and settings.guarantee == "exactly-once" and self.outputs:
            raise ConfigError(
                f"--app {target.app}: under exactly-once, an App writes either to topics or "
                "to one database, not both"
            )
        self.sink_kind = "topic"
        self.db = ""  # the database the runtime keeps its positions and dead letters in
        self.sink_path = ""  # the copy of a SQLite sink's file the processors write to
        self._sqlite_file: Path | None = None
        if isinstance(sink, SqliteSink):
            self.sink_kind = "sqlite"
            self._sqlite_file = sink.path
        elif isinstance(sink, PostgresSink):
            if not target.use_postgres:
                raise ConfigError(
                    "--app: the App's sink writes to PostgreSQL, and the audit would write effects "
                    "and positions into that database; point the App at a database for tests "
                    "and pass --use-postgres"
                )
            self.sink_kind = "postgres"
            self.db = sink.dsn
        elif sink is not None:
            raise ConfigError(f"--app: the audit knows SqliteSink and PostgresSink, not {sink!r}")
        self.effects_db = target.effects_db or self.db
        if target.effects_db and not _is_dsn(target.effects_db):
            self.effects_db = str((target.folder / target.effects_db).resolve())
        if target.effects_sql is not None and not (self.effects_db or self._sqlite_file):
            raise ConfigError(
                "--effects-sql: the App has no database sink to run it on; give --effects-db "
                "(a SQLite file or a postgresql:// DSN) where its effects land"
            )
        self.expect = target.expect or self.guarantee
        self.records = read_inputs(target.inputs, target.folder, target.id_field)

    def prepare(self, workdir: Path) -> None:
        """A SQLite sink's file is copied into ``workdir`` (its tables and rows as they are),
        and the processors write to the copy: the App's own file is never touched."""
        if self._sqlite_file is None:
            return
        self.sink_path = self.db = str(workdir / "sink.db")
        given = self.target.effects_db
        if given is None or Path(self.effects_db).resolve() == self._sqlite_file.resolve():
            self.effects_db = self.db  # the App's file: its copy is what the processors write
        if self._sqlite_file.exists():
            try:
                _copy_sqlite(self._sqlite_file, Path(self.sink_path))
            except sqlite3.Error as e:
                raise ConfigError(
                    f"the App's SQLite sink {self._sqlite_file} could not be read ({e}); is it "
                    "a SQLite database?"
                ) from None

    def effects_before(self, log: Log) -> None:
        """Refuse to start where earlier effects or positions would be taken for this run's."""
        exists = bool(self.effects_db) and (
            _is_dsn(self.effects_db) or Path(self.effects_db).exists()
        )
        if self.target.effects_sql is not None and exists:
            try:
                found = effect_ids_from_sql(self.effects_db, self.target.effects_sql)
            except ConfigError as e:
                if not _no_such_table(e):
                    raise
                found = []  # no table yet: the App makes it when it starts
            if found:
                raise ConfigError(
                    f"--effects-sql finds {len(found)} effects before the audit sent anything "
                    f"(in {_where(self.effects_db)}): an earlier run's? give the App a fresh "
                    "database"
                )
        if self.sink_kind == "postgres":
            import psycopg

            with psycopg.connect(self.db, autocommit=True) as pg:
                for table, what in (
                    ("assured_offsets", "positions"),
                    ("assured_inbox", "deliveries"),
                    ("assured_inbox_v1", "deliveries"),  # kept by message alone, any group
                    ("assured_dead_letters", "dead letters"),
                ):
                    where = "" if table == "assured_inbox_v1" else " WHERE group_id = %s"
                    params = () if table == "assured_inbox_v1" else (self.group,)
                    try:
                        row = pg.execute(
                            f"SELECT count(*) FROM {table}{where}",  # noqa: S608 -- our names
                            params,
                        ).fetchone()
                    except psycopg.errors.UndefinedTable:
                        continue
                    if row and row[0]:
                        raise ConfigError(
                            f"the App's database ({_where(self.db)}) holds {what} of group "
                            f"{self.group!r} from an earlier run, which this one would take for "
                            "its own; give the App a fresh database"
                        )
        with log.admin() as admin:
            existing = set(admin.list_topics())
            watched = [*self.inputs, *self.outputs, *self.dead_letters]
            for topic in [t for t in dict.fromkeys(watched) if t in existing]:
                for p in range(admin.describe_topic(topic).partitions):
                    w = admin.watermarks(TopicPartition(topic, p))
                    if w.high > w.low:
                        raise ConfigError(
                            f"topic {topic!r} holds records already; the audit counts every "
                            "record of the App's topics as its own: give it a fresh log (the "
                            "default), or delete the App's topics"
                        )

    def create_topics(self, log: Log, partitions: int) -> None:
        with log.admin() as admin:
            existing = set(admin.list_topics())
            for topic in dict.fromkeys([*self.inputs, *self.outputs]):
                if topic not in existing:
                    admin.create_topic(topic, partitions)
            for topic in self.dead_letters:
                if topic not in existing:
                    admin.create_topic(topic, 1)

    def produce(self, log: Log) -> Workload:
        """Send the input; what the log acknowledged, and where each input topic ends."""
        from assured.log import DeliveryReport

        first = self.records[0].topic
        keys = {r.id: (r.key or b"").decode(errors="replace") for r in self.records}
        wl = Workload(first, [r.id for r in self.records], keys, set())
        producer = log.producer(linger_ms=20, batch_size=500)

        def delivered(mid: str) -> Callable[[DeliveryReport], None]:
            def record(report: DeliveryReport) -> None:
                (wl.failed if report.error else wl.acked).add(mid)

            return record

        for r in self.records:
            producer.send(
                r.topic, r.value, key=r.key, headers=list(r.headers), on_delivery=delivered(r.id)
            )
        producer.flush(120)
        producer.close()
        if wl.failed:
            raise ConfigError(
                f"{len(wl.failed)} input records were refused by the log (first: "
                f"{sorted(wl.failed)[0]}); are they over its size limit?"
            )
        with log.admin() as admin:
            for topic in self.inputs:
                for p in range(admin.describe_topic(topic).partitions):
                    tp = TopicPartition(topic, p)
                    wl.ends[tp] = admin.watermarks(tp).high
        return wl

    def source(self, log: Log) -> list[Record]:
        return [r for topic in self.inputs for r in read_topic(log, topic, "read_uncommitted")]

    def effects(self, log: Log) -> list[Effect]:
        t = self.target
        if t.effects_topic is not None:
            assert t.id_field is not None
            ids = effect_ids_from_topic(
                log, t.effects_topic, t.id_field, lambda lg, tp: read_topic(lg, tp, READ_COMMITTED)
            )
            return [Effect(i, "", t.effects_topic) for i in ids]
        assert t.effects_sql is not None
        return [Effect(i, "", "row") for i in effect_ids_from_sql(self.effects_db, t.effects_sql)]

    def dead_letter_ids(self, log: Log, source: list[Record]) -> list[str]:
        """One id per dead letter: from the dead-letter topics, and with a database sink also
        from the runtime's ``assured_dead_letters`` table (committed with the effects, relayed
        later); an id counts as many times as the more of the two holds it."""
        in_topic: Counter[str] = Counter()
        with log.admin() as admin:
            existing = set(admin.list_topics())
        for topic in self.dead_letters:
            if topic in existing:
                for r in read_topic(log, topic, "read_committed"):
                    mid = r.header(ID_HEADER)
                    in_topic[mid.decode() if mid else f"?{topic}[{r.partition}]@{r.offset}"] += 1
        in_table: Counter[str] = Counter()
        if self.sink_kind != "topic":
            ids = placed(source)
            query = (
                "SELECT source_topic, source_partition, source_offset FROM assured_dead_letters "
                "WHERE group_id = ?"
            )
            with contextlib.suppress(Exception):  # no such table: no dead letters there
                postgres = self.sink_kind == "postgres"
                for topic, p, o in sink_rows(self.db, postgres, query, (self.group,)):
                    in_table[ids.get((topic, int(p), int(o)), f"?{topic}[{p}]@{o}")] += 1
        counts = {i: max(in_topic[i], in_table[i]) for i in set(in_topic) | set(in_table)}
        return [i for i, n in counts.items() for _ in range(n)]


def placed(records: list[Record]) -> dict[tuple[str, int, int], str]:
    """(topic, partition, offset) -> id, of the input records as the log placed them."""
    out = {}
    for r in records:
        mid = r.header(ID_HEADER)
        if mid is not None:
            out[(r.topic, r.partition, r.offset)] = mid.decode()
    return out


def sink_rows(
    db: str, postgres: bool, query: str, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """The rows of ``query`` (``?`` placeholders) on a sink's database: a PostgreSQL DSN, or
    else a SQLite file."""
    if postgres:
        import psycopg

        with psycopg.connect(db) as pg:
            return [tuple(r) for r in pg.execute(query.replace("?", "%s"), params).fetchall()]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [tuple(r) for r in conn.execute(query, params).fetchall()]
