"""What the workers run in another project's virtualenv share (Quix Streams, FastStream: each
pins its own confluent-kafka, so assured is not installed there). They run as scripts, so this
file is imported from their own folder; it imports nothing from assured.

The clock and the counts are the ones :class:`assured.bench._workers.Meter` keeps for assured's
own workers: from the first record on, CPU time of the process, RSS sampled every 50 ms by a
thread, and the kernel's high-water mark of resident memory.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["Clock"]


def _peak_rss_mb() -> float:
    """VmHWM: the kernel's high-water mark of resident memory (ru_maxrss survives exec)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def version(package: str) -> str:
    from importlib.metadata import version as of

    return of(package)


class Clock:
    """A worker's clock: :meth:`tick` once per record handled (the first starts the clock, if
    :meth:`start` has not), :meth:`result` at the end."""

    def __init__(self) -> None:
        import psutil  # present in both virtualenvs: their Makefile targets install it

        self.seen = 0
        self.first = 0.0
        self.cpu_first = 0.0
        self._proc = psutil.Process()
        self._samples: list[tuple[float, float]] = []
        self._done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self._samples.append((time.perf_counter(), self._proc.memory_info().rss / 2**20))

    def start(self) -> None:
        """The first record is here (later calls change nothing)."""
        if not self.first:
            self.first = time.perf_counter()
            self.cpu_first = time.process_time()

    def tick(self) -> None:
        self.start()
        self.seen += 1

    def result(self, **more: Any) -> dict[str, Any]:
        self._done.set()
        seconds = time.perf_counter() - self.first if self.seen else 0.0
        cpu = time.process_time() - self.cpu_first if self.seen else 0.0
        warm = [rss for t, rss in self._samples if t >= self.first + seconds / 10]
        return {
            "processed": self.seen,
            "seconds": round(seconds, 4),
            "records_per_s": round(self.seen / seconds, 1) if seconds > 0 else 0.0,
            # As assured's workers count it (_workers.cpu_cost).
            "cpu_s": round(cpu, 3),
            "cpu_us_per_record": round(cpu * 1e6 / self.seen, 2) if self.seen else 0.0,
            "cpu_cores": round(cpu / seconds, 3) if seconds > 0 else 0.0,
            "rss_warm_mb": round(warm[0] if warm else 0.0, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "confluent_kafka_version": version("confluent-kafka"),
            **more,
        }
