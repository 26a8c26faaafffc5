"""Prometheus metrics of one App, in its own registry (so two Apps in one process never mix).
Served on ``/metrics`` when the App has a ``metrics_port``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["RuntimeMetrics"]


class RuntimeMetrics:
    def __init__(self, guarantee: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["guarantee", "topic"]
        self.guarantee = guarantee
        self.processed = Counter(
            "assured_processed", "Records handled.", labels, registry=self.registry
        )
        self.retried = Counter(
            "assured_retried", "Handler attempts that raised and were retried.", labels,
            registry=self.registry,
        )  # fmt: skip
        self.dead_lettered = Counter(
            "assured_dead_lettered", "Records sent to a dead-letter topic.", labels,
            registry=self.registry,
        )  # fmt: skip
        self.committed = Counter(
            "assured_commits", "Commits of positions (or transactions).", ["guarantee"],
            registry=self.registry,
        )  # fmt: skip
        self.aborts = Counter(
            "assured_aborts", "Transactions aborted.", ["guarantee"], registry=self.registry
        )
        self.commit_latency = Histogram(
            "assured_commit_seconds", "Time to commit positions or a transaction.",
            ["guarantee"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )  # fmt: skip
        self.lag = Gauge(
            "assured_lag", "Records behind the high watermark, per partition.",
            ["topic", "partition"], registry=self.registry,
        )  # fmt: skip

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
