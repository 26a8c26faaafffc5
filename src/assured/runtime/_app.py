"""``App``: register handlers, pick a guarantee, run."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal, TypeVar

from assured.errors import AssuredError, ConfigError, InvalidTopicError, UnknownTopicError
from assured.log import Log, Record, open_log
from assured.runtime._handling import HandlerSpec, check_handler
from assured.runtime._message import Codec, codec
from assured.runtime._settings import AppSettings, Guarantee
from assured.runtime.metrics import RuntimeMetrics
from assured.runtime.protocols._base import CommitProtocol, Runtime, seek_back
from assured.runtime.protocols.at_least_once import AtLeastOnce
from assured.runtime.protocols.at_most_once import AtMostOnce
from assured.runtime.protocols.exactly_once import ExactlyOnce
from assured.runtime.protocols.exactly_once_sink import ExactlyOnceSink
from assured.sinks import Sink

__all__ = ["App", "RunStats"]

log = logging.getLogger("assured.runtime")
F = TypeVar("F", bound=Callable[..., Any])
_DEFAULT_DLQ = "{topic}.dlq"


@dataclass
class RunStats:
    """What one ``run()`` did."""

    processed: int = 0
    seconds: float = 0.0
    stopped_by: str = ""  # max_messages, idle, signal, stop


class App:
    """A stream processor: handlers, a consumer group, and one delivery guarantee.

    >>> app = App(log="embedded:///tmp/pay.db", group="payments", guarantee="exactly-once")
    >>> @app.handler("charges", output="receipts")
    ... def charge(msg, out):
    ...     out.send(msg.value, key=msg.key)

    Settings come from the arguments, then ``ASSURED_*`` environment variables, then a TOML
    file (``config_file=``), then defaults: see :class:`~assured.runtime.AppSettings`.
    """

    def __init__(
        self,
        log: str | Log | None = None,
        group: str | None = None,
        guarantee: Guarantee | None = None,
        **settings: Any,
    ):
        given: dict[str, Any] = dict(settings)
        for key, value in (("group", group), ("guarantee", guarantee)):
            if value is not None:
                given[key] = value
        if isinstance(log, str):
            given["log"] = log
        elif isinstance(log, Log):
            given["log"] = log.url
        try:
            self.settings = AppSettings(**given)
        except ValueError as e:
            raise ConfigError(f"invalid App settings: {e}") from None
        self._log = log if isinstance(log, Log) else None
        self._specs: dict[str, HandlerSpec] = {}
        self._stop = threading.Event()
        self.metrics = RuntimeMetrics(self.settings.guarantee)
        # Called with (transaction label, "committed" | "aborted") under exactly-once.
        self.on_transaction: Callable[[str, str], None] | None = None

    @property
    def guarantee(self) -> Guarantee:
        return self.settings.guarantee

    def handler(
        self,
        topic: str,
        *,
        output: str | None = None,
        sink: Sink | None = None,
        retries: int = 3,
        dead_letter: str | Literal[False] = _DEFAULT_DLQ,
        key_codec: str | Codec = "bytes",
        value_codec: str | Codec = "bytes",
        backoff_ms: float = 50,
    ) -> Callable[[F], F]:
        """Register ``fn(message)``, ``fn(message, out)`` (with ``output``: an
        :class:`~assured.runtime.Output`) or ``fn(message, db)`` (with ``sink``: a database
        transaction) for ``topic``. A handler that raises is retried ``retries`` times with
        exponential backoff, then its record goes to ``dead_letter`` (``{topic}.dlq`` unless
        given; ``False`` stops the App instead, leaving the record uncommitted)."""
        if topic in self._specs:
            raise ConfigError(f"topic {topic!r} already has a handler")
        if output is not None and sink is not None:
            raise ConfigError("a handler writes to an output topic or to a sink, not both")
        if retries < 0:
            raise ConfigError("retries must be 0 or more")
        codecs = codec(key_codec), codec(value_codec)

        def register(fn: F) -> F:
            check_handler(fn, topic, "out" if output is not None else "db" if sink else None)
            if topic in self._specs:
                raise ConfigError(f"topic {topic!r} already has a handler")
            self._specs[topic] = HandlerSpec(
                topic=topic,
                fn=fn,
                output=output,
                sink=sink,
                retries=retries,
                dead_letter=None if dead_letter is False else dead_letter.format(topic=topic),
                key_codec=codecs[0],
                value_codec=codecs[1],
                backoff_s=backoff_ms / 1000,
            )
            return fn

        return register

    def stop(self) -> None:
        """Ask ``run()`` to finish its current batch, commit, leave the group and return."""
        self._stop.set()

    # -- running -------------------------------------------------------------------------------

    def run(self, max_messages: int | None = None, until_idle: float | None = None) -> RunStats:
        """Process until SIGTERM/SIGINT (or ``stop()``); or until ``max_messages`` records are
        handled; or until nothing arrived for ``until_idle`` seconds. The first signal finishes
        the batch, commits or aborts cleanly and leaves the group; a second exits at once."""
        if not self._specs:
            raise ConfigError("the App has no handlers; register one with @app.handler(topic)")
        s = self.settings
        self._stop.clear()
        log_ = self._log or open_log(s.log, s.log_config or None)
        sink = self._sink()
        incarnations = self._prepare_topics(log_)
        consumer = log_.consumer(
            group_id=s.group,
            isolation="read_committed",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_interval_ms=s.max_poll_interval_ms,
        )
        rt = Runtime(s, log_, consumer, self._specs, self.metrics, sink, self.on_transaction)
        rt.incarnations = incarnations
        protocol = self._protocol(rt, sink)
        if s.metrics_port is not None:
            self.metrics.serve(s.metrics_port)
        stats = RunStats()
        started = time.monotonic()
        try:
            with self._signals(stats):
                protocol.start()
                consumer.subscribe(
                    list(self._specs),
                    on_assign=protocol.on_assign,
                    on_revoke=protocol.on_revoke,
                    on_lost=protocol.on_lost,
                )
                log.info(
                    "running %s for group %r on %s (topics %s)",
                    s.guarantee, s.group, log_.url, ", ".join(self._specs),
                )  # fmt: skip
                self._loop(protocol, consumer, stats, max_messages, until_idle)
                protocol.close()
                consumer.close()  # leaves the group; on_revoke has nothing left to commit
        except BaseException as e:
            # Whatever the error, nothing open commits on the way out (not from on_revoke, not
            # from close), and the group is left so the partitions move on at once.
            if isinstance(e, AssuredError) and e.fenced and e.fatal:
                log.critical("fenced: %s. This instance stops now, without committing.", e)
            with contextlib.suppress(Exception):
                protocol.abandon()
            with contextlib.suppress(Exception):
                consumer.close()
            with contextlib.suppress(Exception):
                protocol.close()  # releases producers; commits nothing after abandon()
            raise
        finally:
            if sink is not None:
                sink.close()
            stats.seconds = time.monotonic() - started
        return stats

    def _loop(
        self,
        protocol: CommitProtocol,
        consumer: Any,
        stats: RunStats,
        max_messages: int | None,
        until_idle: float | None,
    ) -> None:
        s = self.settings
        last_record = time.monotonic()
        while not self._stop.is_set():
            records: list[Record] = consumer.poll(s.max_poll_records, s.poll_timeout_ms / 1000)
            if records:
                if max_messages is not None and stats.processed + len(records) > max_messages:
                    records = self._keep(consumer, records, max_messages - stats.processed)
                protocol.process(records)
                stats.processed += len(records)
                last_record = time.monotonic()
            protocol.tick()
            if max_messages is not None and stats.processed >= max_messages:
                stats.stopped_by = "max_messages"
                return
            if until_idle is not None and time.monotonic() - last_record >= until_idle:
                stats.stopped_by = "idle"
                return
        stats.stopped_by = stats.stopped_by or "stop"

    @staticmethod
    def _keep(consumer: Any, records: list[Record], n: int) -> list[Record]:
        """The first ``n`` records; the consumer is sent back to the first of the rest."""
        seek_back(consumer, {}, records[n:])
        return records[:n]

    def _sink(self) -> Sink | None:
        sinks = {id(spec.sink): spec.sink for spec in self._specs.values() if spec.sink}
        if len(sinks) > 1:
            raise ConfigError("all handlers of one App share one sink (one database transaction)")
        sink = next(iter(sinks.values()), None)
        if sink is not None:
            if self.guarantee == "exactly-once" and any(
                spec.sink is None for spec in self._specs.values()
            ):
                raise ConfigError(
                    "under exactly-once, an App writes either to topics or to one database; "
                    "split it into two Apps"
                )
            sink.setup()
        return sink

    def _protocol(self, rt: Runtime, sink: Sink | None) -> CommitProtocol:
        if self.guarantee == "at-most-once":
            return AtMostOnce(rt)
        if self.guarantee == "at-least-once":
            return AtLeastOnce(rt)
        return ExactlyOnceSink(rt) if sink is not None else ExactlyOnce(rt)

    def _prepare_topics(self, log_: Log) -> dict[str, str]:
        """Inputs and outputs must exist; dead-letter topics are made when missing. Returns
        the input topics' incarnations, where the log tells them."""
        incarnations: dict[str, str] = {}
        with log_.admin() as admin:
            existing = set(admin.list_topics())
            for spec in self._specs.values():
                for name in (spec.topic, spec.output):
                    if name is not None and name not in existing:
                        raise UnknownTopicError(
                            f"topic {name!r} (of handler {spec.name}) does not exist; create it "
                            f"first: assured topic create {name} --partitions N"
                        )
                if spec.dead_letter is not None and spec.dead_letter not in existing:
                    with contextlib.suppress(InvalidTopicError):  # made meanwhile by a peer
                        admin.create_topic(spec.dead_letter, 1)
                        log.info("created dead-letter topic %s", spec.dead_letter)
                if spec.sink is not None:
                    topic_id = admin.describe_topic(spec.topic).topic_id
                    if topic_id is not None:
                        incarnations[spec.topic] = topic_id
        return incarnations

    @contextlib.contextmanager
    def _signals(self, stats: RunStats) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        seen = 0

        def on_signal(signum: int, frame: FrameType | None) -> None:
            nonlocal seen
            seen += 1
            if seen > 1:
                os._exit(128 + signum)  # a second signal: now, as the user asked twice
            log.info(
                "%s: finishing the batch, committing, leaving the group",
                signal.Signals(signum).name,
            )
            stats.stopped_by = "signal"
            self._stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
