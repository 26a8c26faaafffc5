"""The processes of the runtime benchmark, one role each, each in a fresh interpreter:

    python -m assured.bench._workers ROLE 'JSON spec'

Roles: ``assured`` (an :class:`~assured.App` at a guarantee), ``bare`` (confluent-kafka
loops written the way a careful engineer would write them by hand), ``log-loop`` (the same
loops over :mod:`assured.log`, the embedded engine's baseline), and ``read`` (the latency
probe: reads the output topic, prints end-to-end latencies). Each prints one JSON line on
stdout when done. The Quix Streams worker is :mod:`quix_worker`: Quix pins an older
confluent-kafka than assured, so it runs in a virtualenv of its own.

Every processor does the same work: read a record, upper-case its value, write it with the same
key to the output topic. Its clock starts at the first record it sees (group joins are not
throughput) and stops when it has finished: outputs flushed, offsets committed, clients closed.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

__all__ = ["Meter", "main"]

# Latency records carry their send time, wall clock in ns, as the first 20 ASCII digits of the
# value (upper-casing keeps digits); warm-up records start with b"W".
STAMP_DIGITS = 20


class Meter:
    """One processor's clock, CPU and memory: when its first record came, how many it handled,
    the CPU time its process spent from then on, and its RSS sampled every 50 ms by a thread
    (so counting costs the processor nothing per record). ``rss_warm_mb`` is the RSS a tenth
    of the way through the run (after the first record): caches and queues are full by then;
    growth after it is what a long run keeps."""

    def __init__(self, records: int):
        self.records = records
        self.seen = 0
        self.first = 0.0
        self.cpu_first = 0.0
        self._samples: list[tuple[float, float]] = []
        self._done = threading.Event()
        self._proc = psutil.Process()
        threading.Thread(target=self._sample, name="bench-rss", daemon=True).start()

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self._samples.append((time.perf_counter(), self._proc.memory_info().rss / 2**20))

    def start(self) -> None:
        """The first record is here (call once)."""
        self.first = time.perf_counter()
        self.cpu_first = time.process_time()

    def tick(self, n: int) -> None:
        if self.seen == 0:
            self.start()
        self.seen += n

    def result(self) -> dict[str, Any]:
        end = time.perf_counter()
        cpu = time.process_time() - self.cpu_first if self.seen else 0.0
        self._done.set()
        seconds = end - self.first if self.seen else 0.0
        warm_at = self.first + seconds / 10
        warm = [rss for t, rss in self._samples if t >= warm_at]
        return {
            "processed": self.seen,
            "seconds": round(seconds, 4),
            "records_per_s": round(self.seen / seconds, 1) if seconds > 0 else 0.0,
            **cpu_cost(cpu, self.seen, seconds),
            "rss_warm_mb": round(warm[0] if warm else 0.0, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }


def cpu_cost(cpu_s: float, records: int, seconds: float) -> dict[str, float]:
    """What the processor's own process spent (user + system, every thread: librdkafka's too)
    over the measured window: per record, and in cores. On a shared machine it barely moves
    when the wall-clock rate does."""
    return {
        "cpu_s": round(cpu_s, 3),
        "cpu_us_per_record": round(cpu_s * 1e6 / records, 2) if records else 0.0,
        "cpu_cores": round(cpu_s / seconds, 3) if seconds > 0 else 0.0,
    }


def peak_rss_mb() -> float:
    """The kernel's high-water mark of this process's resident memory (VmHWM), no sampling.
    Not ``ru_maxrss``: Linux carries that across exec, so a child would report its parent's."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return psutil.Process().memory_info().rss / 2**20


def transform(value: bytes) -> bytes:
    return value.upper()


# -- assured ----------------------------------------------------------------------------------


def run_assured(spec: dict[str, Any]) -> dict[str, Any]:
    from assured import App

    meter = Meter(spec["records"])
    app = App(
        log=spec["log"],
        group=spec["group"],
        guarantee=spec["guarantee"],
        commit_interval_ms=spec["commit_interval_ms"],
        commit_every=10**9,  # by time (and, adaptive, when caught up), never by count
        commit_mode=spec.get("commit_mode", "adaptive"),
        max_poll_records=spec["max_poll_records"],
        log_config=spec.get("log_config") or {},
    )
    started: list[bool] = []

    @app.handler(spec["input"], output=spec["output"])
    def upper(msg: Any, out: Any) -> None:
        if not started:
            started.append(True)
            meter.start()
        out.send(transform(msg.value), key=msg.key)

    if spec.get("idle_s"):
        stats = app.run(until_idle=spec["idle_s"])
    else:
        stats = app.run(max_messages=spec["records"])
    meter.seen = stats.processed
    return {**meter.result(), **_commits(app.metrics.registry, spec["guarantee"])}


def _commits(registry: Any, guarantee: str) -> dict[str, Any]:
    """How many commits the run made and their mean time (at-least-once: the position commit;
    exactly-once: flush, offsets and commit together), from the App's own metrics. Under
    exactly-once, latency at half load is a few of these: a record waits for the commit under
    way, for its batch, then for its own commit."""
    labels = {"guarantee": guarantee}
    count = registry.get_sample_value("assured_commit_seconds_count", labels) or 0.0
    total = registry.get_sample_value("assured_commit_seconds_sum", labels) or 0.0
    return {
        "commits": int(count),
        "commit_ms_mean": round(total * 1000 / count, 2) if count else None,
    }


# -- bare confluent-kafka loops ---------------------------------------------------------------


def _bare_producer(spec: dict[str, Any], transactional_id: str | None) -> Any:
    from confluent_kafka import Producer

    producer_config: dict[str, Any] = {
        "bootstrap.servers": spec["bootstrap"],
        **spec["producer_config"],
    }
    if transactional_id:
        producer_config["transactional.id"] = transactional_id
    return Producer(producer_config)


def _bare_clients(spec: dict[str, Any], transactional_id: str | None) -> tuple[Any, Any]:
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": spec["bootstrap"],
            "group.id": spec["group"],
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    return consumer, _bare_producer(spec, transactional_id)


def _produce(producer: Any, topic: str, value: bytes, key: bytes | None) -> None:
    while True:
        try:
            producer.produce(topic, value, key)
            return
        except BufferError:  # the local queue is full: serve delivery reports, then retry
            producer.poll(0.05)


def _processing(spec: dict[str, Any]) -> Callable[[Meter, float], bool]:
    """Whether the loop goes on: until ``records`` are handled, or (latency runs) until no
    record came for ``idle_s`` seconds after the first."""
    idle = spec.get("idle_s")

    def more(meter: Meter, last: float) -> bool:
        if idle:
            return meter.seen == 0 or time.monotonic() - last < idle
        return bool(meter.seen < meter.records)

    return more


def run_bare(spec: dict[str, Any]) -> dict[str, Any]:
    """consume(N), produce each, and every commit interval: at-least-once flushes, then
    commits the offsets (the outputs are durable before the offsets that cover them);
    exactly-once runs transactions of one interval: begin, produce, send the consumer's offsets
    with its group metadata, commit."""
    from confluent_kafka import TopicPartition

    meter = Meter(spec["records"])
    eos = spec["guarantee"] == "exactly-once"
    consumer, producer = _bare_clients(spec, f"{spec['group']}-txn" if eos else None)
    if eos:
        producer.init_transactions(30)
    consumer.subscribe([spec["input"]])
    interval = spec["commit_interval_ms"] / 1000
    out, batch, more = spec["output"], spec["max_poll_records"], _processing(spec)
    pending: dict[tuple[str, int], int] = {}
    # at-least-once: since the last commit; exactly-once: since the transaction began
    began = last_record = time.monotonic()

    def commit(final: bool) -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in pending.items()]
        if eos:
            producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
            producer.commit_transaction(30)
        else:
            producer.flush()
            consumer.commit(offsets=offsets, asynchronous=not final)
        pending.clear()

    while more(meter, last_record):
        msgs = consumer.consume(batch, 0.1)
        if eos and msgs and not pending:
            producer.begin_transaction()
            began = time.monotonic()
        for m in msgs:
            if m.error():
                raise RuntimeError(m.error().str())
            _produce(producer, out, transform(m.value()), m.key())
            pending[(m.topic(), m.partition())] = m.offset() + 1
        if msgs:
            meter.tick(len(msgs))
            last_record = time.monotonic()
        producer.poll(0)
        if pending and time.monotonic() - began >= interval:
            commit(final=False)
            if not eos:
                began = time.monotonic()
    if pending:
        commit(final=True)
    consumer.close()
    return meter.result()


class _CommitsInTurn:
    """Two transactional producers taking turns: one commits on a thread while the loop writes
    the next transaction into the other. One commit at a time, in order."""

    def __init__(self, spec: dict[str, Any], first: Any):
        self.producers = [first, _bare_producer(spec, f"{spec['group']}-txn-1")]
        for p in self.producers:
            p.init_transactions(30)
        self.turn = 0
        self.thread: threading.Thread | None = None
        self.failures: list[BaseException] = []
        self.commit_ms: list[float] = []

    @property
    def now(self) -> Any:
        return self.producers[self.turn]

    def busy(self) -> bool:
        if self.failures:
            raise RuntimeError(f"a commit failed: {self.failures[0]}")
        return self.thread is not None and self.thread.is_alive()

    def start(self, offsets: list[Any], meta: Any) -> None:
        self.thread = threading.Thread(target=self._commit, args=(self.now, offsets, meta))
        self.thread.start()
        self.turn = 1 - self.turn

    def _commit(self, producer: Any, offsets: list[Any], meta: Any) -> None:
        start = time.perf_counter()
        try:
            producer.flush()
            producer.send_offsets_to_transaction(offsets, meta, 30)
            producer.commit_transaction(30)
        except BaseException as e:  # reported by the loop
            self.failures.append(e)
        self.commit_ms.append((time.perf_counter() - start) * 1000)

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
        self.busy()


def run_bare_pipelined(spec: dict[str, Any]) -> dict[str, Any]:
    """Exactly-once built for latency, with no runtime on top: how low a confluent-kafka loop
    can take exactly-once's latency on this machine. A transaction ends as soon as a poll
    comes back short (or at the commit interval), and its commit (flush, offsets, commit) runs
    on a thread while the loop goes on consuming into a second transactional producer; the two
    take turns, so a producer begins again only a whole commit after its last one ended (its
    markers written: no CONCURRENT_TRANSACTIONS retry)."""
    from confluent_kafka import TopicPartition

    meter = Meter(spec["records"])
    consumer, first = _bare_clients(spec, f"{spec['group']}-txn-0")
    commits = _CommitsInTurn(spec, first)
    consumer.subscribe([spec["input"]])
    interval = spec["commit_interval_ms"] / 1000
    out, batch, more = spec["output"], spec["max_poll_records"], _processing(spec)
    pending: dict[tuple[str, int], int] = {}
    began, last_record = 0.0, time.monotonic()

    def commit() -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in pending.items()]
        pending.clear()
        commits.start(offsets, consumer.consumer_group_metadata())

    while more(meter, last_record):
        msgs = consumer.consume(batch, 0) or consumer.consume(1, 0.001 if commits.busy() else 0.05)
        if msgs and not pending:
            commits.now.begin_transaction()
            began = time.monotonic()
        for m in msgs:
            if m.error():
                raise RuntimeError(m.error().str())
            _produce(commits.now, out, transform(m.value()), m.key())
            pending[(m.topic(), m.partition())] = m.offset() + 1
        if msgs:
            meter.tick(len(msgs))
            last_record = time.monotonic()
        for p in commits.producers:
            p.poll(0)
        due = len(msgs) < batch or time.monotonic() - began >= interval
        if pending and due and not commits.busy():
            commit()
    commits.join()
    if pending:
        commit()
        commits.join()
    consumer.close()
    took = commits.commit_ms
    return {
        **meter.result(),
        "commits": len(took),
        "commit_ms_mean": round(sum(took) / len(took), 2) if took else None,
    }


# -- bare loops over assured.log (the embedded engine's baseline) ----------------------------


def run_log_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """The bare loops above, written against :mod:`assured.log` instead of confluent-kafka:
    what the log itself allows, with no runtime on top. At-least-once: poll, send each, every
    interval flush then commit. Exactly-once: the same in transactions of one interval, the
    offsets sent with the group metadata."""
    from assured.log import TopicPartition, open_log

    meter = Meter(spec["records"])
    eos = spec["guarantee"] == "exactly-once"
    log = open_log(spec["log"], spec.get("log_config") or None)
    producer = log.producer(transactional_id=f"{spec['group']}-txn" if eos else None)
    consumer = log.consumer(group_id=spec["group"], isolation="read_committed")
    if eos:
        producer.init_transactions(30)
    consumer.subscribe([spec["input"]])
    interval = spec["commit_interval_ms"] / 1000
    out, batch, more = spec["output"], spec["max_poll_records"], _processing(spec)
    pending: dict[TopicPartition, int] = {}
    began = last_record = time.monotonic()
    open_ = False
    send = producer.send

    def commit() -> None:
        if eos:
            producer.send_offsets_to_transaction(pending, consumer.group_metadata(), 30)
            producer.commit_transaction(30)
        else:
            producer.flush()
            consumer.commit(pending, asynchronous=True)
        pending.clear()

    while more(meter, last_record):
        records = consumer.poll(batch, 0.1)
        if records:
            if eos and not open_:
                producer.begin_transaction()
                open_, began = True, time.monotonic()
            elif not eos and not pending:
                began = time.monotonic()
            for r in records:
                send(out, transform(r[5]), r[4])  # value, key
                pending[TopicPartition(r[0], r[1])] = r[2] + 1
            meter.tick(len(records))
            last_record = time.monotonic()
        if pending and time.monotonic() - began >= interval:
            commit()
            open_ = False
    if pending:
        commit()
    consumer.close()
    producer.close()
    log.close()
    return meter.result()


# -- the latency probe ------------------------------------------------------------------------


def run_read(spec: dict[str, Any]) -> dict[str, Any]:
    """Read the output topic until ``expected`` stamped records came (or ``timeout_s``);
    latency = receive time - the stamp's send time, per record, in ms."""
    from assured.log import open_log

    expected, deadline = spec["expected"], time.monotonic() + spec["timeout_s"]
    latencies: list[float] = []
    warm = 0
    log = open_log(spec["log"], spec.get("log_config") or None)
    with log.consumer(group_id=spec["group"], isolation="read_committed") as consumer:
        consumer.subscribe([spec["topic"]])
        print("ready", flush=True)
        while len(latencies) < expected and time.monotonic() < deadline:
            records = consumer.poll(max_records=1000, timeout=0.2)
            now = time.time_ns()
            for r in records:
                value = r.value or b""
                if value[:1] == b"W":
                    if warm == 0:
                        print("flowing", flush=True)  # the pipeline is up: pacing may start
                    warm += 1
                    continue
                latencies.append((now - int(value[:STAMP_DIGITS])) / 1e6)
    return {"warm": warm, **latency_summary(latencies)}


def latency_summary(latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 3)

    if not ordered:
        return {"samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"samples": len(ordered), "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": pct(100)}


_ROLES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "assured": run_assured,
    "bare": run_bare,
    "bare-pipelined": run_bare_pipelined,
    "log-loop": run_log_loop,
    "read": run_read,
}


def main(argv: list[str]) -> int:
    role, spec = argv[0], json.loads(argv[1])
    result = _ROLES[role](spec)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
