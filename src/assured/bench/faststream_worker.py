"""The FastStream side of the io bench, run as a script by the Python of a virtualenv that has
``faststream[confluent]`` (it pins its own confluent-kafka, so it never shares assured's
environment). It imports nothing from assured:

    .venv-faststream/bin/python faststream_worker.py 'JSON spec'

The same work as :mod:`assured.bench._io_workers`: each call awaits ``handler_ms``, then
publishes one output stamped with the time the call began (20 digits of ns since the epoch).
FastStream's own setting for calls side by side is ``max_workers``; it accepts only
``AckPolicy.ACK_FIRST`` with it (a record is acknowledged before its call, and offsets are
auto-committed): no at-least-once, and no order. Timed from the first call to the last output's
delivery. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any


def _peak_rss_mb() -> float:
    """VmHWM: the kernel's high-water mark of resident memory."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


async def _run(spec: dict[str, Any], state: dict[str, float]) -> None:
    from faststream import AckPolicy  # type: ignore[import-not-found]
    from faststream.confluent import KafkaBroker, KafkaMessage  # type: ignore[import-not-found]

    records = spec["records"]
    wait = spec["handler_ms"] / 1000
    done = asyncio.Event()
    broker = KafkaBroker(spec["bootstrap"], log_level=30)

    @broker.subscriber(  # type: ignore[untyped-decorator]
        spec["input"],
        group_id=spec["group"],
        auto_offset_reset="earliest",
        max_workers=spec["concurrency"],
        ack_policy=AckPolicy.ACK_FIRST,
    )
    async def call(body: bytes, msg: KafkaMessage) -> None:
        if state["seen"] == 0:
            state["first"] = time.perf_counter()
            state["cpu_first"] = time.process_time()
        began = b"%020d" % time.time_ns()
        await asyncio.sleep(wait)
        await broker.publish(began, spec["output"], key=msg.raw_message.key())
        state["seen"] += 1
        if state["seen"] >= records:
            done.set()

    async with broker:
        await broker.start()
        await done.wait()


def main(argv: list[str]) -> int:
    import psutil

    spec = json.loads(argv[0])
    proc = psutil.Process()
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:  # RSS every 50 ms, as the other workers do
        while not stop.wait(0.05):
            samples.append((time.perf_counter(), proc.memory_info().rss / 2**20))

    threading.Thread(target=sample, daemon=True).start()
    state = {"seen": 0.0, "first": 0.0, "cpu_first": 0.0}
    asyncio.run(_run(spec, state))
    stop.set()
    seconds = time.perf_counter() - state["first"] if state["seen"] else 0.0
    cpu = time.process_time() - state["cpu_first"] if state["seen"] else 0.0
    seen = int(state["seen"])
    warm = [rss for t, rss in samples if t >= state["first"] + seconds / 10]
    print(
        json.dumps(
            {
                "processed": seen,
                "seconds": round(seconds, 4),
                "records_per_s": round(seen / seconds, 1) if seconds > 0 else 0.0,
                "cpu_s": round(cpu, 3),
                "cpu_us_per_record": round(cpu * 1e6 / seen, 2) if seen else 0.0,
                "cpu_cores": round(cpu / seconds, 3) if seconds > 0 else 0.0,
                "rss_warm_mb": round(warm[0] if warm else 0.0, 1),
                "peak_rss_mb": round(_peak_rss_mb(), 1),
                "faststream_version": _version("faststream"),
                "confluent_kafka_version": _version("confluent-kafka"),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
