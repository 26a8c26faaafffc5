"""Test your own App in-process: the App's handlers and sink, untouched, on an embedded log in a
temporary folder.

    from assured.testing import AppTest
    from payments.service import app

    def test_a_charge_makes_a_receipt():
        with AppTest(app) as t:
            t.send("charges", {"id": 7, "cents": 250}, key="acct-1")
            t.run_until_idle()
            assert t.outputs("receipts") == [{"charge": 7, "ok": True}]
            assert t.committed("charges") == {0: 1}

What ``send`` is given is encoded with the codecs of the topic's handler (a dict through a
``json`` codec, a model through a pydantic one); what ``outputs`` returns is decoded with the
codecs of the handler that wrote the topic. Topics are made for every handler (its input, its
output, its dead-letter topic) with ``partitions`` partitions. The App is pointed at the test's
log for the test, and back at its own afterwards; a SQLite sink writes to a copy of its file
(tables and rows as they were) in the test's folder, so the App's database is never touched. A
PostgreSQL sink is used as it is, only when ``use_postgres=True`` says its database is one for
tests. With the pytest plugin (installed with
assured) the ``assured_test`` fixture makes these for you, and ``assured_app`` makes one for the
App named by ``assured_app = "module:attribute"`` in the pytest configuration.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from assured.errors import UsageError
from assured.log import Header, Log, Producer, TopicPartition, open_log
from assured.runtime import App, RunStats
from assured.runtime._handling import HandlerSpec
from assured.runtime._message import BYTES, Codec, ModelCodec
from assured.runtime.metrics import RuntimeMetrics
from assured.sinks import PostgresSink, SqliteSink

__all__ = ["AppTest", "Received"]


@dataclass(frozen=True)
class Received:
    """A committed record of a topic, decoded as its writer encoded it."""

    key: Any
    value: Any
    headers: dict[str, bytes | None]
    partition: int
    offset: int


class AppTest:
    """One test's log and the App pointed at it (see the module's docstring). A context
    manager; ``close()`` gives the App its own settings back and removes the folder."""

    def __init__(
        self,
        app: App,
        partitions: int = 1,
        folder: str | Path | None = None,
        use_postgres: bool = False,
    ):
        if app._running:
            raise UsageError("AppTest(app): the App is running; test it before or after")
        if not app._specs:
            raise UsageError("AppTest(app): the App has no handlers to test")
        self.app = app
        self.partitions = partitions
        self._own_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="assured-test-") if folder is None else folder)
        self.log: Log = open_log(f"embedded://{self.folder}/log.db")
        self._before = (dict(app._given), app._log, app.settings, app.metrics)
        self._producer: Producer | None = None
        self._closed = False
        self._sinks: list[tuple[SqliteSink, Path]] = []  # redirected to a copy: (sink, own path)
        try:
            for sink in {id(s.sink): s.sink for s in app._specs.values() if s.sink}.values():
                if isinstance(sink, SqliteSink):
                    self._copy(sink)
                elif isinstance(sink, PostgresSink) and not use_postgres:
                    raise UsageError(
                        "AppTest would write effects and positions into the PostgreSQL database "
                        "the App's sink names; point the sink at a database for tests and pass "
                        "use_postgres=True"
                    )
            app.configure(log=self.log, metrics_port=None)  # no server left behind a test
            app.metrics = RuntimeMetrics(app.settings.guarantee)
            with self.log.admin() as admin:
                existing = set(admin.list_topics())
                for topic in self._topics():
                    if topic not in existing:
                        admin.create_topic(topic, partitions)
                        existing.add(topic)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> AppTest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _copy(self, sink: SqliteSink) -> None:
        """The test writes to a copy of the sink's file (its tables as they are), never to the
        file itself: a test run leaves the App's database, and its stored positions, as it was."""
        copy = self.folder / f"sink-{len(self._sinks)}.db"
        if sink.path.exists():
            with sqlite3.connect(sink.path) as src, sqlite3.connect(copy) as dst:
                src.backup(dst)
            src.close()
            dst.close()
        sink.close()
        self._sinks.append((sink, sink.path))
        sink.path = copy

    def _topics(self) -> list[str]:
        topics: list[str] = []
        for spec in self.app._specs.values():
            topics += [t for t in (spec.topic, spec.output, spec.dead_letter) if t]
        return list(dict.fromkeys(topics))

    # -- in ----------------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: Any,
        key: Any = None,
        headers: dict[str, str | bytes] | None = None,
        partition: int | None = None,
    ) -> None:
        """One input record, encoded with the codecs of ``topic``'s handler (a ``str`` is
        sent as UTF-8 where the codec takes bytes)."""
        spec = self.app._specs.get(topic)
        producer = self._producer
        if producer is None:
            producer = self._producer = self.log.producer()
        sent: list[Header] = [
            (name, v.encode() if isinstance(v, str) else v) for name, v in (headers or {}).items()
        ]
        producer.send(
            topic,
            _encode(value, spec.value_codec if spec else BYTES),
            key=_encode(key, spec.key_codec if spec else BYTES),
            headers=sent or None,
            partition=partition,
        )

    def run_until_idle(self, idle: float = 0.05, max_messages: int | None = None) -> RunStats:
        """Run the App until every input is handled and committed, and nothing came for
        ``idle`` seconds; its :class:`~assured.RunStats`."""
        if self._producer is not None:
            self._producer.flush()
        return self.app.run(until_idle=idle, max_messages=max_messages)

    # -- out ---------------------------------------------------------------------------------

    def records(self, topic: str) -> list[Received]:
        """What a read_committed reader of ``topic`` sees, each decoded with the codecs of
        the handler that writes it (raw bytes for a topic no handler writes)."""
        writer = next((s for s in self.app._specs.values() if s.output == topic), None)
        out: list[Received] = []
        with self.log.admin() as admin:
            partitions = admin.describe_topic(topic).partitions
        with self.log.consumer(isolation="read_committed") as reader:
            reader.assign([TopicPartition(topic, p) for p in range(partitions)])
            while batch := reader.poll(max_records=10_000, timeout=0.05):
                for r in batch:
                    out.append(
                        Received(
                            key=_decode(r.key, writer.key_codec if writer else BYTES),
                            value=_decode(r.value, writer.value_codec if writer else BYTES),
                            headers=dict(r.headers or ()),
                            partition=r.partition,
                            offset=r.offset,
                        )
                    )
        return sorted(out, key=lambda r: (r.partition, r.offset))

    def outputs(self, topic: str) -> list[Any]:
        """The values of :meth:`records`, in each partition's order (a handler with a pydantic
        model codec wrote JSON: its outputs come back as dicts)."""
        return [r.value for r in self.records(topic)]

    def dead_letters(self, topic: str) -> list[Received]:
        """The records of ``topic`` that went to its dead-letter topic, as they were sent (raw
        bytes), with the error in their headers (``assured.error.type``,
        ``assured.error.message``, ``assured.attempts``, ...)."""
        spec = self._spec(topic)
        if spec.dead_letter is None:
            raise UsageError(f"the handler of {topic!r} has no dead-letter topic")
        with self.log.admin() as admin:
            partitions = admin.describe_topic(spec.dead_letter).partitions
        out: list[Received] = []
        with self.log.consumer(isolation="read_committed") as reader:
            reader.assign([TopicPartition(spec.dead_letter, p) for p in range(partitions)])
            while batch := reader.poll(max_records=10_000, timeout=0.05):
                out += [
                    Received(r.key, r.value, dict(r.headers or ()), r.partition, r.offset)
                    for r in batch
                ]
        return out

    def committed(self, topic: str) -> dict[int, int]:
        """The App's committed position in each partition of ``topic`` (what a restart would
        start from); a partition with none is left out. Under exactly-once into a database the
        sink's positions are the truth, and the log's are what the sink relays."""
        spec = self._spec(topic)
        group = self.app.settings.group
        if spec.sink is not None and self.app.settings.guarantee == "exactly-once":
            stored = spec.sink.stored_offsets(group)  # the truth; the log's are relayed
            return {tp.partition: o for tp, o in sorted(stored.items()) if tp.topic == topic}
        with self.log.admin() as admin:
            found = admin.committed_offsets(group, [topic])
        return {tp.partition: offset for tp, offset in sorted(found.items())}

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` on the database of the App's sink: the effects it committed."""
        sinks = {id(s.sink): s.sink for s in self.app._specs.values() if s.sink is not None}
        if len(sinks) != 1:
            raise UsageError(f"query() needs an App with one sink; this one has {len(sinks)}")
        (sink,) = sinks.values()
        if isinstance(sink, SqliteSink):
            conn = sqlite3.connect(sink.path)
            try:
                return list(conn.execute(sql, params))
            finally:
                conn.close()
        if isinstance(sink, PostgresSink):
            import psycopg

            with psycopg.connect(sink.dsn) as pg:
                return list(pg.execute(sql, params))
        raise UsageError(f"query() knows SqliteSink and PostgresSink, not {type(sink).__name__}")

    def _spec(self, topic: str) -> HandlerSpec:
        spec = self.app._specs.get(topic)
        if spec is None:
            raise UsageError(
                f"no handler reads {topic!r}; the App reads {', '.join(map(repr, self.app._specs))}"
            )
        return spec

    # -- the end -----------------------------------------------------------------------------

    def close(self) -> None:
        """Give the App its own settings back, close the log, remove the folder."""
        if self._closed:
            return
        self._closed = True
        given, log, settings, metrics = self._before
        self.app._given, self.app._log, self.app.settings = given, log, settings
        self.app.metrics = metrics
        self.app._event_loop.close()  # tasks a handler left are not carried into the next test
        for sink, path in self._sinks:
            sink.close()
            sink.path = path
        if self._producer is not None:
            self._producer.close()
        self.log.close()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def _encode(value: Any, codec: Codec) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if codec is BYTES:
        if isinstance(value, str):
            return value.encode()
        return json.dumps(value, separators=(",", ":")).encode()
    return codec.encode(value)


def _decode(value: bytes | None, codec: Codec) -> Any:
    """What a handler sent through ``codec``: a model codec writes JSON (the handler may send a
    different model, or a dict), so its outputs are read back as JSON."""
    if value is None or codec is BYTES:
        return value
    if isinstance(codec, ModelCodec):
        return json.loads(value)
    return codec.decode(value)
