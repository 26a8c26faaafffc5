"""The audit must see what it exists to see: planted protocol bugs fail their verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from assured.audit import AuditConfig, run_audit


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
    assert f.verdict == "fail", f.as_json()
    assert f.lost > 0
    assert f"lost={f.lost}" in f.reasons


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
