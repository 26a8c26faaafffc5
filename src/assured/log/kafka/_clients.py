"""Producer and consumer over confluent-kafka, speaking the log protocol."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer as KConsumer
from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka import Producer as KProducer
from confluent_kafka import TopicPartition as KTopicPartition

from assured.errors import (
    AbortableError,
    AssuredError,
    DeliveryError,
    LogError,
    ProducerFencedError,
    RetriableError,
    TransactionTimedOutError,
    UsageError,
)
from assured.log._models import (
    DeliveryReport,
    GroupMetadata,
    Header,
    OffsetReset,
    Record,
    TopicPartition,
)
from assured.log._protocol import (
    MAX_OFFSET_METADATA,
    Admin,
    AssignCallback,
    Consumer,
    OnDelivery,
    PartitionsCallback,
    Producer,
    checked_metadata,
)
from assured.log.kafka._errors import Scrubber, call, translate, translated

# The broker refused a commit's offset metadata (offset.metadata.max.bytes); below the least
# worth keeping, commits carry none.
_METADATA_TOO_LARGE = KafkaError.OFFSET_METADATA_TOO_LARGE
_LEAST_METADATA = 32

__all__ = ["KafkaConsumer", "KafkaProducer"]

log = logging.getLogger("assured.log.kafka")

_new_record = functools.partial(tuple.__new__, Record)

_MESSAGE_MAX_BYTES = 1_000_000  # librdkafka's default message.max.bytes
_NO_OFFSET = -1001  # librdkafka's OFFSET_INVALID: nothing consumed, stored or committed
_BEGINNING, _END = -2, -1  # librdkafka's logical offsets
# An assignment waits for committed positions that an open transaction holds (pending until it
# commits or aborts, within its transaction timeout) for this share of max.poll.interval.ms, at
# least a minute; it says so every _SAY_EVERY_S.
_STABLE_SHARE, _STABLE_FLOOR_S, _SAY_EVERY_S = 0.8, 60.0, 15.0
# A transactional call made out of turn: another one is under way or the state forbids it.
_OUT_OF_TURN = {KafkaError._STATE, KafkaError._CONFLICT, KafkaError._PREV_IN_PROGRESS}


def _resumable(err: KafkaError) -> bool:
    """librdkafka keeps the call going and a call to the same method picks it up again."""
    return (
        bool(err.retriable())
        and not err.fatal()
        and not err.txn_requires_abort()
        and err.code() not in _OUT_OF_TURN
    )


def _fresh(error: AssuredError) -> AssuredError:
    """The same error again, as a new exception (raising one instance twice chains tracebacks)."""
    return type(error)(str(error))


class _Failures:
    """confluent-kafka's producer-wide ``on_delivery``: it counts records sent without a callback
    of their own that were not written. It runs inside librdkafka's poll, so it never raises."""

    __slots__ = ("causes", "count", "topics")

    def __init__(self) -> None:
        self.count = 0
        self.causes: dict[int, KafkaError] = {}
        self.topics: set[str] = set()

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.count += 1
            self.causes.setdefault(err.code(), err)
            self.topics.add(msg.topic() or "?")

    def take(self) -> tuple[int, list[KafkaError], list[str]]:
        taken = (self.count, list(self.causes.values()), sorted(self.topics))
        self.count = 0
        self.causes = {}
        self.topics = set()
        return taken


def _unanswered(_offsets: list[KTopicPartition], _group: Any, timeout: float) -> None:
    """A send_offsets_to_transaction whose request never leaves the client (a stuck call)."""
    time.sleep(timeout)
    raise KafkaException(
        KafkaError(KafkaError._TIMED_OUT, "Failed to add offsets to transaction: Local: Timed out")
    )


class _Background:
    """One blocking librdkafka call on a daemon thread, so that its caller can stop waiting at
    a deadline while the call goes on (a call inside librdkafka cannot be interrupted)."""

    def __init__(self, fn: Callable[[], object], key: object):
        self.key = key
        self.error: KafkaException | None = None
        self._done = threading.Event()
        thread = threading.Thread(target=self._run, args=(fn,), name="assured-kafka-call")
        thread.daemon = True
        thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except KafkaException as e:
            self.error = e
        except Exception as e:  # reported to the caller, as librdkafka's own errors are
            self.error = KafkaException(KafkaError(KafkaError._FAIL, str(e)))
        finally:
            self._done.set()

    def wait(self, seconds: float) -> bool:
        return self._done.wait(max(seconds, 0.0))


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "on")


class KafkaProducer(Producer):
    """A confluent-kafka producer with the project's delivery and transaction rules.

    Delivery failures are never silent. A record sent with ``on_delivery`` reports to it; one
    sent without is counted by a producer-wide callback, and the next ``flush()`` (or
    ``close()``) raises :class:`~assured.errors.DeliveryError` for it. To keep that callback off
    the hot path, a non-transactional producer starts with ``delivery.report.only.error``: only
    failures reach Python. The first record sent *with* a callback needs every report, so the
    producer then flushes once and continues on a fresh librdkafka producer that reports every
    record. Inside a transaction a record that fails makes the transaction abortable, and
    ``commit_transaction`` raises :class:`~assured.errors.AbortableError`; so a transactional
    producer has no producer-wide callback (no cost per record), and its ``flush()`` raises
    ``DeliveryError`` only for records still queued: the commit is where a failed record
    surfaces (and ``send``, which raises ``AbortableError`` once the transaction is doomed). Passing
    ``delivery.report.only.error`` in ``config`` fixes the mode: ``true`` and callbacks hear
    only failures; ``false`` and every record is reported from the start.

    Transactional calls keep to their ``timeout`` as a total deadline and can be resumed as
    librdkafka requires; what a caller must do with each error is written at the top of
    :mod:`assured.log.kafka._errors`.

    A transaction held open past ``transaction.timeout.ms`` is aborted by the broker, which
    bumps the producer epoch; librdkafka then reports the very error a newer instance with the
    same transactional id would cause (``_FENCED``, fatal: "This instance has been fenced by a
    newer instance"; the broker answers ``INVALID_PRODUCER_EPOCH`` in both cases). We tell them
    apart by the open transaction's age: fenced while it is older than its timeout is raised as
    :class:`~assured.errors.TransactionTimedOutError`, and ``abort_transaction()`` then replaces
    the librdkafka producer and calls ``init_transactions`` again. Should a second instance
    really exist *and* this transaction also have outlived its timeout, that re-initialisation
    fences the other instance, which then stops; the group generation sent with the offsets
    still keeps either from committing for partitions it no longer owns.
    """

    def __init__(self, config: dict[str, Any], scrub: Scrubber, transactional_id: str | None):
        self._scrub = scrub
        self._transactional = transactional_id is not None
        only_errors = config.get("delivery.report.only.error")
        ours = ("delivery.report.only.error", "on_delivery")
        self._config = {k: v for k, v in config.items() if k not in ours}
        self._txn_timeout = float(config.get("transaction.timeout.ms", 60_000)) / 1000
        self._max_bytes = int(config.get("message.max.bytes", _MESSAGE_MAX_BYTES))
        self._failures = _Failures()
        # Whether librdkafka hands successful deliveries to Python callbacks, and whether we may
        # switch that on when a record with a callback comes (see the class docstring).
        if only_errors is not None:
            self._every_report = not _truthy(only_errors)
            self._adaptive = False
        else:
            self._every_report = self._transactional
            self._adaptive = not self._transactional
        self._closed = False
        self._fatal: AssuredError | None = None  # this producer cannot go on
        self._expired: TransactionTimedOutError | None = None  # fenced by its own timeout
        self._doomed: AbortableError | None = None  # the open transaction must be aborted
        self._began: float | None = None  # when the open transaction began (monotonic)
        self._resume: str | None = None  # a transactional call that timed out, to call again
        self._offsets: _Background | None = None  # a send_offsets_to_transaction still running
        self._p = self._handle()
        # The audit's stuck coordinator (see assured.runtime.crashpoints), if armed.
        from assured.runtime.crashpoints import stuck  # here: assured.runtime imports the log

        self._stuck = stuck("send-offsets") if self._transactional else None

    def _handle(self) -> KProducer:
        config = dict(self._config)
        if not self._transactional:
            config["on_delivery"] = self._failures
        if not self._every_report:
            config["delivery.report.only.error"] = True
        with translated(self._scrub, "creating the Kafka producer"):
            return KProducer(config)

    # -- sending -------------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[Header] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        on_delivery: OnDelivery | None = None,
    ) -> None:
        if self._closed:
            raise UsageError("this producer is closed")
        if not headers and partition is None and timestamp_ms is None and on_delivery is None:
            try:  # the common case, without building keyword arguments
                self._p.produce(topic, value, key)
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self._call(lambda: self._p.poll(0.1), f"sending to {topic!r}")
            except KafkaException as e:
                raise self._send_failure(e.args[0], topic) from None
        kwargs: dict[str, Any] = {"value": value, "key": key}
        if headers:
            kwargs["headers"] = list(headers)
        if partition is not None:
            kwargs["partition"] = partition
        if timestamp_ms is not None:
            kwargs["timestamp"] = timestamp_ms
        if on_delivery is not None:
            if not self._every_report and self._adaptive:
                self._report_every_record()
            kwargs["on_delivery"] = self._reporter(on_delivery)
        while True:
            try:
                self._p.produce(topic, **kwargs)
                return
            except BufferError:
                self._call(lambda: self._p.poll(0.1), f"sending to {topic!r}")
            except KafkaException as e:
                raise self._send_failure(e.args[0], topic) from None

    def max_record_bytes(self, topic: str) -> int | None:
        """librdkafka's own limit, ``message.max.bytes`` (a topic's ``max.message.bytes`` is
        the broker's, not known here)."""
        return self._max_bytes

    def _report_every_record(self) -> None:
        """Go on with a librdkafka producer that reports successes too. What the old one holds
        is written (or failed, and counted for the next flush) first, so no partition's
        records can overtake each other across the two."""
        self._check()
        self._call(lambda: self._p.flush(-1), "flushing before the first record with a callback")
        self._every_report = True
        self._adaptive = False
        self._p = self._handle()

    def _reporter(self, on_delivery: OnDelivery) -> Callable[[KafkaError | None, Message], None]:
        scrub = self._scrub

        def report(err: KafkaError | None, msg: Message) -> None:
            ts = msg.timestamp()[1]
            if err is None:
                offset = msg.offset()
                on_delivery(
                    DeliveryReport(msg.topic() or "", msg.partition() or 0, offset or 0, ts)
                )
            else:
                error = translate(err, scrub, f"delivering to {msg.topic()!r}")
                on_delivery(DeliveryReport(msg.topic() or "", msg.partition() or -1, -1, ts, error))

        return report

    def poll(self, timeout: float = 0.0) -> int:
        self._check()
        return int(self._call(lambda: self._p.poll(timeout), "polling the producer"))

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every queued record is written or failed; returns 0. Raises
        :class:`~assured.errors.DeliveryError` when a record sent without a callback since the
        last flush failed, or when records are still queued as ``timeout`` runs out."""
        self._check()
        seconds = -1 if timeout is None else timeout
        queued = int(self._call(lambda: self._p.flush(seconds), "flushing"))
        failed, causes, topics = self._failures.take()
        if failed or queued:
            raise self._delivery_error(failed, causes, topics, queued, timeout, "flush")
        return 0

    def _delivery_error(
        self,
        failed: int,
        causes: list[KafkaError],
        topics: list[str],
        queued: int,
        timeout: float | None,
        what: str,
    ) -> DeliveryError:
        errors: list[AssuredError] = [
            translate(cause, self._scrub, f"delivering to {', '.join(map(repr, topics))}")
            for cause in causes
        ]
        said = []
        if failed:
            said.append(
                f"{failed} record(s) sent without a delivery callback to "
                f"{', '.join(map(repr, topics))} were not written ({errors[0]})"
            )
        if queued:
            waited = "its timeout" if timeout is None else f"{timeout:g}s"
            still = RetriableError(
                f"{what}: {queued} record(s) still queued after {waited}, neither written "
                "nor failed yet (a broker away or slow): they may still be written"
            )
            errors.append(still)
            said.append(str(still).removeprefix(f"{what}: "))
        advice = (
            "they may be sent again (records still queued may land too: duplicates, not loss)"
            if all(e.retriable for e in errors)
            else "fix the cause before sending them again"
        )
        return DeliveryError(
            f"{what}: {'; '.join(said)}. Commit no position past them; {advice}.",
            failed + queued,
            tuple(errors),
        )

    # -- errors --------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` on the librdkafka producer, its errors translated (and remembered when
        fatal)."""
        try:
            return fn()
        except KafkaException as e:
            raise self._failure(e.args[0], what) from None
        except SystemError as e:
            # confluent-kafka raises a fatal error from inside poll()/flush() and may then run a
            # delivery callback with that exception still pending: the SystemError wraps it.
            if isinstance(e.__cause__, KafkaException):
                raise self._failure(e.__cause__.args[0], what) from None
            raise

    def _failure(self, err: KafkaError, what: str) -> AssuredError:
        code = err.code()
        if code == KafkaError._FATAL:
            return self._fatal_cause(what)
        if code in _OUT_OF_TURN:
            return UsageError(self._scrub(f"{what}: {err.str()} ({err.name()})"))
        out = translate(err, self._scrub, what)
        if out.fatal:
            if isinstance(out, ProducerFencedError) and self._outlived_timeout():
                age = time.monotonic() - (self._began or 0.0)
                self._expired = TransactionTimedOutError(
                    f"{what}: the transaction was open {age:.1f}s, longer than its timeout "
                    f"({self._txn_timeout:g}s), so the broker aborted it and bumped the "
                    f"producer epoch (librdkafka reports that as: {self._scrub(err.str())}). "
                    "Nothing it wrote becomes visible. Call abort_transaction() (it starts a "
                    "fresh librdkafka producer) and rewind to the committed positions."
                )
                return _fresh(self._expired)
            if self._fatal is None:
                self._fatal = out
        return out

    def _outlived_timeout(self) -> bool:
        # The broker's clock for the transaction starts at its first record or offsets, after
        # begin_transaction: younger than the timeout by our clock means younger by its too.
        return self._began is not None and time.monotonic() - self._began > self._txn_timeout

    def _stopped(self) -> AssuredError | None:
        error = self._fatal or self._expired
        return _fresh(error) if error is not None else None

    def _fatal_cause(self, what: str) -> AssuredError:
        """produce() says only "fatal error"; librdkafka names the cause once, as an error
        that poll() raises, and again to any transactional call."""
        if self._fatal is None and self._expired is None:
            try:
                self._call(lambda: self._p.poll(0), what)
                if self._transactional and self._resume is None and self._offsets is None:
                    # In the fatal state this changes nothing and returns the cause.
                    self._call(self._p.begin_transaction, what)
            except AssuredError:
                pass
        if self._fatal is None and self._expired is None:
            self._fatal = translate(KafkaError(KafkaError._FATAL), self._scrub, what)
        stopped = self._stopped()
        assert stopped is not None
        return stopped

    def _send_failure(self, err: KafkaError, topic: str) -> AssuredError:
        what = f"sending to {topic!r}"
        if err.code() != KafkaError._STATE or not self._transactional:
            return self._failure(err, what)
        # A transactional producer refuses records outside an open, healthy transaction.
        if self._resume is not None:
            return UsageError(
                f"{what}: {self._resume} timed out and is still in progress; "
                f"call {self._resume}() again first"
            )
        if self._began is None:
            return UsageError(f"{what}: no transaction is open; call begin_transaction() first")
        if self._doomed is not None:
            return _fresh(self._doomed)
        # The transaction turned abortable in the background (a record failed, say).
        # begin_transaction() is refused in any state but "ready", naming that cause.
        try:
            self._p.begin_transaction()
        except KafkaException as e:
            if e.args[0].txn_requires_abort() or e.args[0].fatal():
                return self._failure(e.args[0], what)
        return translate(err, self._scrub, what)

    def _check(self) -> None:
        if self._closed:
            raise UsageError("this producer is closed")
        stopped = self._stopped()
        if stopped is not None:
            raise stopped

    # -- transactions --------------------------------------------------------------------------

    def init_transactions(self, timeout: float = 30.0) -> None:
        self._need_transactional()
        deadline = time.monotonic() + timeout
        self._transact("init_transactions", self._p.init_transactions, deadline)

    def begin_transaction(self) -> None:
        self._need_transactional()
        self._no_call_to_resume("begin_transaction")
        self._call(self._p.begin_transaction, "begin_transaction")
        self._began = time.monotonic()
        self._doomed = None

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group: GroupMetadata, timeout: float = 30.0
    ) -> None:
        self._need_transactional()
        if group.native is None:
            raise UsageError("group metadata must come from a Kafka consumer's group_metadata()")
        what = "send_offsets_to_transaction"
        self._no_call_to_resume(what)
        if self._doomed is not None:
            raise _fresh(self._doomed)
        deadline = time.monotonic() + timeout
        key = (
            tuple(sorted((tp.topic, tp.partition, off) for tp, off in offsets.items())),
            (group.group_id, group.generation, group.member_id),
        )
        earlier = self._offsets
        if earlier is not None:  # the request an earlier call gave up waiting for
            if not earlier.wait(deadline - time.monotonic()):
                raise self._offsets_late(what, timeout)
            self._offsets = None
            if earlier.error is None and earlier.key == key:
                return
            if earlier.error is not None and not _resumable(earlier.error.args[0]):
                raise self._failure(earlier.error.args[0], what)
        ktps = [KTopicPartition(tp.topic, tp.partition, off) for tp, off in offsets.items()]
        pause = 0.05
        while True:
            # librdkafka's send_offsets_to_transaction is not resumable and can block for a
            # whole socket timeout past its own timeout (a coordinator that stopped answering):
            # run it aside, and stop waiting at the deadline.
            call: Callable[[list[KTopicPartition], Any, float], None]
            call = self._p.send_offsets_to_transaction
            if self._stuck is not None and self._stuck.now():
                call = _unanswered
            request = _Background(
                functools.partial(
                    call, ktps, group.native, max(deadline - time.monotonic(), 0.001)
                ),
                key,
            )
            if not request.wait(deadline - time.monotonic()):
                self._offsets = request
                raise self._offsets_late(what, timeout)
            if request.error is None:
                return
            err = request.error.args[0]
            left = deadline - time.monotonic()
            if _resumable(err) and left > pause:
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            raise self._failure(err, what)

    def _offsets_late(self, what: str, timeout: float) -> RetriableError:
        return RetriableError(
            f"{what}: send_offsets_to_transaction did not finish within {timeout:g}s (the group "
            "or transaction coordinator does not answer); the request goes on in the "
            "background: call send_offsets_to_transaction() again with the same offsets to "
            "wait for it, or abort_transaction()"
        )

    def _settle_offsets(self, what: str, deadline: float, timeout: float) -> None:
        """Wait for a send_offsets_to_transaction an earlier call gave up waiting for: librdkafka
        refuses any other transactional call while it runs."""
        earlier = self._offsets
        if earlier is None:
            return
        if not earlier.wait(deadline - time.monotonic()):
            raise RetriableError(
                f"{what}: an earlier send_offsets_to_transaction is still in progress after "
                f"{timeout:g}s more; call {what}() again to go on waiting"
            )
        self._offsets = None
        if earlier.error is not None and what == "commit_transaction":
            cause = self._failure(earlier.error.args[0], "send_offsets_to_transaction")
            if cause.fatal:
                raise cause
            self._doomed = AbortableError(
                f"{what}: the transaction's offsets never made it into it ({cause}); it must "
                "not commit its outputs without them: abort it"
            )
            raise _fresh(self._doomed)

    def commit_transaction(self, timeout: float = 30.0) -> None:
        self._need_transactional()
        what = "commit_transaction"
        if self._doomed is not None and self._resume is None:
            raise _fresh(self._doomed)
        deadline = time.monotonic() + timeout
        self._settle_offsets(what, deadline, timeout)
        self._transact(what, self._p.commit_transaction, deadline)
        self._began = None

    def abort_transaction(self, timeout: float = 30.0) -> None:
        if self._closed:
            raise UsageError("this producer is closed")
        if not self._transactional:
            raise UsageError("transactions need a producer made with transactional_id=...")
        if self._fatal is not None:
            raise _fresh(self._fatal)
        what = "abort_transaction"
        deadline = time.monotonic() + timeout
        if self._expired is not None:
            self._replace_fenced_handle(deadline)
            return
        self._settle_offsets(what, deadline, timeout)
        self._transact(what, self._p.abort_transaction, deadline)
        self._began = None
        self._doomed = None

    def _replace_fenced_handle(self, deadline: float) -> None:
        """After the broker aborted a transaction that outlived its timeout, the librdkafka
        producer is fenced for good: start a fresh one under the same transactional id."""
        if self._resume != "init_transactions":  # not a retry of this same abort
            old, self._p = self._p, self._handle()
            self._offsets = None  # a request still running there keeps that producer alive
            self._resume = None
            try:  # its records belong to the aborted transaction: fail their callbacks now
                old.purge()
                old.poll(0)
            except (KafkaException, SystemError):
                pass
        self._transact("init_transactions", self._p.init_transactions, deadline)
        self._expired = None
        self._began = None
        self._doomed = None

    def _transact(self, what: str, fn: Callable[[float], object], deadline: float) -> None:
        """A resumable librdkafka transactional call, within ``deadline`` in all: a call that
        times out is called again (librdkafka resumes it) while time is left."""
        self._no_call_to_resume(what)
        timeout = max(deadline - time.monotonic(), 0.0)
        pause = 0.05
        while True:
            try:
                self._call_raw(fn, max(deadline - time.monotonic(), 0.0))
            except KafkaException as e:
                err = e.args[0]
                if not _resumable(err):
                    self._resume = None
                    raise self._failure(err, what) from None
                self._resume = what
                left = deadline - time.monotonic()
                if left > 0.06:  # the call again, with 50 ms at least: never a 0 ms one, which
                    # librdkafka may give up before its first step and leave that step's result
                    # for the next call to find
                    time.sleep(min(pause, left - 0.05))
                    pause = min(pause * 2, 1.0)
                    continue
                raise RetriableError(
                    self._scrub(
                        f"{what} did not finish within {timeout:g}s ({err.str()}); it goes on "
                        f"in the background: call {what}() again to resume it"
                    )
                ) from None
            self._resume = None
            return

    def _call_raw(self, fn: Callable[[float], object], seconds: float) -> None:
        try:
            fn(seconds)
        except SystemError as e:
            if isinstance(e.__cause__, KafkaException):
                raise e.__cause__ from None
            raise

    def _no_call_to_resume(self, what: str) -> None:
        if self._resume is None or self._resume == what:
            return
        why = (
            " (the commit may already be decided, so it cannot be aborted now)"
            if self._resume == "commit_transaction"
            else ""
        )
        raise UsageError(
            f"{what}: {self._resume} timed out and is still in progress{why}; call "
            f"{self._resume}() again until it returns"
        )

    def _need_transactional(self) -> None:
        if self._closed:
            raise UsageError("this producer is closed")
        if not self._transactional:
            raise UsageError("transactions need a producer made with transactional_id=...")
        stopped = self._stopped()
        if stopped is not None:
            raise stopped

    def close(self) -> None:
        """Flush for up to 30 s; raises :class:`~assured.errors.DeliveryError` if a record sent
        without a callback failed or is still queued (it would be lost)."""
        if self._closed:
            return
        self._closed = True
        if self._offsets is not None:  # never let the handle go while a call runs inside it
            self._offsets.wait(30)
        if self._stopped() is not None:
            return  # already reported; nothing more can be written
        queued = int(self._call(lambda: self._p.flush(30), "closing the producer"))
        failed, causes, topics = self._failures.take()
        if failed or queued:
            raise self._delivery_error(failed, causes, topics, queued, 30.0, "close")


def _headers(
    raw: Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]],
) -> tuple[Header, ...]:
    pairs = raw.items() if isinstance(raw, Mapping) else raw
    return tuple((k, v.encode() if isinstance(v, str) else v) for k, v in pairs)


def _generation(native: object) -> int:
    """The generation inside confluent-kafka's serialized group metadata ("CGMDv2:" then a
    little-endian int32), for display and tests; -1 where the format is not that one. The
    broker checks the generation itself, from ``native``."""
    if isinstance(native, bytes) and native.startswith(b"CGMDv2:") and len(native) >= 11:
        return int.from_bytes(native[7:11], "little", signed=True)
    return -1


class KafkaConsumer(Consumer):
    def __init__(
        self,
        config: dict[str, Any],
        scrub: Scrubber,
        group_id: str | None,
        reset: OffsetReset,
        admin: Callable[[], Admin],
    ):
        self._scrub = scrub
        self._group_id = group_id
        self._reset = reset
        self._make_admin = admin
        self._admin: Admin | None = None
        # Asynchronous commits in order (see commit()): at most one in flight; offsets asked
        # for meanwhile wait, newest per partition, and go when its answer is served.
        self._in_flight = False
        self._waiting: dict[tuple[str, int], tuple[int, str]] = {}  # offset, metadata
        self._sent: dict[tuple[str, int], tuple[int, str]] = {}  # the commit in flight's
        self._metadata_limit = MAX_OFFSET_METADATA  # lowered when the broker refuses more
        self._early: list[Record] = []  # read while a commit waited; poll() returns them first
        self._user_paused: set[TopicPartition] = set()
        with translated(scrub, "creating the Kafka consumer"):
            self._c = KConsumer({**config, "on_commit": self._async_commit_done})
        self._assigned: list[TopicPartition] = []
        self._cooperative = "cooperative" in str(config.get("partition.assignment.strategy"))
        self._subscribed = False
        self._closed = False
        self._on_lost: PartitionsCallback | None = None
        self._lost_reported = False  # a loss was reported since the last missed poll interval
        self._starts: dict[TopicPartition, int] = {}  # where on_assign or seek said to begin
        # read_committed: an assignment starts from committed offsets read here (see
        # _stable_starts), never from librdkafka's own fetch of them.
        self._stable = config.get("isolation.level", "read_committed") == "read_committed"
        poll_s = int(config.get("max.poll.interval.ms", 300_000)) / 1000
        self._stable_wait_s = max(_STABLE_FLOOR_S, _STABLE_SHARE * poll_s)
        # An error inside a rebalance callback: librdkafka then assigns the partitions itself,
        # at offsets nobody chose, so this consumer refuses every later call with it.
        self._broken: AssuredError | None = None
        self._closing = False  # close() is under way: an assignment then is never read from
        self._gone_during: set[tuple[str, int]] = set()  # revoked or lost during this poll()

    # -- membership ----------------------------------------------------------------------------

    def subscribe(
        self,
        topics: Sequence[str],
        on_assign: AssignCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
        on_lost: PartitionsCallback | None = None,
    ) -> None:
        self._check_open()
        if self._group_id is None:
            raise UsageError("subscribe() needs a consumer made with group_id=...")
        admin = self._get_admin()
        for t in topics:
            admin.describe_topic(t)  # an unknown topic is an error now, not a silent wait

        def assigned(consumer: KConsumer, ktps: list[KTopicPartition]) -> None:
            tps = [TopicPartition(k.topic, k.partition) for k in ktps]
            self._assigned = sorted(set(self._assigned) | set(tps))
            for tp in tps:
                self._starts.pop(tp, None)
            try:
                starts = dict(on_assign(tps) or {}) if on_assign is not None else {}
                unset = [tp for tp in tps if tp not in starts]
                if self._stable and unset and not self._closing:
                    starts.update(self._stable_starts(unset))
            except AssuredError as e:
                self._broken = e
                raise
            if starts:
                self._starts.update(starts)
                # Start where the caller says (librdkafka takes offsets with the assignment).
                chosen = [
                    KTopicPartition(k.topic, k.partition, starts.get(tp, _NO_OFFSET))
                    for k, tp in zip(ktps, tps, strict=True)
                ]
                if self._cooperative:
                    consumer.incremental_assign(chosen)
                else:
                    consumer.assign(chosen)

        def revoked(_: KConsumer, ktps: list[KTopicPartition]) -> None:
            tps = [TopicPartition(k.topic, k.partition) for k in ktps]
            if on_revoke is not None:
                on_revoke(tps)
            self._forget(tps)

        def lost(_: KConsumer, ktps: list[KTopicPartition]) -> None:
            tps = [TopicPartition(k.topic, k.partition) for k in ktps]
            self._lost_reported = True
            if on_lost is not None:
                on_lost(tps)
            self._forget(tps)

        self._on_lost = on_lost

        with translated(self._scrub, "subscribing"):
            self._c.subscribe(list(topics), on_assign=assigned, on_revoke=revoked, on_lost=lost)
        self._subscribed = True

    def _stable_starts(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Where newly assigned partitions start: their committed offsets, read once no open
        transaction holds them (``committed()`` waits for stable offsets, KIP-447); the reset
        policy where the group has none.

        Not left to librdkafka: its own fetch, told "unstable" while a transaction that sent
        offsets is still open, puts the partition back with no offset when the assignment
        changes meanwhile (a member joins or leaves), and the partition then starts from
        ``auto.offset.reset``: from its beginning, every committed record handled again."""
        committed = self._committed(partitions, self._stable_wait_s, waiting=True)
        reset = {"earliest": _BEGINNING, "latest": _END}.get(self._reset)
        starts: dict[TopicPartition, int] = {}
        for tp, offset in committed.items():
            if offset is not None:
                starts[tp] = offset
            elif reset is not None:  # "error": no start, and librdkafka reports it
                starts[tp] = reset
        return starts

    def _forget(self, gone: Sequence[TopicPartition]) -> None:
        """Partitions that left: an offset still waiting to be committed for one of them would
        land later, under another owner, maybe behind what that owner committed."""
        gone_set = set(gone)
        self._gone_during.update((tp.topic, tp.partition) for tp in gone_set)
        self._assigned = [tp for tp in self._assigned if tp not in gone_set]
        for tp in gone_set:
            self._waiting.pop((tp.topic, tp.partition), None)
            self._sent.pop((tp.topic, tp.partition), None)  # not to be sent again either
            self._starts.pop(tp, None)
        self._early = [
            r for r in self._early if TopicPartition(r.topic, r.partition) not in gone_set
        ]

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self._check_open()
        if self._subscribed:
            raise UsageError("this consumer is subscribed to a group; it cannot also assign()")
        admin = self._get_admin()
        for tp in partitions:
            count = admin.describe_topic(tp.topic).partitions
            if not 0 <= tp.partition < count:
                from assured.errors import UnknownTopicError

                raise UnknownTopicError(
                    f"topic {tp.topic!r} has partitions 0..{count - 1}; "
                    f"there is no partition {tp.partition}"
                )
        with translated(self._scrub, "assigning partitions"):
            self._c.assign([KTopicPartition(tp.topic, tp.partition) for tp in partitions])
        self._assigned = list(partitions)

    def assignment(self) -> list[TopicPartition]:
        return list(self._assigned)

    def _get_admin(self) -> Admin:
        if self._admin is None:
            self._admin = self._make_admin()
        return self._admin

    # -- positions -----------------------------------------------------------------------------

    def maybe_more_fetched(self) -> bool:
        """Yes if an assigned partition's position is below the high watermark the last fetch
        response reported (librdkafka's cached one: no request). One offset of slack: a
        transaction's commit marker at the end is never handed out."""
        if not self._assigned:
            return False
        parts = [KTopicPartition(tp.topic, tp.partition) for tp in self._assigned]
        try:
            for now in self._c.position(parts):
                if now.offset < 0:
                    continue  # nothing fetched yet
                _, high = self._c.get_watermark_offsets(now, cached=True)
                if high > now.offset + 1:
                    return True
        except (KafkaException, RuntimeError):
            return False  # a hint only: when it cannot tell, the interval decides
        return False

    def position(self, tp: TopicPartition) -> int:
        self._check_open()
        if tp not in self._assigned:
            raise UsageError(f"{tp} is not assigned to this consumer")
        ktp = KTopicPartition(tp.topic, tp.partition)
        with translated(self._scrub, f"reading the position of {tp}"):
            (now,) = self._c.position([ktp])
        if now.offset >= 0:
            return int(now.offset)
        committed = self.committed([tp])[tp]
        if committed is not None:
            return committed
        w = self._get_admin().watermarks(tp)
        if self._reset == "earliest":
            return w.low
        if self._reset == "latest":
            return w.high
        raise LogError(f"no valid offset for {tp} and auto_offset_reset='error'; seek() first")

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._check_open()
        if tp not in self._assigned:
            raise UsageError(f"{tp} is not assigned to this consumer; seek() needs it assigned")
        ktp = KTopicPartition(tp.topic, tp.partition, offset)
        self._early = [r for r in self._early if (r.topic, r.partition) != tp]
        try:
            self._c.seek(ktp)
        except KafkaException as e:
            if e.args[0].code() != KafkaError._STATE:
                raise translate(e, self._scrub, f"seeking {tp} to {offset}") from None
            # Not fetching yet: librdkafka refuses a seek, but takes a start offset on assign.
            self._starts[tp] = offset
            with translated(self._scrub, f"seeking {tp} to {offset}"):
                self._c.incremental_unassign([KTopicPartition(tp.topic, tp.partition)])
                self._c.incremental_assign([ktp])

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        with translated(self._scrub, "pausing"):
            self._c.pause([KTopicPartition(tp.topic, tp.partition) for tp in partitions])
        self._user_paused.update(partitions)

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        with translated(self._scrub, "resuming"):
            self._c.resume([KTopicPartition(tp.topic, tp.partition) for tp in partitions])
        self._user_paused.difference_update(partitions)

    # -- fetching ------------------------------------------------------------------------------

    def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        self._check_open()
        if self._early:
            out, self._early = self._early[:max_records], self._early[max_records:]
        else:
            with translated(self._scrub, "polling"):
                # librdkafka's consume(n) waits for all n; wait for the first, then take the
                # rest of what is already fetched.
                msgs = self._c.consume(max_records, 0)
                if not msgs and timeout > 0:
                    msgs = self._c.consume(1, timeout)
                    if msgs and max_records > 1:
                        self._gone_during.clear()
                        more = self._c.consume(max_records - 1, 0)
                        if self._gone_during:
                            # A rebalance ran in that call: what the one before returned from
                            # partitions that left is not ours to handle (their next owner, or
                            # this member again, reads them from the committed offset).
                            gone = self._gone_during
                            msgs = [m for m in msgs if (m.topic(), m.partition()) not in gone]
                        msgs += more
            out = self._records(msgs)
        self._send_waiting_commit()  # the one in flight may have been answered meanwhile
        return out

    def _records(self, msgs: list[Message]) -> list[Record]:
        out: list[Record] = []
        append = out.append
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.code() == KafkaError._MAX_POLL_EXCEEDED:
                    self._missed_poll_interval(err)
                    continue
                error = translate(err, self._scrub, "consuming")
                if error.retriable and "committed offsets" in err.str():
                    self._fetch_committed_again(error)
                    continue
                raise error
            headers = m.headers()
            # tuple.__new__ straight from the message's fields: no Python-level __new__.
            append(
                _new_record(
                    (
                        m.topic(),
                        m.partition(),
                        m.offset(),
                        m.timestamp()[1],
                        m.key(),
                        m.value(),
                        _headers(headers) if headers else (),
                    )
                )
            )
        return out

    def _fetch_committed_again(self, error: AssuredError) -> None:
        """librdkafka drops a fetch of committed offsets that met a coordinator still loading or
        moved (a new cluster's first groups), and never asks again: the partitions waiting for
        it would wait forever. Assigning them again fetches again."""
        log.warning("%s: fetching them again", error)
        if not self._assigned:
            return
        ktps = [KTopicPartition(tp.topic, tp.partition) for tp in self._assigned]
        with translated(self._scrub, "fetching committed offsets again"):
            now = self._c.position(ktps)
            if self._subscribed and not self._cooperative:  # eager: the whole assignment
                self._c.assign([self._start(k) for k in now])
                return
            waiting = [k for k in now if k.offset < 0]  # nothing read from them yet
            if waiting:
                self._c.incremental_unassign(
                    [KTopicPartition(k.topic, k.partition) for k in waiting]
                )
                self._c.incremental_assign([self._start(k) for k in waiting])

    def _start(self, k: KTopicPartition) -> KTopicPartition:
        """Where partition ``k`` goes on from: its position, else a start set by on_assign or
        seek, else the committed offset (librdkafka's "invalid" offset asks for it)."""
        if k.offset >= 0:
            return KTopicPartition(k.topic, k.partition, k.offset)
        start = self._starts.get(TopicPartition(k.topic, k.partition), _NO_OFFSET)
        return KTopicPartition(k.topic, k.partition, start)

    def _missed_poll_interval(self, err: KafkaError) -> None:
        """More than ``max.poll.interval.ms`` passed between two polls: librdkafka left the group
        and runs ``on_lost`` for the partitions, then rejoins on the next polls. Not an error
        for the caller: the records it handled since its last commit go to the partitions' next
        owner (which may be this member again) from the committed offsets."""
        log.warning(
            "%s: this consumer left the group and lost its partitions (their records since the "
            "last commit will be read again); it rejoins on the next polls. Poll more often or "
            "raise max_poll_interval_ms",
            self._scrub(err.str()),
        )
        if not self._lost_reported and self._assigned:
            # librdkafka reports the loss itself; should it not have, say so here.
            gone = list(self._assigned)
            if self._on_lost is not None:
                self._on_lost(gone)
            self._forget(gone)
        self._lost_reported = False

    # -- commits -------------------------------------------------------------------------------

    def commit(
        self,
        offsets: Mapping[TopicPartition, int] | None = None,
        asynchronous: bool = False,
        metadata: Mapping[TopicPartition, str] | None = None,
    ) -> None:
        self._check_open()
        if self._group_id is None:
            raise UsageError("commit() needs a consumer made with group_id=...")
        if offsets is None:
            with translated(self._scrub, "reading positions"):
                now = self._c.position([KTopicPartition(t, p) for t, p in self._assigned])
            ktps = [k for k in now if k.offset >= 0]
        else:
            ktps = [KTopicPartition(tp.topic, tp.partition, off) for tp, off in offsets.items()]
        if not ktps:
            return
        notes = checked_metadata(metadata)
        wanted = {
            (k.topic, k.partition): (k.offset, notes.get(TopicPartition(k.topic, k.partition), ""))
            for k in ktps
        }
        if asynchronous:
            self._waiting.update(wanted)
            self._send_waiting_commit()
            return
        self._await_async_commit()  # never overtaken by an older asynchronous commit
        merged, self._waiting = self._waiting, {}
        merged.update(wanted)
        self._commit_now(merged)

    def _commit_now(self, offsets: dict[tuple[str, int], tuple[int, str]]) -> None:
        ktps = [KTopicPartition(t, p, off, metadata=m) for (t, p), (off, m) in offsets.items()]
        noted = any(m for _, m in offsets.values())

        def once() -> bool:
            try:
                self._c.commit(offsets=ktps, asynchronous=False)
            except KafkaException as e:
                err = e.args[0] if e.args else None
                if noted and isinstance(err, KafkaError) and err.code() == _METADATA_TOO_LARGE:
                    return False
                raise
            return True

        # A coordinator moving or loading is retriable; a stale generation is not.
        if not call(once, self._scrub, "committing offsets", 30):
            self._metadata_too_long(offsets)
            self._commit_now({tp: (off, "") for tp, (off, _) in offsets.items()})

    @property
    def offset_metadata_limit(self) -> int:
        return self._metadata_limit

    def _metadata_too_long(self, offsets: dict[tuple[str, int], tuple[int, str]]) -> None:
        """The broker refused a commit for its metadata (``offsets``'): its limit is below
        the longest of it. Commits carry at most half that from now on (the positions are
        committed without it meanwhile: records handled above them may run again)."""
        longest = max(len(m) for _, m in offsets.values())
        limit = longest // 2 if longest // 2 >= _LEAST_METADATA else 0
        if limit >= self._metadata_limit:
            return
        self._metadata_limit = limit
        log.warning(
            "the broker refused %d characters of offset metadata (its offset.metadata.max.bytes "
            "is lower): commits now keep %s of the records handled above their positions, "
            "so more of them run again after a restart or a rebalance. Set "
            "offset.metadata.max.bytes to 4096 (Kafka's default) or more to keep them all.",
            longest, f"at most {limit} characters" if limit else "none",
        )  # fmt: skip

    # librdkafka sends asynchronous commits back to back and retries one that timed out, so an
    # older commit can land after a newer one and move the committed offset backwards. So at
    # most one is in flight: the offsets asked for meanwhile wait (merged, newest per partition)
    # until its answer is served by a poll, then go as one commit. A synchronous commit waits
    # for the one in flight and takes the waiting offsets into its own.

    def _send_waiting_commit(self) -> None:
        if self._in_flight or not self._waiting:
            return
        offsets, self._waiting = self._waiting, {}
        ktps = [KTopicPartition(t, p, off, metadata=m) for (t, p), (off, m) in offsets.items()]
        self._in_flight, self._sent = True, offsets
        try:
            self._c.commit(offsets=ktps, asynchronous=True)
        except KafkaException as e:
            self._in_flight = False
            log.warning(
                "an asynchronous commit could not be sent: %s",
                translate(e, self._scrub, "committing offsets"),
            )

    def _async_commit_done(self, err: KafkaError | None, parts: list[KTopicPartition]) -> None:
        """confluent-kafka's ``on_commit``: the answer to an asynchronous commit (only those),
        served inside consume()."""
        self._in_flight = False
        sent, self._sent = self._sent, {}
        failed = err or next((p.error for p in parts if p.error is not None), None)
        if (
            failed is not None
            and failed.code() == _METADATA_TOO_LARGE
            and any(m for _, m in sent.values())
        ):
            self._metadata_too_long(sent)
            assigned = set(self._assigned)
            for (t, p), (offset, _) in sent.items():  # the positions go again, without it
                if TopicPartition(t, p) in assigned:  # (never one of a partition gone since)
                    self._waiting.setdefault((t, p), (offset, ""))
            return
        if failed is not None and failed.code() != KafkaError._NO_OFFSET:
            log.warning(
                "an asynchronous commit failed (a later commit supersedes it): %s",
                translate(failed, self._scrub, "committing offsets"),
            )

    def _await_async_commit(self, timeout: float = 30.0) -> None:
        """Serve consume() until the asynchronous commit in flight is answered. Our partitions
        are paused meanwhile, so that no record is read (librdkafka drops what it fetched ahead
        and fetches it again on resume); a record that comes anyway (a partition we did not
        know of yet) is kept for the next poll()."""
        if not self._in_flight:
            return
        paused = [
            KTopicPartition(tp.topic, tp.partition)
            for tp in self._assigned
            if tp not in self._user_paused
        ]
        deadline = time.monotonic() + timeout
        with translated(self._scrub, "waiting for an asynchronous commit"):
            self._c.pause(paused)
            try:
                while self._in_flight:
                    if time.monotonic() > deadline:
                        raise RetriableError(
                            f"committing offsets: an asynchronous commit has had no answer for "
                            f"{timeout:g}s, and a commit now could be overtaken by it; nothing "
                            "was committed: commit again"
                        )
                    # Read first, then add: a rebalance inside consume() filters _early anew.
                    got = self._records(self._c.consume(100, 0.05))
                    self._early = self._early + got
            finally:
                self._c.resume(paused)

    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        self._check_open()
        if self._group_id is None:
            return dict.fromkeys(partitions)
        return {tp: off for tp, (off, _) in self._read_committed(partitions, 30.0).items()}

    def committed_metadata(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, tuple[int, str]]:
        self._check_open()
        if self._group_id is None or self._closing:  # an assignment at close is never read
            return {}
        # Read as an assignment's start is (see _stable_starts): an open transaction of another
        # member may hold the offsets back for a while, and that is no reason to fail.
        found = self._read_committed(partitions, self._stable_wait_s, waiting=True)
        return {tp: (off, meta) for tp, (off, meta) in found.items() if off is not None}

    def _committed(
        self, partitions: Sequence[TopicPartition], seconds: float, waiting: bool = False
    ) -> dict[TopicPartition, int | None]:
        found = self._read_committed(partitions, seconds, waiting)
        return {tp: off for tp, (off, _) in found.items()}

    def _read_committed(
        self, partitions: Sequence[TopicPartition], seconds: float, waiting: bool = False
    ) -> dict[TopicPartition, tuple[int | None, str]]:
        """The group's committed offsets of ``partitions``, read within ``seconds``. On a
        read_committed consumer the broker holds back offsets an open transaction sent
        ("unstable", KIP-447) and librdkafka's call times out while it does: asked again until
        the deadline. ``waiting``: say so in the log every 15 s."""
        ktps = [KTopicPartition(tp.topic, tp.partition) for tp in partitions]
        started = time.monotonic()
        deadline, said = started + seconds, started
        while True:
            left = deadline - time.monotonic()
            try:
                found = self._c.committed(ktps, timeout=max(0.1, min(10.0, left)))
                break
            except KafkaException as e:
                err = e.args[0]
                pending = err.code() == KafkaError._TIMED_OUT
                if not (pending or err.retriable() or translate(err, self._scrub, "").retriable):
                    raise translate(err, self._scrub, "reading committed offsets") from None
                now = time.monotonic()
                if now >= deadline:
                    raise RetriableError(
                        f"the committed offsets of {_shown(partitions)} could not be read in "
                        f"{seconds:g} s ({self._scrub(err.str())}); a transaction that sent "
                        "them may still be open (it ends within its transaction timeout)"
                    ) from None
                if waiting and now - said >= _SAY_EVERY_S:
                    said = now
                    log.warning(
                        "waiting %.0f s so far for the committed offsets of %s: a transaction "
                        "of another member that sent them may still be open",
                        now - started, _shown(partitions),
                    )  # fmt: skip
                if not pending:
                    time.sleep(min(0.5, max(0.0, deadline - now)))
        out: dict[TopicPartition, tuple[int | None, str]] = {}
        for k in found:
            if k.error is not None:
                raise translate(
                    k.error,
                    self._scrub,
                    f"reading the committed offset of {k.topic}[{k.partition}]",
                )
            offset = k.offset if k.offset >= 0 else None
            out[TopicPartition(k.topic, k.partition)] = (offset, k.metadata or "")
        return out

    def group_metadata(self) -> GroupMetadata:
        if self._group_id is None:
            raise UsageError("group_metadata() needs a consumer made with group_id=...")
        with translated(self._scrub, "reading group metadata"):
            native = self._c.consumer_group_metadata()
            member = self._c.memberid() or ""
        return GroupMetadata(self._group_id, _generation(native), member, native)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this consumer is closed")
        if self._broken is not None:
            raise _fresh(self._broken)

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._in_flight or self._waiting:  # the asynchronous commits asked for, first
                try:
                    self._await_async_commit()
                    if self._waiting:
                        waiting, self._waiting = self._waiting, {}
                        self._commit_now(waiting)
                except AssuredError as e:
                    log.warning("closing: the last asynchronous commits failed: %s", e)
            self._closing = True
            with translated(self._scrub, "closing the consumer"):
                self._c.close()  # runs on_revoke first, which may still commit
        finally:
            self._closed = True


def _shown(partitions: Sequence[TopicPartition], most: int = 8) -> str:
    text = ", ".join(map(str, partitions[:most]))
    return text + (f" and {len(partitions) - most} more" if len(partitions) > most else "")
