"""The audit must see what it exists to see: planted protocol bugs fail their verdicts, and the
real protocols, under the very same faults, pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from assured.audit import AuditConfig, Findings, run_audit


@pytest.mark.parametrize(
    ("plant", "guarantee"),
    [
        ("commit-before-handle", "at-least-once"),
        ("offsets-outside-transaction", "exactly-once"),
    ],
)
def test_planted_bug_fails_the_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plant: str, guarantee: str
) -> None:
    monkeypatch.setenv("ASSURED_AUDIT_PLANT", plant)  # the processors inherit it
    f = run_audit(
        AuditConfig(
            log_url=f"embedded://{tmp_path}/log.db",
            guarantee=guarantee,
            messages=1500,
            kills=8,
            faults=("crash-points",),
            seed=5,
            workdir=tmp_path,
            session_timeout_ms=1000,
            # Spread the run over many commits, so the planned crashes (at a processor's first
            # or second commit) fire before the work is done, however fast the runtime is.
            handle_delay_ms=1.0,
        )
    )
    assert f.verdict == "fail", (f.reasons, f.faults)
    assert f.lost > 0
    assert f"lost={f.lost}" in f.reasons


# Each fix of issue 18, undone by a planted variant, and the faults that show it.
FIXES: dict[str, dict[str, Any]] = {
    # 1: an error on its way out commits the open transaction (handler-errors' fatal fate)
    "commit-poisoned-transaction": {
        "guarantee": "exactly-once",
        "faults": ("handler-errors",),
        "kills": 0,
        "shows": ("duplicate",),
    },
    # 2: positions committed past a failed delivery (write-stall)
    "commit-past-failed-write": {
        "guarantee": "at-least-once",
        "faults": ("write-stall",),
        "kills": 3,
        "processes": 3,  # two others whose writes fail while one is frozen holding the lock
        "shows": ("lost",),
    },
    # 3: dead letters sent outside the database transaction (a crash after they went out)
    "dead-letters-outside-database": {
        "guarantee": "exactly-once",
        "sink": "sqlite",
        "faults": ("handler-errors", "crash-points"),
        "kills": 6,
        "shows": ("duplicate",),
    },
    # 8: a failed attempt's outputs kept (transient and permanent failures)
    "keep-failed-attempts": {
        "guarantee": "exactly-once",
        "faults": ("handler-errors",),
        "kills": 0,
        "shows": ("duplicate", "refused-effect", "effect-and-dead-letter"),
    },
    # issue 14: records side by side, positions committed past the highest handled record
    "commit-highest-completed": {
        "guarantee": "exactly-once",
        "faults": ("sigkill",),
        "kills": 6,
        "concurrency": 20,
        "handler_latency_ms": 5.0,
        "shows": ("lost",),
    },
    # issue 14: into a database side by side, records committed above the prefix not marked
    "side-by-side-without-marks": {
        "guarantee": "exactly-once",
        "sink": "sqlite",
        "faults": ("sigkill",),
        "kills": 10,  # 6 once all missed a commit above a record still running (make test's load)
        "messages": 3000,  # time for the kills to land (600 once ended before any did)
        "concurrency": 20,
        "handler_latency_ms": 5.0,
        "shows": ("duplicate",),
    },
    # issue 14: a send from work a failed attempt left running taken as the retry's own
    "stray-sends-kept": {
        "guarantee": "exactly-once",
        "faults": ("handler-errors",),
        "kills": 0,
        "messages": 1500,  # at 600, one run in eight on a busy machine had no stray land
        "shows": ("duplicate",),
    },
    # issue 14: at-least-once side by side, unfinished records named handled in the metadata
    "remember-unfinished": {
        "guarantee": "at-least-once",
        "faults": ("sigkill",),
        "kills": 8,  # 6 kills at 5 ms once all missed a record still running (a busy machine)
        "messages": 2000,  # time for every kill to land
        "concurrency": 20,
        "handler_latency_ms": 10.0,
        "shows": ("lost",),
    },
}


def _audit(tmp_path: Path, case: dict[str, Any]) -> Findings:
    return run_audit(
        AuditConfig(
            log_url=f"embedded://{tmp_path}/log.db",
            guarantee=case["guarantee"],
            sink=case.get("sink", "topic"),
            messages=case.get("messages", 600),
            processes=case.get("processes", 2),
            kills=case["kills"],
            faults=case["faults"],
            seed=7,
            workdir=tmp_path,
            session_timeout_ms=1000,
            handle_delay_ms=1.0,
            timeout_s=180,
            concurrency=case.get("concurrency", 1),
            handler_latency_ms=case.get("handler_latency_ms", 0.0),
        )
    )


@pytest.mark.parametrize("plant", sorted(FIXES))
def test_a_fix_undone_fails_the_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plant: str
) -> None:
    case = FIXES[plant]
    monkeypatch.setenv("ASSURED_AUDIT_PLANT", plant)
    f = _audit(tmp_path, case)
    assert f.verdict == "fail", (f.reasons, f.faults)
    assert all(n > 0 for n in f.faults.values()), f.faults
    for anomaly in case["shows"]:
        assert f.count(anomaly) > 0, (anomaly, f.as_json())


# The real protocol's twins of the two longest plants run with the slow tests: the same paths
# pass in make test's own audits (a write stall; at-least-once side by side under SIGKILL).
_LONG_TWINS = {"commit-past-failed-write", "remember-unfinished"}


@pytest.mark.parametrize(
    "plant",
    [pytest.param(p, marks=pytest.mark.slow) if p in _LONG_TWINS else p for p in sorted(FIXES)],
)
def test_the_real_protocol_passes_where_the_fix_undone_fails(tmp_path: Path, plant: str) -> None:
    case = FIXES[plant]
    f = _audit(tmp_path, case)
    assert all(n > 0 for n in f.faults.values()), f.faults
    assert f.verdict == "pass", (f.reasons, f.faults)
    for anomaly in case["shows"]:
        assert f.count(anomaly) == 0, (anomaly, f.as_json())


@pytest.mark.slow  # 10 s: two whole audits; the plan's own draws are checked in test_faults.py
def test_the_same_seed_gives_the_same_fault_schedule(tmp_path: Path) -> None:
    def schedule(seed: int) -> tuple[list[str], list[object]]:
        cfg = AuditConfig(
            log_url=f"embedded://{tmp_path}/s{seed}-{len(list(tmp_path.iterdir()))}.db",
            guarantee="at-least-once",
            messages=300,
            kills=4,
            faults=("sigkill", "crash-points"),
            seed=seed,
            workdir=tmp_path,
            session_timeout_ms=1000,
        )
        run_audit(cfg)
        (plan,) = [e for e in cfg.events if e["event"] == "schedule"]
        return list(plan["crash_points"]), list(plan["external"])

    first, again, other = schedule(42), schedule(42), schedule(43)
    assert first == again
    assert first != other
    assert len(first[0]) == 2  # half the kills at crash points, half from outside
