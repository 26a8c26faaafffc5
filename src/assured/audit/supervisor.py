"""Running one audit: workload → processors under faults → wait until consumed → check.

Processors are real processes (``python -m assured.audit.processor``), restarted whenever they
die. Faults are drawn from the seed, so the same seed gives the same schedule: external ones
(SIGKILL, SIGTERM, SIGSTOP then SIGCONT, a broker's SIGKILL and restart) fire as progress
crosses thresholds; crash points are armed in a processor's environment when it starts, to kill
it at the n-th pass of the point where its guarantee is weakest.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assured.audit.checker import Effect, Findings, check, parse_history, read_topic
from assured.audit.workload import produce
from assured.errors import ConfigError
from assured.log import Admin, Log, TopicPartition, open_log
from assured.sinks import PostgresSink, Sink, SqliteSink

__all__ = ["FAULTS", "AuditConfig", "run_audit"]

FAULTS = ("sigkill", "sigterm", "sigstop", "crash-points", "lost-ack", "broker-kill")
WEAK_POINTS = {
    ("at-most-once", "topic"): ["after-commit-before-handle"],
    ("at-most-once", "db"): ["after-commit-before-handle"],
    ("at-least-once", "topic"): ["after-handle-before-commit"],
    ("at-least-once", "db"): ["after-effect-before-offset"],
    ("exactly-once", "topic"): ["inside-transaction", "after-handle-before-commit"],
    ("exactly-once", "db"): ["after-effect-before-offset"],
}
PARTITIONS = 4


@dataclass
class AuditConfig:
    log_url: str
    guarantee: str
    sink: str = "topic"  # topic | sqlite | postgres
    messages: int = 5000
    processes: int = 2
    kills: int = 10
    faults: tuple[str, ...] = ("sigkill", "crash-points")
    seed: int = 1
    workdir: Path | None = None
    postgres_dsn: str | None = None
    session_timeout_ms: int = 1500
    timeout_s: float = 300.0
    poison_rate: float = 0.0
    handle_delay_ms: float = 0.0  # per message, to spread a small run over time
    broker: Any = None  # an assured.testing.KafkaCluster with three nodes, for broker-kill
    progress: Callable[[int, int], None] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.armed = False  # a crash point is armed in this process
        self.stopped_until = 0.0  # SIGSTOPped until then
        self.terminating = False  # sent SIGTERM: draining; a second signal would cut it short


class _Run:
    """The state of one audit while it runs."""

    def __init__(self, cfg: AuditConfig, log: Log, workdir: Path):
        self.cfg = cfg
        self.log = log
        self.workdir = workdir
        self.rng = random.Random(cfg.seed + 1)
        tag = f"{cfg.guarantee}-{cfg.sink}-{cfg.seed}-{uuid.uuid4().hex[:6]}"
        self.input = f"audit-in-{tag}"
        self.output = f"audit-out-{tag}"
        self.group = f"audit-{tag}"
        self.history = workdir / f"history-{tag}.jsonl"
        self.db = (
            str(workdir / f"effects-{tag}.db") if cfg.sink == "sqlite" else cfg.postgres_dsn or ""
        )
        self.faults: dict[str, int] = dict.fromkeys(cfg.faults, 0)
        self.regressions: list[str] = []
        self.last_committed: dict[TopicPartition, int] = {}
        # The whole plan is drawn up front from the seed, so the same seed gives the same
        # schedule; victims are picked at run time from a second generator.
        plan = random.Random(cfg.seed)
        kinds = [f for f in cfg.faults if f in ("sigkill", "sigterm", "sigstop", "broker-kill")]
        crash = "crash-points" in cfg.faults
        budget = cfg.kills if crash and not kinds else (cfg.kills // 2 if crash else 0)
        points = WEAK_POINTS[(cfg.guarantee, "topic" if cfg.sink == "topic" else "db")]
        self.crash_plan = [f"{plan.choice(points)}@{plan.randint(1, 2)}" for _ in range(budget)]
        external = cfg.kills - budget if kinds else 0
        self.schedule = sorted(
            (round(plan.uniform(0.05, 0.9), 4), plan.choice(kinds)) for _ in range(external)
        )
        self.env = dict(os.environ)
        self.env.pop("ASSURED_CRASH_POINTS", None)
        self._admin: Admin | None = None
        self.offsets_reader: Sink | None = None
        self.broker_down = threading.Event()  # one broker at a time, so the quorum holds
        self.fraction = 0.0  # of the input consumed so far

    def admin(self) -> Admin:
        """One admin client for the whole run (polled 20 times a second)."""
        if self._admin is None:
            self._admin = self.log.admin()
        return self._admin

    def event(self, kind: str, **data: Any) -> None:
        self.cfg.events.append({"t": round(time.time(), 3), "event": kind, **data})


def _check(cfg: AuditConfig) -> None:
    unknown = set(cfg.faults) - set(FAULTS)
    if unknown:
        raise ConfigError(f"unknown fault(s) {sorted(unknown)}; known: {', '.join(FAULTS)}")
    if cfg.sink not in ("topic", "sqlite", "postgres"):
        raise ConfigError(f"sink {cfg.sink!r}: topic, sqlite or postgres")
    if cfg.sink == "postgres" and not cfg.postgres_dsn:
        raise ConfigError("--sink postgres needs --postgres-dsn postgresql://user@host:port/db")
    if "broker-kill" in cfg.faults and (cfg.broker is None or len(cfg.broker.members) < 3):
        raise ConfigError("broker-kill needs a three-node Kafka cluster started by the audit")


def run_audit(cfg: AuditConfig) -> Findings:
    """Audit ``cfg.guarantee`` on ``cfg.log_url`` and return what the checker found."""
    _check(cfg)
    started = time.monotonic()
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="assured-audit-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log = open_log(cfg.log_url)
    run = _Run(cfg, log, workdir)
    with log.admin() as admin:
        admin.create_topic(run.input, PARTITIONS)
        admin.create_topic(run.output, PARTITIONS)
    lost_acks = cfg.kills if "lost-ack" in cfg.faults else 0
    workload = produce(log, run.input, cfg.messages, cfg.seed, cfg.poison_rate, lost_acks)
    if "lost-ack" in cfg.faults:
        run.faults["lost-ack"] = workload.lost_acks
    run.event("produced", messages=cfg.messages, acked=len(workload.acked))
    run.event("schedule", crash_points=list(run.crash_plan), external=list(run.schedule))
    total = sum(workload.ends.values())
    if cfg.sink == "postgres":
        _fresh_effects_table(run.db)
    slots = [_Slot(i) for i in range(cfg.processes)]
    try:
        _drive(run, slots, workload.ends, total)
    finally:
        _stop_all(run, slots)
        deadline = time.monotonic() + 180
        while run.broker_down.is_set() and time.monotonic() < deadline:
            time.sleep(0.2)  # a broker still restarting: the check reads a whole cluster
        if cfg.broker is not None:
            for node in cfg.broker.members:
                if node.node_id not in cfg.broker.running():
                    cfg.broker.restart(node.node_id)
    hanging = _hanging(run)
    if run._admin is not None:
        run._admin.close()
    if run.offsets_reader is not None:
        run.offsets_reader.close()
    findings = check(
        guarantee=cfg.guarantee,
        log_url=cfg.log_url,
        sink=cfg.sink,
        ids=workload.ids,
        keys=workload.keys,
        poison=workload.poison,
        acked=workload.acked,
        source=read_topic(log, run.input, "read_uncommitted"),
        effects=_effects(run),
        dead_letters=_dead_letters(run),
        aborted_txns=parse_history(run.history.read_text().splitlines())
        if run.history.exists()
        else set(),
        hanging=hanging,
        regressions=run.regressions,
    )
    findings.faults = {k: v for k, v in run.faults.items()}
    findings.seconds = round(time.monotonic() - started, 2)
    run.event("checked", verdict=findings.verdict)
    return findings


def _drive(run: _Run, slots: list[_Slot], ends: dict[TopicPartition, int], total: int) -> None:
    cfg = run.cfg
    deadline = time.monotonic() + cfg.timeout_s
    done = 0
    for slot in slots:
        _start(run, slot)
    while True:
        now = time.monotonic()
        if now > deadline:
            run.event("timeout", consumed=done, total=total)
            raise TimeoutError(
                f"the audit of {cfg.guarantee} consumed {done} of {total} records in "
                f"{cfg.timeout_s:.0f} s; processors may be stuck (see {run.workdir})"
            )
        for slot in slots:
            if slot.stopped_until and now >= slot.stopped_until and slot.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.proc.pid, signal.SIGCONT)
                slot.stopped_until = 0.0
            if slot.proc is not None and slot.proc.poll() is not None:
                code = slot.proc.returncode
                run.event("exited", slot=slot.index, code=code)
                if code == -signal.SIGKILL and slot.armed:
                    run.faults["crash-points"] += 1
                _start(run, slot)
        done = _consumed(run, ends)
        if cfg.progress is not None:
            cfg.progress(done, total)
        if done >= total:
            return
        run.fraction = done / total if total else 1.0
        while run.schedule and done >= run.schedule[0][0] * total:
            _, kind = run.schedule.pop(0)
            _inject(run, slots, kind)
        time.sleep(0.05)


def _start(run: _Run, slot: _Slot) -> None:
    cfg = run.cfg
    env = dict(run.env)
    slot.armed = False
    slot.terminating = False
    if run.crash_plan:
        env["ASSURED_CRASH_POINTS"] = run.crash_plan.pop(0)
        slot.armed = True
    cmd = [
        sys.executable, "-m", "assured.audit.processor",
        "--log", cfg.log_url, "--guarantee", cfg.guarantee, "--group", run.group,
        "--input", run.input, "--output", run.output, "--sink", cfg.sink, "--db", run.db,
        "--slot", str(slot.index), "--history", str(run.history),
        "--session-timeout-ms", str(cfg.session_timeout_ms),
        "--handle-delay-ms", str(cfg.handle_delay_ms),
    ]  # fmt: skip
    errors = (run.workdir / f"processor-{slot.index}.log").open("ab")
    slot.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    errors.close()
    slot.starts += 1
    run.event(
        "started", slot=slot.index, pid=slot.proc.pid, crash_point=env.get("ASSURED_CRASH_POINTS")
    )


def _inject(run: _Run, slots: list[_Slot], kind: str) -> None:
    live = [
        s
        for s in slots
        if s.proc is not None
        and s.proc.poll() is None
        and not s.stopped_until
        and not s.terminating
    ]
    if kind == "broker-kill":
        _kill_broker(run)
        return
    if not live:  # everyone is down or frozen: try again a little later
        _later(run, kind)
        return
    slot = run.rng.choice(live)
    assert slot.proc is not None
    sig = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigstop": signal.SIGSTOP}[kind]
    with contextlib.suppress(ProcessLookupError):
        os.kill(slot.proc.pid, sig)
    if kind == "sigterm":
        slot.terminating = True
    if kind == "sigstop":  # a zombie: frozen past its session timeout, then back
        slot.stopped_until = time.monotonic() + 2 * run.cfg.session_timeout_ms / 1000
    run.faults[kind] += 1
    run.event(kind, slot=slot.index, pid=slot.proc.pid)


def _later(run: _Run, kind: str) -> None:
    """Put a fault that found no target back into the plan, a little further on."""
    run.schedule.append((min(0.95, run.fraction + 0.05), kind))
    run.schedule.sort()


def _kill_broker(run: _Run) -> None:
    """SIGKILL one broker, and start it again 3 s later. While one is down or restarting, a
    further broker-kill waits (two down of three would lose the quorum, not test us)."""
    cluster = run.cfg.broker
    if run.broker_down.is_set():
        _later(run, "broker-kill")
        return
    victim = run.rng.choice(cluster.running())
    run.broker_down.set()
    cluster.kill(victim)
    run.event("broker-killed", node=victim)
    run.faults["broker-kill"] += 1

    def revive() -> None:
        try:
            time.sleep(3)
            cluster.restart(victim, timeout=120)
            run.event("broker-restarted", node=victim)
        except Exception as e:  # reported, and the run's end restarts any node left down
            run.event("broker-restart-failed", node=victim, error=str(e)[:500])
        finally:
            run.broker_down.clear()

    threading.Thread(target=revive, daemon=True).start()


def _consumed(run: _Run, ends: dict[TopicPartition, int]) -> int:
    """Records consumed for good: committed positions, from the group or the sink's table."""
    committed = _committed(run)
    for tp, off in committed.items():
        if off < run.last_committed.get(tp, -1):
            run.regressions.append(f"{tp}: {run.last_committed[tp]} -> {off}")
        run.last_committed[tp] = off
    return sum(min(committed.get(tp, 0), end) for tp, end in ends.items())


def _committed(run: _Run) -> dict[TopicPartition, int]:
    cfg = run.cfg
    if cfg.guarantee == "exactly-once" and cfg.sink != "topic":
        if cfg.sink == "sqlite" and not Path(run.db).exists():
            return {}
        try:  # the sink's own reading of its offsets table
            if run.offsets_reader is None:
                run.offsets_reader = (
                    SqliteSink(run.db) if cfg.sink == "sqlite" else PostgresSink(run.db)
                )
            return run.offsets_reader.stored_offsets(run.group)
        except Exception:  # the table appears with the first processor
            return dict(run.last_committed)
    try:
        return run.admin().committed_offsets(run.group, [run.input])
    except Exception:  # a broker may be down: try again next tick
        return dict(run.last_committed)


def _stop_all(run: _Run, slots: list[_Slot]) -> None:
    for slot in slots:
        if slot.proc is not None and slot.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.proc.pid, signal.SIGCONT)
                if not slot.terminating:  # one SIGTERM drains; a second exits at once
                    slot.proc.terminate()
    for slot in slots:
        if slot.proc is None:
            continue
        already = slot.proc.returncode is not None
        try:
            slot.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            slot.proc.kill()
            slot.proc.wait(timeout=10)
        if not already:
            run.event("exited", slot=slot.index, code=slot.proc.returncode, at_end=True)
    run.event("stopped")


def _hanging(run: _Run) -> list[str]:
    """Output partitions whose LSO is still below the high watermark at the end (after the
    processors' transaction timeout has had time to clean up)."""
    if run.cfg.sink != "topic":
        return []
    deadline = time.monotonic() + 20
    while True:
        with run.log.admin() as admin:
            stuck = []
            for p in range(PARTITIONS):
                w = admin.watermarks(TopicPartition(run.output, p))
                if w.lso < w.high:
                    stuck.append(f"{run.output}[{p}] lso={w.lso} high={w.high}")
        if not stuck or time.monotonic() > deadline:
            return stuck
        time.sleep(0.5)


def _effects(run: _Run) -> list[Effect]:
    if run.cfg.sink == "topic":
        out = []
        for r in read_topic(run.log, run.output, "read_committed"):
            mid = r.header("id")
            txn = r.header("txn")
            out.append(
                Effect(
                    (mid or b"").decode(),
                    (r.key or b"").decode(),
                    f"{r.partition}@{r.offset}",
                    txn.decode() if txn else None,
                )
            )
        return out
    query = "SELECT msg_id, account, seq FROM audit_effects ORDER BY seq"
    if run.cfg.sink == "sqlite":
        with contextlib.closing(sqlite3.connect(run.db)) as conn:
            rows = conn.execute(query).fetchall()
    else:
        import psycopg

        with psycopg.connect(run.db) as pg:
            rows = pg.execute(query).fetchall()
    return [Effect(m, a, f"row {s}") for m, a, s in rows]


def _dead_letters(run: _Run) -> list[str]:
    with run.log.admin() as admin:
        if f"{run.input}.dlq" not in admin.list_topics():
            return []
    return [
        (r.header("id") or b"").decode()
        for r in read_topic(run.log, f"{run.input}.dlq", "read_committed")
    ]


def _fresh_effects_table(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as pg:
        pg.execute("DROP TABLE IF EXISTS audit_effects")


def history_lines(events: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(e) + "\n" for e in events)
