"""The Quix Streams side of the runtime benchmark, run as a script by the Python of a virtualenv
that has ``quixstreams`` (it pins an older confluent-kafka than assured does, so the two never
share one environment). It imports nothing from assured:

    .venv-quix/bin/python quix_worker.py 'JSON spec'

Same work and same clock as :mod:`assured.bench._workers`: upper-case each value, same key, to
the output topic; timed from the first record to the end of ``Application.run``. Prints one
JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from typing import Any


def main(argv: list[str]) -> int:
    import psutil  # a dependency of neither side: present because quix_worker's venv has it
    from quixstreams import Application  # type: ignore[import-not-found]

    spec = json.loads(argv[0])
    records = spec["records"]
    proc = psutil.Process()
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:  # RSS every 50 ms, as the other workers do
        while not done.wait(0.05):
            samples.append((time.perf_counter(), proc.memory_info().rss / 2**20))

    threading.Thread(target=sample, daemon=True).start()
    state = {"seen": 0, "first": 0.0, "cpu_first": 0.0}

    def upper(value: bytes) -> bytes:
        if state["seen"] == 0:
            state["first"] = time.perf_counter()
            state["cpu_first"] = time.process_time()
        state["seen"] += 1  # Quix reports no count of its own; this costs it ~50 ns a record
        return value.upper()

    with tempfile.TemporaryDirectory(prefix="quix-state-") as state_dir:
        app = Application(
            broker_address=spec["bootstrap"],
            consumer_group=spec["group"],
            auto_offset_reset="earliest",
            commit_interval=spec["commit_interval_ms"] / 1000,
            commit_every=0,  # by time only, as every other system here
            processing_guarantee=spec["guarantee"],
            state_dir=state_dir,
            loglevel="WARNING",
            auto_create_topics=False,
        )
        source = app.topic(spec["input"], key_deserializer="bytes", value_deserializer="bytes")
        sink = app.topic(spec["output"], key_serializer="bytes", value_serializer="bytes")
        app.dataframe(source).apply(upper).to_topic(sink)
        if spec.get("idle_s"):
            app.run(timeout=spec["idle_s"], collect=False)
        else:
            app.run(count=records, collect=False)
    done.set()
    seconds = time.perf_counter() - state["first"] if state["seen"] else 0.0
    cpu = time.process_time() - state["cpu_first"] if state["seen"] else 0.0
    seen = int(state["seen"])
    warm = [rss for t, rss in samples if t >= state["first"] + seconds / 10]
    result: dict[str, Any] = {
        "processed": state["seen"],
        "seconds": round(seconds, 4),
        "records_per_s": round(state["seen"] / seconds, 1) if seconds > 0 else 0.0,
        # As the other workers count it (_workers.cpu_cost; this file runs in Quix's venv).
        "cpu_s": round(cpu, 3),
        "cpu_us_per_record": round(cpu * 1e6 / seen, 2) if seen else 0.0,
        "cpu_cores": round(cpu / seconds, 3) if seconds > 0 else 0.0,
        "rss_warm_mb": round(warm[0] if warm else 0.0, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "quixstreams_version": _version("quixstreams"),
        "confluent_kafka_version": _version("confluent-kafka"),
    }
    print(json.dumps(result), flush=True)
    return 0


def _peak_rss_mb() -> float:
    """VmHWM: the kernel's high-water mark of resident memory (ru_maxrss survives exec)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
