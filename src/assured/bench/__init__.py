"""Benchmarks: measured numbers for the claims the README makes about speed and idle cost.

``run_log_suite`` measures the embedded log engine against plain SQLite on the same disk;
``assured bench --suite log`` runs it and writes ``benchmarks/results/log-embedded.{json,md}``.
"""

from assured.bench.log_suite import run_log_suite

__all__ = ["run_log_suite"]
