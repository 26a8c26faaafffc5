"""The runtime benchmark: what each guarantee costs, beside bare clients and Quix Streams.

One run, one log (a Kafka cluster or an embedded engine folder), the same input for everyone:
``records`` records of ``record_size`` bytes with 8-byte keys over ``partitions`` partitions.
Every processor (a fresh process, see :mod:`assured.bench._workers`) reads the input in a new
consumer group, upper-cases each value and writes it with its key to an output topic of its
own, committing by time only, every ``commit_interval_ms``:

- ``bare`` at-least-once: confluent-kafka ``consume(N)``, ``produce`` each, every interval
  ``flush`` then ``commit``; ``bare`` exactly-once: the same in transactions of one interval
  with ``send_offsets_to_transaction``. On the embedded engine, the same two loops written
  against the ``assured.log`` API: what the engine allows with no runtime on top;
- ``assured`` at each guarantee: an :class:`~assured.App` with one handler;
- ``quixstreams`` at-least-once and exactly-once (Kafka only), ``commit_interval`` the same,
  run by the Python of a virtualenv that has it (``quix_python``).
- ``bare-pipelined`` exactly-once (Kafka only): a bare loop built for latency,
  not throughput (see :func:`assured.bench._workers.run_bare_pipelined`): the floor under
  exactly-once's latency that librdkafka allows on the machine.

Throughput is records over the time from a processor's first record to the end of its run
(outputs flushed, offsets committed, clients closed); each system runs ``rounds`` times,
interleaved with the others, and the median run is reported (every run's rate is kept).
Then, per system, latency at half that rate: a paced producer stamps each record with its
send time; a reader of the output topic (read_committed) takes receive time minus stamp, over
``latency_seconds`` of load after ``latency_warmup_s`` of unstamped load at the same rate.
Memory: peak RSS (the kernel's high-water mark) of every processor, and one long run of
``memory_records`` through assured (``memory_guarantee``): growth is peak RSS minus the RSS a
tenth of the way through that run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from assured.bench.log_suite import machine_facts
from assured.log import Log, open_log

__all__ = [
    "PEERS",
    "RuntimeBenchConfig",
    "System",
    "peer_ratios",
    "run_runtime_suite",
    "systems_for",
]

_QUIX_WORKER = Path(__file__).with_name("quix_worker.py")
# assured-fixed: assured exactly-once with commit_mode="fixed" (a transaction per commit interval
# whatever the load), measured in the same run as the baseline of the adaptive commit.
# bare-pipelined (Kafka, exactly-once): a bare loop built for exactly-once latency (short
# transactions, committed on a thread while a second producer takes the next): the lowest
# latency librdkafka gives exactly-once here, as a floor for assured's.
SYSTEMS = ("bare", "assured", "assured-fixed", "quixstreams", "bare-pipelined")
_WARM_EVERY_S = 0.1
_PACE_TICK_S = 0.002


@dataclass(frozen=True)
class System:
    # One of SYSTEMS: assured, assured-fixed (exactly-once's fixed-interval baseline), bare,
    # quixstreams, bare-pipelined.
    system: str
    guarantee: str

    @property
    def name(self) -> str:
        return f"{self.system}-{self.guarantee}"


@dataclass
class RuntimeBenchConfig:
    log: str  # kafka://host:port or embedded:///folder
    records: int = 1_000_000
    partitions: int = 4
    record_size: int = 100
    commit_interval_ms: int = 100
    max_poll_records: int = 500
    rounds: int = 3  # throughput runs per system; the median is reported
    latency_seconds: float = 10.0
    latency_warmup_s: float = 2.0
    latency_idle_s: float = 3.0
    memory_records: int = 5_000_000
    memory_guarantee: str = "exactly-once"
    quix_python: str | None = None
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    worker_timeout_s: float = 1800.0
    commit_mode: str = "adaptive"  # assured exactly-once's; "fixed" is the baseline
    # A run during which other processes used more than ``busy_cores`` is redone; rounds whose
    # rates spread more than ``max_spread`` (max - min over median) are measured again; each up
    # to ``retries`` times, after which the row says so (``steady`` false).
    busy_cores: float = 0.25
    max_spread: float = 0.15
    retries: int = 2

    @property
    def backend(self) -> str:
        return "kafka" if self.log.lower().startswith("kafka://") else "embedded"


def systems_for(config: RuntimeBenchConfig) -> list[System]:
    """The systems of one run, each bare or Quix one beside its assured counterpart."""
    kafka = config.backend == "kafka"
    out: list[System] = []
    for guarantee in ("at-least-once", "exactly-once"):
        if "bare" in config.systems:
            out.append(System("bare", guarantee))
        if "assured" in config.systems:
            out.append(System("assured", guarantee))
        if kafka and "quixstreams" in config.systems:
            out.append(System("quixstreams", guarantee))
    if "assured-fixed" in config.systems:
        out.append(System("assured-fixed", "exactly-once"))
    if kafka and "bare-pipelined" in config.systems:
        out.append(System("bare-pipelined", "exactly-once"))
    if "assured" in config.systems:
        out.append(System("assured", "at-most-once"))
    return out


# -- the log: topics, input, paced load -------------------------------------------------------


class _Bench:
    """The run's log, its topic names and its files; everything made is removed at the end."""

    def __init__(self, config: RuntimeBenchConfig):
        self.config = config
        self.run_id = uuid.uuid4().hex[:8]
        self.topics: list[str] = []
        self.files: list[Path] = []
        self.folder: Path | None = None
        if config.backend == "embedded":
            self.folder = Path(config.log[len("embedded://") :]).expanduser()
            self.folder.mkdir(parents=True, exist_ok=True)

    def url(self, phase: str) -> str:
        """The log URL for one phase: embedded runs get a file each (kept small and fresh)."""
        if self.folder is None:
            return self.config.log
        path = self.folder / f"runtime-{self.run_id}-{phase}.db"
        self.files.append(path)
        return f"embedded://{path}"

    def topic(self, log: Log, name: str) -> str:
        full = f"bench-{self.run_id}-{name}"
        with log.admin() as admin:
            admin.create_topic(full, self.config.partitions)
        self.topics.append(full)
        return full

    def cleanup(self, logs: list[Log]) -> None:
        if self.folder is None:
            for log in logs:
                with log.admin() as admin:
                    existing = set(admin.list_topics())
                    for name in self.topics:
                        for t in (name, f"{name}.dlq"):
                            if t in existing:
                                admin.delete_topic(t)
        for log in logs:
            log.close()
        for path in self.files:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)


def _produce_input(log: Log, topic: str, records: int, size: int) -> float:
    """``records`` keyed records of ``size`` lower-case bytes; returns seconds taken."""
    body = (b"abcdefghij" * (size // 10 + 1))[:size]
    start = time.perf_counter()
    with log.producer(batch_size=10_000, linger_ms=20) as producer:
        for i in range(records):
            producer.send(topic, body, key=b"%08d" % i)
            if i % 10_000 == 9_999 and log.url.startswith("embedded"):
                producer.flush()
        producer.flush()
    return time.perf_counter() - start


def _stamped(size: int) -> Callable[[], bytes]:
    pad = b"x" * max(0, size - 20)
    return lambda: b"%020d" % time.time_ns() + pad


# -- workers ----------------------------------------------------------------------------------


def _command(config: RuntimeBenchConfig, system: System, spec: dict[str, Any]) -> list[str]:
    if system.system == "quixstreams":
        if not config.quix_python:
            raise RuntimeError("no Python with quixstreams given (quix_python)")
        return [config.quix_python, str(_QUIX_WORKER), json.dumps(spec)]
    if system.system in ("assured", "assured-fixed"):
        role = "assured"
    elif config.backend == "kafka":
        role = system.system  # bare, bare-pipelined
    else:
        role = "log-loop"  # on the embedded engine, bare means the assured.log API alone
    return [sys.executable, "-m", "assured.bench._workers", role, json.dumps(spec)]


def _spec(
    config: RuntimeBenchConfig, system: System, url: str, source: str, sink: str, records: int
) -> dict[str, Any]:
    bootstrap = url[len("kafka://") :] if url.lower().startswith("kafka://") else None
    return {
        "log": url,
        "bootstrap": bootstrap,
        "input": source,
        "output": sink,
        "group": f"{sink}-group",
        "guarantee": system.guarantee,
        "records": records,
        "commit_interval_ms": config.commit_interval_ms,
        "max_poll_records": config.max_poll_records,
        "commit_mode": "fixed" if system.system == "assured-fixed" else config.commit_mode,
        # The bare loops' producer, set as assured's own Kafka producer is.
        "producer_config": {"enable.idempotence": True, "linger.ms": 5, "batch.num.messages": 1000},
    }


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise ValueError("no result line")


def _run_worker(cmd: list[str], timeout: float, what: str) -> dict[str, Any]:
    """Run one worker to its end; its result line, with ``others_cores``: the CPU that
    processes other than the worker, the Kafka brokers and this one used meanwhile, in cores
    (a busy machine makes a run worth nothing, whatever it measured)."""
    before = _MachineCpu.now()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    others = _MachineCpu.now().others_since(before)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    try:
        result = _last_json(done.stdout)
    except ValueError:
        raise RuntimeError(f"{what} printed no result: {done.stdout[-500:]}") from None
    result["others_cores"] = round(others, 3)
    return result


@dataclass(frozen=True)
class _MachineCpu:
    """CPU seconds so far: the whole machine's busy time, and what the known parties spent
    (this process, its reaped children, the Kafka brokers found running)."""

    at: float
    busy_s: float
    ours_s: float
    brokers: dict[int, float]

    @classmethod
    def now(cls) -> _MachineCpu:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = (sum(fields[:8]) - idle) / tick  # guest time is inside user already
        me = os.times()
        ours = me.user + me.system + me.children_user + me.children_system
        return cls(time.monotonic(), busy, ours, _broker_cpu(tick))

    def others_since(self, before: _MachineCpu) -> float:
        """Cores used by anything else between ``before`` and now (0 when nothing else ran)."""
        brokers = sum(cpu - before.brokers.get(pid, cpu) for pid, cpu in self.brokers.items())
        spent = (self.busy_s - before.busy_s) - (self.ours_s - before.ours_s) - brokers
        wall = self.at - before.at
        return max(0.0, spent / wall) if wall > 0 else 0.0


def _broker_cpu(tick: int) -> dict[int, float]:
    """CPU seconds of every Kafka broker on this machine, by pid."""
    out: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"kafka.Kafka" not in (entry / "cmdline").read_bytes():
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


class _Lines:
    """A child's stdout, read line by line in a thread, so waiting for a line has a timeout."""

    def __init__(self, stream: IO[str]):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._stream = stream
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """After the child exited: the rest of its output, then the pipe closed."""
        self._thread.join(timeout=10)
        self._stream.close()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.strip())
                self._cond.notify_all()

    def seen(self, word: str) -> bool:
        with self._cond:
            return word in self.lines

    def wait_for(self, word: str, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: word in self.lines, timeout)


# -- phases -----------------------------------------------------------------------------------


def _throughput(
    bench: _Bench, log: Log, url: str, source: str, system: System, records: int, phase: str = ""
) -> dict[str, Any]:
    config = bench.config
    sink = bench.topic(log, f"{phase}out-{system.name}")
    spec = _spec(config, system, url, source, sink, records)
    result = _run_worker(
        _command(config, system, spec), config.worker_timeout_s, f"{system.name} throughput"
    )
    if result["processed"] != records:
        raise RuntimeError(f"{system.name} handled {result['processed']} of {records} records")
    return result


def _latency(bench: _Bench, system: System, rate: float) -> dict[str, Any]:
    """End-to-end latency through ``system`` at ``rate`` records/s (paced)."""
    config = bench.config
    url = bench.url(f"latency-{system.name}")
    log = open_log(url)
    try:
        source = bench.topic(log, f"lat-in-{system.name}")
        sink = bench.topic(log, f"lat-out-{system.name}")
        expected = int(rate * config.latency_seconds)
        reader_spec = {
            "log": url,
            "topic": sink,
            "group": f"{sink}-reader",
            "expected": expected,
            "timeout_s": config.latency_seconds + 120,
        }
        spec = _spec(config, system, url, source, sink, expected)
        spec["idle_s"] = config.latency_idle_s
        reader = subprocess.Popen(
            [sys.executable, "-m", "assured.bench._workers", "read", json.dumps(reader_spec)],
            stdout=subprocess.PIPE,
            text=True,
        )
        processor: subprocess.Popen[str] | None = None
        assert reader.stdout is not None
        lines = _Lines(reader.stdout)
        try:
            if not lines.wait_for("ready", 60):
                raise RuntimeError("the latency reader did not start")
            processor = subprocess.Popen(
                _command(config, system, spec), stdout=subprocess.PIPE, text=True
            )
            sent = _pace(log, source, rate, config, lines)
            out, _ = processor.communicate(timeout=config.worker_timeout_s)
            if processor.returncode != 0:
                raise RuntimeError(f"{system.name} failed in the latency run")
            reader.wait(timeout=config.latency_seconds + 180)
            lines.close()
            result = _last_json("\n".join(lines.lines))
        finally:
            for child in (reader, processor):
                if child is not None and child.poll() is None:
                    child.kill()
                    child.wait()
            lines.close()
            if processor is not None and processor.stdout is not None:
                processor.stdout.close()
        result["sent"] = sent
        result["rate_per_s"] = round(rate, 1)
        result["processor"] = _last_json(out)
        return result
    finally:
        log.close()


def _pace(log: Log, topic: str, rate: float, config: RuntimeBenchConfig, lines: _Lines) -> int:
    """Warm-up records, one per 100 ms until the reader sees output, then for
    ``latency_warmup_s`` at ``rate`` (the pipeline settles under load: fetch queues, batches);
    then stamped records at ``rate`` for ``latency_seconds``. Returns how many stamped records
    were sent: only those are timed."""
    embedded = log.url.startswith("embedded")
    stamp = _stamped(config.record_size)
    warm = b"W" + b"x" * (config.record_size - 1)
    with log.producer(linger_ms=1) as producer:
        deadline = time.monotonic() + 120
        n = 0
        while not lines.seen("flowing"):
            if time.monotonic() > deadline:
                raise RuntimeError("no output reached the latency reader within 120 s")
            producer.send(topic, warm, key=b"%08d" % n)
            producer.flush()
            n += 1
            time.sleep(_WARM_EVERY_S)

        def paced(total: int, value: Callable[[], bytes]) -> None:
            sent = 0
            start = time.perf_counter()
            while sent < total:
                due = min(total, int((time.perf_counter() - start) * rate) + 1)
                while sent < due:
                    producer.send(topic, value(), key=b"%08d" % sent)
                    sent += 1
                if embedded:
                    producer.flush()  # visible now: an embedded batch is its transaction
                time.sleep(_PACE_TICK_S)

        paced(int(rate * config.latency_warmup_s), lambda: warm)
        total = int(rate * config.latency_seconds)
        paced(total, stamp)
        producer.flush()
    return total


def _memory(bench: _Bench) -> dict[str, Any]:
    config = bench.config
    system = System("assured", config.memory_guarantee)
    url = bench.url("memory")
    log = open_log(url)
    try:
        source = bench.topic(log, "mem-in")
        produce_s = _produce_input(log, source, config.memory_records, config.record_size)
        result = _throughput(bench, log, url, source, system, config.memory_records, "mem-")
    finally:
        log.close()
    result["input_produce_s"] = round(produce_s, 2)
    result["rss_growth_mb"] = round(result["peak_rss_mb"] - result["rss_warm_mb"], 1)
    return {"system": system.system, "guarantee": system.guarantee, **result}


def _versions(config: RuntimeBenchConfig) -> dict[str, Any]:
    from importlib import metadata

    import confluent_kafka

    from assured import __version__

    out: dict[str, Any] = {
        "assured_version": __version__,
        "confluent_kafka_version": metadata.version("confluent-kafka"),
        "librdkafka_version": confluent_kafka.libversion()[0],
    }
    if config.quix_python and config.backend == "kafka" and "quixstreams" in config.systems:
        probe = subprocess.run(
            [
                config.quix_python,
                "-c",
                "import confluent_kafka, importlib.metadata as m; "
                "print(m.version('quixstreams'), confluent_kafka.libversion()[0])",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if probe.returncode == 0:
            quix, librdkafka = probe.stdout.split()
            out["quixstreams_version"] = quix
            out["quixstreams_librdkafka_version"] = librdkafka
    return out


def _rounds(
    bench: _Bench, log: Log, url: str, source: str, say: Callable[[str], None]
) -> tuple[dict[System, list[dict[str, Any]]], dict[System, list[dict[str, Any]]]]:
    """Every system's throughput runs (``rounds`` of them, interleaved), and the runs rejected:
    measured while the machine was busy, or in a set of rounds that disagreed."""
    config = bench.config
    runs: dict[System, list[dict[str, Any]]] = {s: [] for s in systems_for(config)}
    rejected: dict[System, list[dict[str, Any]]] = {s: [] for s in runs}

    def measure(system: System, tag: str) -> None:
        """One run of ``system``, redone while the machine was busy (up to ``retries``)."""
        for attempt in range(config.retries + 1):
            say(f"{system.name}: throughput over {config.records:,} records")
            result = _throughput(
                bench, log, url, source, system, config.records, f"{tag}a{attempt}-"
            )
            say(
                f"{system.name}: {result['records_per_s']:,.0f} records/s, "
                f"{result['cpu_us_per_record']} CPU us/record"
            )
            if result["others_cores"] <= config.busy_cores or attempt == config.retries:
                runs[system].append(result)
                return
            say(f"{system.name}: other processes used {result['others_cores']} cores: again")
            rejected[system].append(result)

    for round_ in range(config.rounds):
        # Every system once per round, the order reversed every other round: a slow spell
        # on the machine then hits each pair's two sides alike.
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for system in order:
            measure(system, f"r{round_}")
    # Rounds that disagree by more than ``max_spread`` are measured again, as a whole.
    for system, results in runs.items():
        for again in range(config.retries):
            if round(_spread(results), 3) <= config.max_spread:
                break
            say(f"{system.name}: rounds disagree by {_spread(results):.0%}: measuring again")
            rejected[system] += results
            results.clear()
            for round_ in range(config.rounds):
                measure(system, f"x{again}r{round_}")
    return runs, rejected


def run_runtime_suite(
    config: RuntimeBenchConfig, progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Run every phase; one row per system and guarantee (plus one ``memory`` row), JSON-ready.
    Each row holds system, guarantee, backend, records_per_s, p50_ms, p99_ms, peak_rss_mb and
    the settings and machine it was measured with."""
    say = progress or (lambda _: None)
    if config.records < 1 or config.partitions < 1 or config.record_size < 20:
        raise ValueError("records and partitions must be positive, record_size at least 20")
    wants_quix = "quixstreams" in config.systems and config.backend == "kafka"
    if wants_quix and not (config.quix_python and shutil.which(config.quix_python)):
        raise ValueError(
            f"quixstreams needs a Python that has it: quix_python={config.quix_python!r} "
            "(make bench makes .venv-quix)"
        )
    bench = _Bench(config)
    logs: list[Log] = []
    rows: list[dict[str, Any]] = []
    try:
        url = bench.url("throughput")
        log = open_log(url)
        logs.append(log)
        source = bench.topic(log, "in")
        say(f"producing {config.records:,} input records")
        produce_s = _produce_input(log, source, config.records, config.record_size)
        runs, rejected = _rounds(bench, log, url, source, say)
        for system, results in runs.items():
            row = _row(config, system, _median_run(results))
            row["rejected_runs_per_s"] = [r["records_per_s"] for r in rejected[system]]
            rows.append(row)
        for row, system in zip(rows, systems_for(config), strict=True):
            rate = row["records_per_s"] / 2
            say(f"{system.name}: latency at {rate:,.0f} records/s")
            latency = _latency(bench, system, rate)
            say(f"{system.name}: p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms")
            row.update(
                p50_ms=latency["p50_ms"],
                p99_ms=latency["p99_ms"],
                latency_max_ms=latency["max_ms"],
                latency_rate_per_s=latency["rate_per_s"],
                latency_samples=latency["samples"],
                latency_sent=latency["sent"],
                latency_commits=latency["processor"].get("commits"),
                latency_commit_ms_mean=latency["processor"].get("commit_ms_mean"),
            )
            if latency["samples"] != latency["sent"]:
                raise RuntimeError(
                    f"{system.name}: the latency reader saw {latency['samples']} of "
                    f"{latency['sent']} records"
                )
        peer_ratios(rows)
        if config.memory_records > 0 and "assured" in config.systems:
            say(f"assured {config.memory_guarantee}: memory over {config.memory_records:,} records")
            memory = _memory(bench)
            rows.append(
                {
                    **_row(config, System("assured", config.memory_guarantee), memory),
                    "run": "memory",
                    "rss_growth_mb": memory["rss_growth_mb"],
                }
            )
    finally:
        bench.cleanup(logs)
    facts = {**machine_facts(), **_versions(config), "input_produce_s": round(produce_s, 2)}
    for row in rows:
        row.update(facts)
    return rows


def _median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (its numbers as measured), with every run's rate and the
    highest peak RSS of them all."""
    ranked = sorted(results, key=lambda r: float(r["records_per_s"]))
    median = dict(ranked[(len(ranked) - 1) // 2])
    median["runs_per_s"] = [r["records_per_s"] for r in results]
    median["runs_cpu_us_per_record"] = [r.get("cpu_us_per_record") for r in results]
    median["runs_others_cores"] = [r.get("others_cores") for r in results]
    median["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    return median


def _spread(results: list[dict[str, Any]]) -> float:
    """(max - min) / median of the runs' rates: how far one round may be from another."""
    rates = sorted(float(r["records_per_s"]) for r in results)
    if len(rates) < 2 or rates[(len(rates) - 1) // 2] <= 0:
        return 0.0
    return (rates[-1] - rates[0]) / rates[(len(rates) - 1) // 2]


def _row(config: RuntimeBenchConfig, system: System, result: dict[str, Any]) -> dict[str, Any]:
    settings = asdict(config)
    for key in ("log", "quix_python", "systems", "worker_timeout_s", "busy_cores", "retries"):
        settings.pop(key)
    runs = result.get("runs_per_s", [result["records_per_s"]])
    # Rounded once, and judged as reported: a row never says spread 0.15 and unsteady.
    spread = round(_spread([{"records_per_s": r} for r in runs]), 3)
    others = [c for c in result.get("runs_others_cores", [result.get("others_cores")]) if c]
    return {
        **settings,
        "system": system.system,
        "guarantee": system.guarantee,
        "backend": config.backend,
        "run": "throughput",
        "records_per_s": result["records_per_s"],
        "p50_ms": None,
        "p99_ms": None,
        "peak_rss_mb": result["peak_rss_mb"],
        "rss_warm_mb": result["rss_warm_mb"],
        "records": result["processed"],
        "seconds": result["seconds"],
        "runs_per_s": runs,
        "cpu_us_per_record": result.get("cpu_us_per_record"),
        "cpu_cores": result.get("cpu_cores"),
        "runs_cpu_us_per_record": result.get("runs_cpu_us_per_record"),
        "spread": spread,
        "others_cores_max": round(max(others), 3) if others else 0.0,
        "steady": spread <= config.max_spread and all(c <= config.busy_cores for c in others),
        "commit_every": "off (by time only)",
        "producer": "idempotent, acks=all, linger.ms=5, batch.num.messages=1000 "
        "(assured and bare; Quix Streams its own defaults)",
        "isolation": "read_committed",
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


PEERS = ("bare", "quixstreams", "assured-fixed")


def peer_ratios(rows: Sequence[dict[str, Any]], digits: int = 3) -> None:
    """On each assured throughput row: its rate over each peer's of the same guarantee
    (``vs_bare``, ``vs_quixstreams``, ``vs_assured-fixed``; higher is better) and its CPU per
    record over theirs (``cpu_vs_...``; lower is better). One run's rows, or the medians that
    :mod:`assured.bench.combine` makes of several: the same arithmetic for both."""
    by = {(r["system"], r["guarantee"]): r for r in rows if r.get("run") == "throughput"}
    for (system, guarantee), row in by.items():
        if system != "assured":
            continue
        for other in PEERS:
            peer = by.get((other, guarantee))
            if not peer:
                continue
            if peer.get("records_per_s"):
                row[f"vs_{other}"] = round(row["records_per_s"] / peer["records_per_s"], digits)
            if peer.get("cpu_us_per_record") and row.get("cpu_us_per_record"):
                row[f"cpu_vs_{other}"] = round(
                    row["cpu_us_per_record"] / peer["cpu_us_per_record"], digits
                )


def summarize(rows: list[dict[str, Any]]) -> Iterator[str]:
    """Plain lines for a terminal, one per row."""
    for r in rows:
        ratios = " ".join(f"{k}={r[k]}" for k in (f"vs_{p}" for p in PEERS) if k in r)
        yield (
            f"{r['backend']:8} {r['system']:11} {r['guarantee']:13} {r['run']:10} "
            f"{r['records_per_s']:>12,.0f}/s p50={r['p50_ms']} p99={r['p99_ms']} "
            f"rss={r['peak_rss_mb']} {ratios}"
        ).rstrip()
