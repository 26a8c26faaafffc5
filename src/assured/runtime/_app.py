"""``App``: register handlers, pick a guarantee, run."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal, TypeVar

from assured._secrets import redact_url
from assured.errors import (
    AssuredError,
    ConfigError,
    InvalidTopicError,
    UnknownTopicError,
    UsageError,
)
from assured.log import Admin, Consumer, Log, Record, TopicPartition, open_log
from assured.runtime._concurrent import EventLoop, is_async, outside_event_loops
from assured.runtime._handling import (
    ORDERINGS,
    DrainEnded,
    HandlerSpec,
    Ordering,
    check_handler,
)
from assured.runtime._message import Codec, codec
from assured.runtime._settings import AppSettings, Guarantee
from assured.runtime.metrics import RuntimeMetrics
from assured.runtime.protocols._base import CommitProtocol, Runtime, seek_back
from assured.runtime.protocols.at_least_once import AtLeastOnce
from assured.runtime.protocols.at_most_once import AtMostOnce
from assured.runtime.protocols.exactly_once import ExactlyOnce
from assured.runtime.protocols.exactly_once_sink import ExactlyOnceSink
from assured.sinks import Sink
from assured.sinks._base import RUNTIME, record_part

__all__ = ["App", "RunStats"]

log = logging.getLogger("assured.runtime")
F = TypeVar("F", bound=Callable[..., Any])
_DEFAULT_DLQ = "{topic}.dlq"


@dataclass
class RunStats:
    """What one ``run()`` did. ``processed`` counts records handed to the handlers: a record
    handled again after a rewind (an aborted transaction, a batch redone) counts again."""

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
        self.settings = _settings(given)
        self._given = given
        self._log = log if isinstance(log, Log) else None
        self._specs: dict[str, HandlerSpec] = {}
        self._stop = threading.Event()
        self._running = False
        self.metrics = RuntimeMetrics(self.settings.guarantee)
        # Async handlers' loop: one for the App's life, so what a handler binds to it (a lock,
        # a client) holds from one run() to the next; closed when the App is collected.
        self._event_loop = EventLoop()
        weakref.finalize(self, self._event_loop.close)
        # Called with (transaction label, "committed" | "aborted") under exactly-once.
        self.on_transaction: Callable[[str, str], None] | None = None

    @property
    def guarantee(self) -> Guarantee:
        return self.settings.guarantee

    def configure(self, **settings: Any) -> None:
        """Replace some settings before ``run()``, as if they had been given to ``App()``
        (they win over ``ASSURED_*`` variables and the config file): ``app.configure(
        log="kafka://b:9092", group="payments-2")``; ``log`` may be a URL or a Log object.
        ``assured run --log/--group/--guarantee`` use it. Raises
        :class:`~assured.errors.ConfigError` for a bad value, changing nothing, and
        :class:`~assured.errors.UsageError` while ``run()`` is going."""
        if self._running:
            raise UsageError(
                "App.configure() while run() is going: the running App keeps the settings it "
                "started with, and none were changed. Stop it (app.stop()), then configure and "
                "run again."
            )
        log_object = settings.get("log")
        given = {**self._given, **settings}
        if isinstance(log_object, Log):
            given["log"] = log_object.url
        new = _settings(given)
        if "log" in settings:
            # what is given now replaces what was given before, a URL or a Log object
            self._log = log_object if isinstance(log_object, Log) else None
        if new.guarantee != self.settings.guarantee:
            self.metrics = RuntimeMetrics(new.guarantee)
        self._given, self.settings = given, new

    def handler(
        self,
        topic: str,
        *,
        output: str | None = None,
        sink: Sink | None = None,
        retries: int = 3,
        dead_letter: str | Literal[False] = _DEFAULT_DLQ,
        key_codec: str | Codec | type[Any] = "bytes",
        value_codec: str | Codec | type[Any] = "bytes",
        backoff_ms: float = 50,
        concurrency: int = 1,
        ordering: Ordering | None = None,
    ) -> Callable[[F], F]:
        """Register ``fn(message)``, ``fn(message, out)`` (with ``output``: an
        :class:`~assured.runtime.Output`) or ``fn(message, db)`` (with ``sink``: a database
        transaction) for ``topic``. A handler that raises is retried ``retries`` times with
        exponential backoff, then its record goes to ``dead_letter`` (``{topic}.dlq`` unless
        given; ``False`` stops the App instead, leaving the record uncommitted).

        ``key_codec`` and ``value_codec``: ``"bytes"``, ``"str"``, ``"json"``, an object with
        ``encode`` and ``decode``, or a pydantic model class (each record is validated into
        the model, and what the handler sends is written as JSON). A record that does not
        decode goes to ``dead_letter`` at once, without retries.

        ``fn`` may be an ``async def``: it is awaited to its end on the App's own event loop.
        ``concurrency``: how many records may be handled side by side (an async handler's awaits
        overlap; a plain ``def`` runs in that many threads), across polls: a slow record does
        not hold up the next poll. Records that share a partition and key (``ordering="key"``,
        the default then), a partition (``"partition"``) or nothing (``"unordered"``) never
        overlap and run in offset order. Each partition commits only its contiguous handled
        prefix, so each guarantee keeps its meaning; under exactly-once a record's outputs
        wait in memory until every record below it is handled.

        With ``sink=``, an ``async def`` awaits its database calls (``await db.execute(...)``),
        at any concurrency, and with ``concurrency`` > 1 the handler must be one; a plain
        ``def`` calls the batch's transaction plainly. One App's handlers into sinks are all of
        one kind or all of the other. Awaited, records share one transaction per step,
        each in a savepoint, and take turns on the database from their first call to their
        return, so do the waiting (an API call) before the first database call. Under
        exactly-once each record handled above its partition's stored position is marked done
        in the same commit as its effects: a restart never repeats it."""
        if topic in self._specs:
            raise ConfigError(f"topic {topic!r} already has a handler")
        if output is not None and sink is not None:
            raise ConfigError("a handler writes to an output topic or to a sink, not both")
        if retries < 0:
            raise ConfigError("retries must be 0 or more")
        if type(concurrency) is not int or concurrency < 1:
            raise ConfigError(f"concurrency={concurrency!r}: a whole number, 1 or more")
        if ordering is None:
            ordering = "key" if concurrency > 1 else "partition"
        elif concurrency == 1 and ordering != "partition":
            raise ConfigError(
                f"ordering={ordering!r} with concurrency=1: one record at a time is already in "
                "partition order; give concurrency > 1 for records to overlap"
            )
        if ordering not in ORDERINGS:
            raise ConfigError(f"ordering={ordering!r}: one of {', '.join(ORDERINGS)}")
        codecs = codec(key_codec), codec(value_codec)

        def register(fn: F) -> F:
            check_handler(fn, topic, "out" if output is not None else "db" if sink else None)
            if concurrency > 1 and sink is not None and not is_async(fn):
                raise ConfigError(
                    f"handler {getattr(fn, '__qualname__', fn)!r} for topic {topic!r}: with "
                    f"sink= and concurrency={concurrency} the handler must be an async def, "
                    "whose database calls are awaited (await db.execute(...)): records side by "
                    "side take turns on the database. Use async def, or concurrency=1."
                )
            if topic in self._specs:
                raise ConfigError(f"topic {topic!r} already has a handler")
            spec = HandlerSpec(
                topic=topic,
                fn=fn,
                output=output,
                sink=sink,
                retries=retries,
                dead_letter=None if dead_letter is False else dead_letter.format(topic=topic),
                key_codec=codecs[0],
                value_codec=codecs[1],
                backoff_s=backoff_ms / 1000,
                concurrency=concurrency,
                ordering=ordering,
                is_async=is_async(fn),
            )
            if sink is not None:
                _one_way_into_sinks(self._specs, spec)
            self._specs[topic] = spec
            return fn

        return register

    def stop(self) -> None:
        """Ask ``run()`` to finish its current batch, commit, leave the group and return. A
        stop asked before ``run()`` (or while it starts) is kept: that run returns at once.
        Each run ends with the stop taken back, so the App can run again."""
        self._stop.set()

    # -- running -------------------------------------------------------------------------------

    def run(
        self,
        max_messages: int | None = None,
        until_idle: float | None = None,
        *,
        progress_every: float | None = None,
    ) -> RunStats:
        """Process until SIGTERM/SIGINT (or ``stop()``); or until ``max_messages`` records have
        been handed to the handlers (one handled again after a rewind counts again: see
        :class:`RunStats`); or until the App has been idle for ``until_idle`` seconds. Idle
        means the group has assigned this member its partitions and each one is read to its
        last stable offset (the end a read_committed reader can reach: records of a
        transaction still open are not waited for): time spent waiting for the group (a
        member that died holds its partitions until its session expires) is not idle, and is
        logged as waiting. The log is asked where partitions end only when a poll brought
        less than a full batch, at most every 0.5 s. The first signal finishes the batch,
        commits or aborts cleanly and leaves the group; a second exits at once.
        ``progress_every``: log a one-line summary (records/s, lag, commits, aborts, dead
        letters) every so many seconds."""
        if not self._specs:
            raise ConfigError("the App has no handlers; register one with @app.handler(topic)")
        if any(spec.is_async or spec.concurrency > 1 for spec in self._specs.values()):
            outside_event_loops()
        self._running = True
        # The App's own code, marked: run from a handler's code (an App inside another's
        # handler, or asyncio.to_thread from one), its runtime is no attempt of that handler's.
        outer = record_part.set(RUNTIME)
        try:
            return self._run(max_messages, until_idle, progress_every)
        finally:
            record_part.reset(outer)
            self._running = False
            self._stop.clear()  # here, not at the start: a stop asked meanwhile is not lost

    def _run(
        self, max_messages: int | None, until_idle: float | None, progress_every: float | None
    ) -> RunStats:
        s = self.settings
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
        rt = Runtime(
            s, log_, consumer, self._specs, self.metrics, sink, self.on_transaction,
            loop=self._event_loop,
        )  # fmt: skip
        rt.incarnations = incarnations
        rt.stopping = self._stop
        rt.loop.watch_drain(rt.past_drain)  # a handler's await, one record at a time
        protocol = self._protocol(rt, sink)
        stats = RunStats()
        watch = _Watch(s, log_, consumer, self.metrics, stats, progress_every)
        started = time.monotonic()
        try:
            with self._signals(stats):
                if s.metrics_port is not None:
                    self._serve_metrics(s.metrics_port)
                protocol.start()
                consumer.subscribe(
                    list(self._specs),
                    on_assign=watch.on_assign(protocol.on_assign),
                    on_revoke=watch.on_revoke(rt.revoking(protocol.on_revoke), lost=False),
                    on_lost=watch.on_revoke(protocol.on_lost, lost=True),
                )
                log.info(
                    "running %s for group %r on %s (topics %s)",
                    s.guarantee, s.group, redact_url(log_.url), self._topics(),
                    extra={
                        "event": "start", "guarantee": s.guarantee, "group": s.group,
                        "log": redact_url(log_.url), "topics": list(self._specs),
                    },
                )  # fmt: skip
                self._loop(protocol, consumer, stats, watch, max_messages, until_idle)
                if rt.drain_until is None:  # the end of max_messages or until_idle
                    rt.drain_until = time.monotonic() + s.drain_timeout_ms / 1000
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
            if not isinstance(e, DrainEnded):
                raise
            stats.stopped_by = stats.stopped_by or "stop"
            log.warning(
                "%s; the next owner handles it and the rest of its batch again (under "
                "at-most-once they are lost)", e, extra={"event": "drain_ended"},
            )  # fmt: skip
        finally:
            watch.close()
            for window in rt.windows.values():
                if window.db is not None:
                    with contextlib.suppress(Exception):
                        rt.loop.run(window.db.close())  # its connections, side by side
            rt.loop.end_run()
            if sink is not None:
                sink.close()
            stats.seconds = time.monotonic() - started
        log.info(
            "stopped (%s) after %.1f s: %d record(s) processed",
            stats.stopped_by, stats.seconds, stats.processed,
            extra={
                "event": "stop", "stopped_by": stats.stopped_by, "seconds": round(stats.seconds, 3),
                "processed": stats.processed,
            },
        )  # fmt: skip
        return stats

    def _topics(self) -> str:
        return ", ".join(
            f"{t} -> {spec.output}" if spec.output else f"{t} -> database" if spec.sink else t
            for t, spec in self._specs.items()
        )

    def _serve_metrics(self, port: int) -> None:
        try:
            self.metrics.serve(port)
        except (OSError, OverflowError, ValueError) as e:
            raise ConfigError(f"cannot serve metrics on port {port}: {e}") from None

    def _loop(
        self,
        protocol: CommitProtocol,
        consumer: Any,
        stats: RunStats,
        watch: _Watch,
        max_messages: int | None,
        until_idle: float | None,
    ) -> None:
        s = self.settings
        size = _BatchSize(s, self._specs)
        rt = protocol.rt
        while not self._stop.is_set():
            want = size.now
            # Records side by side still running: poll without waiting long, and let them go on.
            in_flight = rt.in_flight()
            timeout = s.poll_timeout_ms / 1000 if not in_flight else 0.0
            records: list[Record] = consumer.poll(want, timeout)
            # Less than a full batch, and the client holds nothing fetched beyond it: caught up.
            # Not while records are in flight: their polls do not wait, and each would commit.
            caught_up = len(records) < want and not consumer.maybe_more_fetched() and not in_flight
            if records or in_flight:
                if max_messages is not None and stats.processed + len(records) > max_messages:
                    records = self._keep(consumer, records, max_messages - stats.processed)
                handled = rt.handling_s
                protocol.process(records)
                if records:
                    size.took(len(records), rt.handling_s - handled)
                    stats.processed += len(records)
                    watch.records()
            protocol.tick(caught_up)
            if max_messages is not None and stats.processed >= max_messages:
                stats.stopped_by = "max_messages"
                return
            watch.tick()
            if until_idle is not None and watch.idle(until_idle, caught_up and not rt.in_flight()):
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


def _one_way_into_sinks(specs: Mapping[str, HandlerSpec], new: HandlerSpec) -> None:
    """An App's handlers into sinks either all await their ``db`` (windowed: async defs, or
    concurrency > 1; each window commits its own database transactions) or all call it
    plainly (one transaction per batch, around the protocol's step)."""
    topic, awaited = new.topic, new.windowed
    others = {t: spec.windowed for t, spec in specs.items() if spec.sink is not None}
    if not others or awaited in others.values():
        return
    kinds = {
        True: "an async def or has concurrency > 1 (db calls awaited, committed by its window)",
        False: "a plain def with concurrency=1 (db calls in each batch's one transaction)",
    }
    raise ConfigError(
        f"the handler for {topic!r} is {kinds[awaited]}, but the handlers of "
        f"{', '.join(sorted(others))} into a sink are {kinds[not awaited]}: one App's handlers "
        "into sinks must all be of one kind. Make them alike, or run them in two Apps."
    )


def _settings(given: Mapping[str, Any]) -> AppSettings:
    """``AppSettings(**given)``; a bad setting is its one-line :class:`ConfigError`."""
    return AppSettings(**given)


class _Watch:
    """What the run loop knows beyond the records: whether the group has assigned this member
    its partitions (and since when it waits), whether they are read to their last stable
    offset (the only idle that counts), and the periodic summary. Only reads positions and
    partitions' ends; commits nothing and moves no consumer."""

    WAITING_AFTER_S = 1.0  # a join quicker than this is not worth a line
    WAITING_EVERY_S = 15.0
    # Asking where partitions end costs a round trip on Kafka: not after every short poll.
    CHECK_EVERY_S = 0.5

    def __init__(
        self,
        settings: AppSettings,
        log_: Log,
        consumer: Consumer,
        metrics: RuntimeMetrics,
        stats: RunStats,
        progress_every: float | None,
    ):
        self.settings = settings
        self.log = log_
        self.consumer = consumer
        self.metrics = metrics
        self.stats = stats
        self.progress_every = progress_every or None
        now = time.monotonic()
        self.joined = False  # the group has given this member its partitions (maybe none)
        self.waiting_since: float = now
        self.waiting_said: float | None = None
        self.quiet_since = now  # no record and no new assignment since
        self.caught_up = False  # every assigned partition was read to its end at quiet_since
        self.checked = 0.0
        self.summary_at = now
        self.summary_processed = 0
        self._admin: Admin | None = None

    # -- the group ---------------------------------------------------------------------------

    def on_assign(
        self, then: Callable[[list[TopicPartition]], Mapping[TopicPartition, int] | None]
    ) -> Callable[[list[TopicPartition]], Mapping[TopicPartition, int] | None]:
        def assigned(partitions: list[TopicPartition]) -> Mapping[TopicPartition, int] | None:
            starts = then(partitions)
            now = time.monotonic()
            held = self.consumer.assignment()
            if partitions:
                what = _partitions(partitions)
            elif held:
                what = "no new partitions"
            else:
                what = "no partitions (the group's other members hold them all)"
            log.info(
                "assigned %s%s",
                what,
                f" (holding {len(held)})" if held and len(held) != len(partitions) else "",
                extra={
                    "event": "assigned", "partitions": [str(tp) for tp in partitions],
                    "holding": len(held), "waited_s": round(now - self.waiting_since, 3),
                },
            )  # fmt: skip
            self.joined, self.caught_up, self.quiet_since = True, False, now
            return starts

        return assigned

    def on_revoke(
        self, then: Callable[[list[TopicPartition]], None], lost: bool
    ) -> Callable[[list[TopicPartition]], None]:
        def revoked(partitions: list[TopicPartition]) -> None:
            then(partitions)
            log.info(
                "%s %s",
                "lost (the group moved on without this member; nothing is committed for "
                "them):" if lost else "revoked",
                _partitions(partitions),
                extra={
                    "event": "lost" if lost else "revoked",
                    "partitions": [str(tp) for tp in partitions],
                },
            )  # fmt: skip
            if set(partitions) >= set(self.consumer.assignment()):
                # Nothing left: the group is rebalancing, and this member waits for it.
                self.joined, self.caught_up = False, False
                self.waiting_since, self.waiting_said = time.monotonic(), None

        return revoked

    # -- each turn of the loop ---------------------------------------------------------------

    def records(self) -> None:
        self.caught_up, self.quiet_since = False, time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if (
            not self.joined
            and now - self.waiting_since >= self.WAITING_AFTER_S
            and (self.waiting_said is None or now - self.waiting_said >= self.WAITING_EVERY_S)
        ):
            self.waiting_said = now
            waited = now - self.waiting_since
            log.info(
                    "waiting for the group %r to assign partitions (%.0f s so far): a dead "
                    "member's session may take up to %.0f s to expire",
                    self.settings.group, waited, self.settings.session_timeout_ms / 1000,
                    extra={
                        "event": "waiting", "group": self.settings.group,
                        "waited_s": round(waited, 3),
                        "session_timeout_s": self.settings.session_timeout_ms / 1000,
                    },
                )  # fmt: skip
        if self.progress_every is not None and now - self.summary_at >= self.progress_every:
            self._summary(now)

    def idle(self, until_idle: float, caught_up: bool) -> bool:
        """Has every assigned partition been read to its last stable offset (what a
        read_committed reader can reach), with nothing new, for ``until_idle`` seconds? Never
        while the group has not assigned this member. ``caught_up``: the last poll brought
        less than a full batch; after a full one records are waiting, and the log is not
        asked."""
        if not self.joined or not caught_up:
            return False
        now = time.monotonic()
        if not self.caught_up:
            if now - self.checked < min(self.CHECK_EVERY_S, max(until_idle / 2, 0.05)):
                return False
            self.checked = now
            if self.behind(enough=1) != 0:
                self.quiet_since = now
                return False
            self.caught_up = True
        if now - self.quiet_since < until_idle:
            return False
        self.checked = now
        if self.behind(enough=1) != 0:  # one more look before stopping
            self.caught_up, self.quiet_since = False, now
            return False
        return True

    def behind(self, enough: int | None = None) -> int | None:
        """Records between each assigned partition's position and its end (its last stable
        offset: what read_committed can reach), summed; None if the log would not say. With
        ``enough``, counting stops once the sum reaches it: on Kafka the position of a
        partition not read yet costs round trips of its own."""
        total = 0
        try:
            if self._admin is None:
                self._admin = self.log.admin()
            assigned = self.consumer.assignment()
            ends = self._admin.end_offsets(assigned)  # one question for them all
            for tp in assigned:
                total += max(0, ends[tp] - self.consumer.position(tp))
                if enough is not None and total >= enough:
                    break
        except AssuredError as e:
            log.debug("could not read the positions and ends of the partitions: %s", e)
            return None
        return total

    def _summary(self, now: float) -> None:
        seconds = now - self.summary_at
        rate = (self.stats.processed - self.summary_processed) / seconds if seconds else 0.0
        self.summary_at, self.summary_processed = now, self.stats.processed
        lag = self.behind() if self.joined else None
        commits = _total(self.metrics.committed)
        aborts = _total(self.metrics.aborts)
        dead = _total(self.metrics.dead_lettered)
        shown = "waiting for the group" if not self.joined else "?" if lag is None else f"{lag:,}"
        log.info(
            "%s records/s, lag %s, %d commits, %d aborts, %d dead letters (%s records so far)",
            f"{rate:,.0f}", shown, commits, aborts, dead, f"{self.stats.processed:,}",
            extra={
                "event": "summary", "records_per_s": round(rate, 1), "lag": lag,
                "commits": commits, "aborts": aborts, "dead_letters": dead,
                "processed": self.stats.processed,
            },
        )  # fmt: skip

    def close(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
            self._admin = None


class _BatchSize:
    """How many records to poll: about one commit interval of handling (the handlers' own
    time: commits and database transactions around it are not counted), so a slow handler
    does not hold a whole ``max_poll_records`` batch in one transaction (or behind one commit):
    with 20 ms a record, five records a batch, not 500. Never more than ``max_poll_records``;
    never fewer than the widest ``concurrency`` (its records run side by side). Handlers of a
    few microseconds poll full batches, as before; so does ``commit_interval_ms=0``. The first
    poll takes ``FIRST`` records (or the concurrency), to learn how long a record takes before
    a whole batch of slow ones is in one transaction."""

    FIRST = 10

    def __init__(self, settings: AppSettings, specs: Mapping[str, HandlerSpec]):
        self.most = settings.max_poll_records
        self.least = min(self.most, max((spec.concurrency for spec in specs.values()), default=1))
        self.interval = settings.commit_interval_ms / 1000
        self.per_record = 0.0  # seconds of handling per record, a moving average
        self.now = self.most if self.interval <= 0 else max(self.least, min(self.most, self.FIRST))

    def took(self, records: int, seconds: float) -> None:
        if self.interval <= 0 or seconds <= 0:
            return
        per = seconds / records
        self.per_record = per if not self.per_record else 0.7 * self.per_record + 0.3 * per
        if self.per_record > 0:
            fit = int(self.interval / self.per_record)
            self.now = max(self.least, min(self.most, fit))


def _partitions(partitions: list[TopicPartition], most: int = 12) -> str:
    shown = ", ".join(map(str, partitions[:most]))
    return shown + (f" and {len(partitions) - most} more" if len(partitions) > most else "")


def _total(counter: Any) -> int:
    """A counter's value summed over its labels."""
    return int(
        sum(
            sample.value
            for metric in counter.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
    )
