"""Running one audit: workload → processors under faults → wait until consumed → check.

Processors are real processes (``python -m assured.audit.processor``), restarted whenever they
die. Faults are drawn from the seed, so the same seed gives the same plan:

- external ones fire as progress crosses thresholds: ``sigkill``, ``sigterm``, ``sigstop``
  (frozen past the session timeout, then SIGCONT), ``broker-kill`` (SIGKILL one of three Kafka
  brokers, restart it), ``write-stall`` (freeze whoever writes past the others' delivery
  timeout: on the embedded engine a processor caught holding the engine's write lock, on Kafka
  a broker), ``rebalance`` (a processor leaves by SIGTERM, or one joins), ``db-restart``
  (PostgreSQL restarted, ``fast`` and ``immediate`` in turn);
- ``crash-points`` are armed in a processor's environment when it starts, to kill it at the
  n-th pass of the point where its guarantee is weakest;
- ``stuck-coordinator`` (Kafka, exactly-once to topics) is armed the same way: from its first
  commit on, the processor's first transactional producer never hears back when it sends its
  offsets (a client stuck on its coordinator connection; see ``crashpoints``), while the rest
  of the cluster works;
- the workload carries the rest in its messages' ``fate`` header: ``handler-errors``
  (transient, permanent, oversize and fatal failures of the handler), ``slow-handler`` (a
  handler outlasting the transaction timeout and ``max_poll_interval_ms``) and ``zombie`` (a
  handler SIGSTOPping its own process mid-transaction; the audit SIGCONTs it once its
  partitions have moved), ``disk-full`` (``--sink sqlite``: the sink's file may not grow
  while a handler writes, so SQLite rolls the batch's transaction back by itself; the next
  handler call gives it room again) and ``db-conflicts`` (``--sink postgres``: one message in
  fifty updates two shared rows in an order of its own before its effect, so records on
  different connections or processes deadlock and PostgreSQL fails one statement of each; the
  effect must still be made, once). Slow and zombie messages sit where the plan's thresholds
  fall.

Where a fault needs shorter timeouts to bite, the audit sets them for its processors only (see
:func:`tuning`). ``Findings.faults`` counts what landed, not what was planned.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pwd
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assured.audit.apps import APP_FAULTS, ID_HEADER, AppPlan, AppTarget, sink_rows
from assured.audit.checker import (
    Effect,
    Findings,
    History,
    check,
    parse_history,
    read_topic,
)
from assured.audit.workload import Workload, produce
from assured.errors import ConfigError, HarnessError
from assured.log import Admin, Log, Record, TopicPartition, open_log

__all__ = ["FAULTS", "AuditConfig", "Tuning", "check_faults", "run_audit", "tuning"]

FAULTS = (
    "sigkill",
    "sigterm",
    "sigstop",
    "crash-points",
    "lost-ack",
    "broker-kill",
    "handler-errors",
    "write-stall",
    "zombie",
    "rebalance",
    "db-restart",
    "slow-handler",
    "stuck-coordinator",
    "disk-full",
    "db-conflicts",
)
# Faults drawn on the schedule of thresholds (the kills budget is shared among them).
TIMED = (
    "sigkill",
    "sigterm",
    "sigstop",
    "broker-kill",
    "write-stall",
    "rebalance",
    "db-restart",
    "zombie",
    "slow-handler",
)
MARKED = {"zombie": "zombie", "slow-handler": "slow"}  # timed faults a message carries: its fate
HANDLER_ERRORS = ("transient", "permanent", "oversize", "fatal", "stray")
WEAK_POINTS = {
    ("at-most-once", "topic"): ["after-commit-before-handle"],
    ("at-most-once", "db"): ["after-commit-before-handle"],
    ("at-least-once", "topic"): ["after-handle-before-commit"],
    ("at-least-once", "db"): ["after-effect-before-offset"],
    ("exactly-once", "topic"): ["inside-transaction", "after-handle-before-commit"],
    ("exactly-once", "db"): ["after-effect-before-offset"],
}
PARTITIONS = 4
_PROC_LOCKS = Path("/proc/locks")
_SQLITE_WRITE_LOCK = 120  # the byte of a WAL file's -shm that SQLite's writer locks (os_unix.c)


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
    # Async handlers side by side (issue 14): records per batch at once, which never overlap,
    # and how long each awaits (9 in 10 that long, 1 in 10 ten times as long; 0: not async).
    concurrency: int = 1
    ordering: str = "key"
    handler_latency_ms: float = 0.0
    marked: int = 0  # handler-errors: messages per kind (0: one in a hundred, at least 3)
    broker: Any = None  # an assured.testing.KafkaCluster: broker-kill (3 nodes), write-stall
    # db-restart: an object with restart(mode) (assured.testing.PostgresServer), or the path
    # of the server's data directory (restarted with pg_ctl)
    postgres: Any = None
    # assured audit --app: the user's App under audit (its guarantee, group, topics and sink
    # replace the audit's own workload); see assured.audit.apps
    app: AppTarget | None = None
    progress: Callable[[int, int], None] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Tuning:
    """The processors' settings for one audit, shortened where a fault needs it to bite."""

    session_timeout_ms: int
    transaction_timeout_ms: int = 10_000
    max_poll_interval_ms: int = 300_000
    delivery_timeout_ms: int = 0  # 0: the log's default
    slow_ms: int = 0  # how long a slow handler sleeps
    stall_s: float = 0.0  # how long a write-stall freezes its victim
    zombie_s: float = 0.0  # how long a zombie stays frozen


def tuning(cfg: AuditConfig) -> Tuning:
    """``write-stall``: the delivery timeout is shortened and the stall outlasts it (and, on
    Kafka, the transaction timeout too), while the session timeout outlasts the stall, so the
    group is still the same when writes resume and a commit made then is accepted: a protocol
    that commits past a failed write shows it as loss. ``slow-handler``: the transaction
    timeout and ``max_poll_interval_ms`` are shortened and a slow handler sleeps 1.5 times as
    long. ``zombie``: frozen for twice the session timeout and 0.5 s more, on Kafka 2.5 s more
    (time for the group to move its partitions, then change once more around it: see
    :func:`_nudge`)."""
    kafka = cfg.log_url.startswith("kafka:")
    session = cfg.session_timeout_ms
    txn, poll, delivery, slow, stall = 10_000, 300_000, 0, 0, 0.0
    if "write-stall" in cfg.faults:
        if kafka:
            delivery, txn = 3_000, 5_000
            stall = (max(delivery, txn) + 3_000) / 1000
        else:
            delivery = 1_000
            stall = 3.0
        session = max(session, int(stall * 1000) + 4_000)
    if "slow-handler" in cfg.faults:
        limit = max(2_000, session)
        txn, poll = min(txn, limit), limit
        slow = int(limit * 1.5) + 500
        delivery = min(delivery, txn) if delivery else 0
    # On Kafka a zombie stays frozen 2 s longer: time for the members joining around it.
    zombie = 2 * session / 1000 + (2.5 if kafka else 0.5)
    return Tuning(session, txn, poll, delivery, slow, stall, zombie)


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.armed = False  # a crash point is armed in this process
        self.stopped_until = 0.0  # SIGSTOPped until then
        self.stopped_at = 0.0
        self.zombie = False  # stopped by its own handler (a zombie fate), not by us
        self.terminating = False  # sent SIGTERM: draining; a second signal would cut it short
        self.wanted = True  # restarted when it dies (a rebalance parks it)
        self.started_at = 0.0
        self.quick_failures = 0  # exits of its own, each soon after its start, in a row
        self.dying = False  # sent SIGKILL, not yet restarted

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class _Run:
    """The state of one audit while it runs."""

    def __init__(
        self, cfg: AuditConfig, log: Log, workdir: Path, app: AppPlan | None = None
    ) -> None:
        self.cfg = cfg
        self.log = log
        self.workdir = workdir
        self.plan = app
        self.rng = random.Random(cfg.seed + 1)
        tag = f"{cfg.guarantee}-{cfg.sink}-{cfg.seed}-{uuid.uuid4().hex[:6]}"
        self.input = f"audit-in-{tag}"
        self.output = f"audit-out-{tag}"
        self.group = f"audit-{tag}"
        self.history = workdir / f"history-{tag}.jsonl"
        self.marks = workdir / f"marks-{tag}"
        self.db = (
            str(workdir / f"effects-{tag}.db") if cfg.sink == "sqlite" else cfg.postgres_dsn or ""
        )
        self.inputs, self.outputs = [self.input], [self.output]
        if app is not None:  # the App's own topics, group and database
            self.inputs, self.outputs, self.group = app.inputs, app.outputs, app.group
            self.db = app.db
        self.tuning = tuning(cfg)
        self.faults: dict[str, int] = dict.fromkeys(cfg.faults, 0)
        self.regressions: list[str] = []
        self.last_committed: dict[TopicPartition, int] = {}
        # The whole plan is drawn up front from the seed, so the same seed gives the same
        # schedule; victims are picked at run time from a second generator.
        plan = random.Random(cfg.seed)
        kinds = [f for f in cfg.faults if f in TIMED]
        crash = "crash-points" in cfg.faults
        budget = cfg.kills if crash and not kinds else (cfg.kills // 2 if crash else 0)
        points = WEAK_POINTS[(cfg.guarantee, "topic" if cfg.sink == "topic" else "db")]
        self.crash_plan = [f"{plan.choice(points)}@{plan.randint(1, 2)}" for _ in range(budget)]
        # Processor starts whose transactional producer gets stuck from its first commit on
        # (no draws: the other faults' schedule for a seed stays as it was).
        self.stuck_plan = (
            ["send-offsets@1"] * max(1, cfg.kills // 25) if _stuck_applies(cfg) else []
        )
        external = cfg.kills - budget if kinds else 0
        timed = sorted(
            (round(plan.uniform(0.05, 0.9), 4), plan.choice(kinds)) for _ in range(external)
        )
        self.schedule = [(at, kind) for at, kind in timed if kind not in MARKED]
        self.fates = _fates(cfg, [(at, kind) for at, kind in timed if kind in MARKED])
        self.env = dict(os.environ)
        self.env.pop("ASSURED_CRASH_POINTS", None)
        self.env.pop("ASSURED_STUCK_CALLS", None)
        self._admin: Admin | None = None
        self.offsets_reader: Any = None  # a sqlite3 or psycopg connection
        self.broker_down = threading.Event()  # one broker at a time, so the quorum holds
        self.db_down = threading.Event()  # one database restart at a time
        self.db_restarts = 0  # begun: fast and immediate take turns
        self.stalled_until = 0.0  # a write-stall is on until then (one at a time)
        self.fraction = 0.0  # of the input consumed so far
        # When a zombie is frozen, the group is made to rebalance around it (see _nudge): the
        # monotonic times these membership changes fall due, and the member that joined.
        self.nudges: list[tuple[float, str]] = []
        self.nudged: list[_Slot] = []

    def admin(self) -> Admin:
        """One admin client for the whole run (polled 20 times a second)."""
        if self._admin is None:
            self._admin = self.log.admin()
        return self._admin

    def event(self, kind: str, **data: Any) -> None:
        self.cfg.events.append({"t": round(time.time(), 3), "event": kind, **data})


def _fates(cfg: AuditConfig, timed: list[tuple[float, str]]) -> dict[int, str]:
    """Messages (by index) that carry a fault: slow and zombie ones where their thresholds fall,
    handler errors spread from the seed."""
    n = cfg.messages
    fates: dict[int, str] = {}

    def mark(index: int, fate: str) -> None:  # the first unmarked message from there on
        for i in itertools.chain(range(index, n), range(index)):
            if i not in fates:
                fates[i] = fate
                return

    for at, kind in timed:
        mark(int(at * n), MARKED[kind])
    if "handler-errors" in cfg.faults:
        rng = random.Random(cfg.seed + 2)
        per_kind = cfg.marked or max(3, n // 100)
        for fate in HANDLER_ERRORS:
            # a fatal failure restarts a processor: fewer of those
            for _ in range(per_kind if fate != "fatal" else max(1, per_kind // 2)):
                mark(rng.randrange(n), fate)
    if "disk-full" in cfg.faults:
        rng = random.Random(cfg.seed + 3)
        for _ in range(cfg.marked or max(2, n // 300)):
            mark(rng.randrange(n), "diskfull")
    if "db-conflicts" in cfg.faults:
        rng = random.Random(cfg.seed + 4)
        for _ in range(cfg.marked or max(4, n // 50)):
            mark(rng.randrange(n), "conflict")
    return fates


def _stuck_applies(cfg: AuditConfig) -> bool:
    """``stuck-coordinator`` bites where a Kafka transactional producer sends offsets: on Kafka,
    exactly-once to topics (under the other guarantees, and into a database, it has nothing
    to stick and is not planned)."""
    return (
        "stuck-coordinator" in cfg.faults
        and cfg.log_url.startswith("kafka:")
        and cfg.guarantee == "exactly-once"
        and cfg.sink == "topic"
    )


def check_faults(names: Iterable[str]) -> tuple[str, ...]:
    """The fault names, checked: a :class:`ConfigError` in one line for an unknown one."""
    chosen = tuple(names)
    unknown = [f for f in chosen if f not in FAULTS]
    if unknown:
        raise ConfigError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    return chosen


# Faults a handler acts out in one kind of sink only: the sink, and what to say otherwise.
_ONE_SINK = {
    "disk-full": (
        "sqlite",
        "disk-full fills the disk of a SQLite sink (its file may not grow); give --sink sqlite",
    ),
    "db-conflicts": (
        "postgres",
        "db-conflicts makes records deadlock on PostgreSQL's row locks; give --sink postgres",
    ),
}


def _check_app(cfg: AuditConfig) -> None:
    if cfg.app is not None:
        cfg.app.check()
        needs_handler = [f for f in cfg.faults if f not in APP_FAULTS]
        if needs_handler:
            raise ConfigError(
                f"--app: {', '.join(needs_handler)} needs the audit's own handler to act it out; "
                f"an App's own code runs untouched under: {', '.join(APP_FAULTS)}"
            )


def _check(cfg: AuditConfig) -> None:
    check_faults(cfg.faults)
    _check_app(cfg)
    if cfg.sink not in ("topic", "sqlite", "postgres"):
        raise ConfigError(f"sink {cfg.sink!r}: topic, sqlite or postgres")
    if cfg.sink == "postgres" and not cfg.postgres_dsn:
        raise ConfigError("--sink postgres needs --postgres-dsn postgresql://user@host:port/db")
    if "broker-kill" in cfg.faults and (cfg.broker is None or len(cfg.broker.members) < 3):
        raise ConfigError("broker-kill needs a three-node Kafka cluster started by the audit")
    if "write-stall" in cfg.faults:
        if cfg.log_url.startswith("kafka:"):
            if cfg.broker is None:
                raise ConfigError("write-stall on Kafka needs the cluster the audit may SIGSTOP")
        elif not _PROC_LOCKS.exists():
            raise ConfigError("write-stall on the embedded engine needs Linux's /proc/locks")
    if "stuck-coordinator" in cfg.faults and not cfg.log_url.startswith("kafka:"):
        raise ConfigError(
            "stuck-coordinator is a Kafka client's fault (a transactional producer whose "
            "coordinator stops answering); the embedded engine has no coordinator to wait for"
        )
    for fault, (sink, why) in _ONE_SINK.items():
        if fault in cfg.faults and cfg.sink != sink:
            raise ConfigError(why)
    if "db-restart" in cfg.faults and (cfg.sink != "postgres" or cfg.postgres is None):
        raise ConfigError(
            "db-restart needs --sink postgres and the server to restart (--postgres-data DIR)"
        )


def run_audit(cfg: AuditConfig) -> Findings:
    """Audit ``cfg.guarantee`` on ``cfg.log_url`` and return what the checker found."""
    _check(cfg)
    started = time.monotonic()
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="assured-audit-"))
    workdir.mkdir(parents=True, exist_ok=True)
    plan = None
    if cfg.app is not None:
        plan = AppPlan(cfg.app)
        plan.prepare(workdir)
        _check(app_config(cfg, plan))
    log = open_log(cfg.log_url)
    run = _Run(cfg, log, workdir, plan)
    workload = _produce(run)
    if "lost-ack" in cfg.faults:
        run.faults["lost-ack"] = workload.lost_acks
    run.event("produced", messages=cfg.messages, acked=len(workload.acked))
    run.event(
        "schedule",
        crash_points=list(run.crash_plan),
        external=list(run.schedule),
        marked=dict(sorted(Counter(run.fates.values()).items())),
        tuning=run.tuning.__dict__,
    )
    total = sum(workload.ends.values())
    if cfg.sink == "postgres" and plan is None:
        _fresh_effects_table(run.db)
    slots = [_Slot(i) for i in range(cfg.processes)]
    try:
        _drive(run, slots, workload.ends, total)
    finally:
        _stop_all(run, slots)
        deadline = time.monotonic() + 180
        while (run.broker_down.is_set() or run.db_down.is_set()) and time.monotonic() < deadline:
            time.sleep(0.2)  # a broker or database still restarting: the check reads it all
        if cfg.broker is not None:
            for node in cfg.broker.members:
                if node.node_id not in cfg.broker.running():
                    cfg.broker.restart(node.node_id)
    hanging = _hanging(run)
    if run._admin is not None:
        run._admin.close()
    _drop_offsets_reader(run)
    history = parse_history(run.history.read_text().splitlines()) if run.history.exists() else None
    findings = _check_run(run, workload, history, hanging)
    _count_fired(run, history or History())
    findings.faults = dict(run.faults)
    landed = any(findings.faults.values())
    if plan is not None and not landed and findings.verdict == "pass":
        # Nothing was tried: a pass would claim what was not shown (a failure stands).
        findings.verdict = "inconclusive"
        findings.reasons.append(
            "no planned fault landed before the input ran out: give more input, or a longer "
            "--handle-delay-ms"
            if cfg.kills
            else "no fault was planned (--kills 0): the App ran without a crash"
        )
    findings.seconds = round(time.monotonic() - started, 2)
    run.event("checked", verdict=findings.verdict)
    if cfg.workdir is None:  # a folder of our own: gone once checked (a failed run keeps it)
        shutil.rmtree(workdir, ignore_errors=True)
    return findings


def _produce(run: _Run) -> Workload:
    """The topics, then the input: the audit's own workload, or the App's (``--app``)."""
    cfg, log, plan = run.cfg, run.log, run.plan
    if plan is not None:
        plan.effects_before(log)
        plan.create_topics(log, PARTITIONS)
        return plan.produce(log)
    with log.admin() as admin:
        admin.create_topic(run.input, PARTITIONS)
        admin.create_topic(run.output, PARTITIONS)
    lost_acks = cfg.kills if "lost-ack" in cfg.faults else 0
    return produce(log, run.input, cfg.messages, cfg.seed, cfg.poison_rate, lost_acks, run.fates)


def _check_run(
    run: _Run, workload: Workload, history: History | None, hanging: list[str]
) -> Findings:
    """What the checker finds: in the audit's own workload, or in the App's (``--app``)."""
    plan = run.plan
    if plan is not None:
        source = plan.source(run.log)
        findings = check(
            guarantee=plan.expect,
            log_url=run.cfg.log_url,
            sink=run.cfg.sink,
            ids=workload.ids,
            keys=workload.keys,
            fates={r.id: "poison" for r in plan.records if r.refused},
            acked=workload.acked,
            source=source,
            effects=plan.effects(run.log),
            dead_letters=plan.dead_letter_ids(run.log, source),
            history=history,
            hanging=hanging,
            regressions=run.regressions,
            ordered=False,
            id_header=ID_HEADER,
        )
        findings.app = run.cfg.app.app if run.cfg.app else ""
    else:
        source = read_topic(run.log, run.input, "read_uncommitted")
        findings = check(
            guarantee=run.cfg.guarantee,
            log_url=run.cfg.log_url,
            sink=run.cfg.sink,
            ids=workload.ids,
            keys=workload.keys,
            fates=workload.fates,
            acked=workload.acked,
            source=source,
            effects=_effects(run),
            dead_letters=_dead_letters(run, source),
            history=history,
            hanging=hanging,
            regressions=run.regressions,
        )
    return findings


def _count_fired(run: _Run, history: History) -> None:
    """Faults that fire inside handlers are counted from what the processors wrote down; stuck
    calls from the line a processor writes when its call first goes unanswered."""
    for fault in ("handler-errors", "slow-handler", "disk-full", "db-conflicts"):
        if fault in run.faults:
            run.faults[fault] = len(history.fired.get(fault, ()))
    if "stuck-coordinator" in run.faults:
        run.faults["stuck-coordinator"] = sum(
            log.read_text(errors="replace").count("assured: stuck call ")
            for log in run.workdir.glob("processor-*.log")
        )


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
            for slot in slots:  # each live processor writes its threads' stacks to its log
                if slot.alive() and not slot.stopped_until and slot.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.proc.pid, signal.SIGUSR1)
            time.sleep(1)
            raise TimeoutError(
                f"the audit of {cfg.guarantee} consumed {done} of {total} records in "
                f"{cfg.timeout_s:.0f} s; processors may be stuck (see {run.workdir}){_tail(run)}"
            )
        for slot in list(slots):
            _tend(run, slot, now)
        while run.nudges and now >= run.nudges[0][0]:
            _nudge(run, slots, run.nudges.pop(0)[1])
        done = _consumed(run, ends)
        if cfg.progress is not None:
            cfg.progress(done, total)
        if done >= total:
            return
        run.fraction = done / total if total else 1.0
        _fire_due(run, slots, done, total)
        time.sleep(0.05)


def _fire_due(run: _Run, slots: list[_Slot], done: int, total: int) -> None:
    """Inject every fault whose threshold ``done`` has crossed, each once. A fault that finds
    no target (everyone down or frozen) goes back into the plan and is tried on a later turn of
    the loop, after the slots were tended (a frozen one woken), never again in this one: late
    in a run its new threshold is already crossed, and retrying it here spun forever."""
    due: list[str] = []
    while run.schedule and done >= run.schedule[0][0] * total:
        due.append(run.schedule.pop(0)[1])
    for kind in due:
        _inject(run, slots, kind)


def _tend(run: _Run, slot: _Slot, now: float) -> None:
    """Wake a slot whose freeze is over, notice a zombie, restart or park one that died."""
    if slot.proc is None:
        return
    zombie_noticed = False
    if slot.stopped_until and now >= slot.stopped_until:
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.proc.pid, signal.SIGCONT)
        slot.stopped_until = 0.0
        _zombie_resumed(run, slot, now)
    elif "zombie" in run.faults and not slot.stopped_until and _frozen(slot.proc.pid):
        # Its own handler stopped it mid-transaction: keep it frozen past its session timeout.
        slot.stopped_at, slot.stopped_until = now, now + run.tuning.zombie_s
        slot.zombie = True
        zombie_noticed = True
        run.event("zombie-stopped", slot=slot.index, pid=slot.proc.pid)
    if zombie_noticed and run.cfg.log_url.startswith("kafka:"):
        # Members join around it, and leave once it is back (on Kafka, where a new owner
        # waits for offsets a transaction holds; the embedded engine commits them at once).
        session = run.tuning.session_timeout_ms / 1000
        run.nudges += [
            (now, "join"),
            (now + session + 1.5, "join"),
            (now + run.tuning.zombie_s + 1.0, "leave"),
        ]
        run.nudges.sort()
    if slot.proc.poll() is not None:
        code = slot.proc.returncode
        run.event("exited", slot=slot.index, code=code)
        if code == -signal.SIGKILL and slot.armed:
            run.faults["crash-points"] += 1
        slot.stopped_until, slot.zombie = 0.0, False
        if run.plan is not None:
            _app_failing(run, slot, code, now)
        if slot.wanted:
            _start(run, slot)
        else:
            slot.proc = None  # left the group for good (a rebalance); may join again later


# An App's processor that exits by itself this soon after starting, this many times in a row,
# fails at start (a setting its App refuses, a bug on its first record): the audit stops.
_QUICK_S, _QUICK_EXITS = 5.0, 3


def _app_failing(run: _Run, slot: _Slot, code: int, now: float) -> None:
    """Stop the audit of an App whose processor keeps failing as it starts, with its error,
    rather than restart it until the audit's timeout."""
    planned = code in (0, -signal.SIGKILL, -signal.SIGTERM)  # the audit's doing, or drained
    if not planned and now - slot.started_at < _QUICK_S:
        slot.quick_failures += 1
    elif code == 0 or now - slot.started_at >= _QUICK_S:
        slot.quick_failures = 0
    if slot.quick_failures >= _QUICK_EXITS:
        raise HarnessError(
            f"the App's processor exited with {code}, {_QUICK_EXITS} times in a row within "
            f"{_QUICK_S:.0f} s of starting{_tail(run, run.workdir / f'processor-{slot.index}.log')}"
        )


def _zombie_resumed(run: _Run, slot: _Slot, now: float) -> None:
    """A zombie is back: it counts if it stayed frozen past its session timeout (one woken
    early because the run ended does not)."""
    if not slot.zombie:
        return
    slot.zombie = False
    held = now - slot.stopped_at
    if held * 1000 >= run.tuning.session_timeout_ms:
        run.faults["zombie"] += 1
    run.event("zombie-resumed", slot=slot.index, seconds=round(held, 2))


def _frozen(pid: int) -> bool:
    """Is the process stopped (by a signal)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] in ("T", "t")


def _tail(run: _Run, log: Path | None = None) -> str:
    """The end of processor log ``log``, or of the most recently written one, for an error
    message."""
    if log is None:
        logs = sorted(run.workdir.glob("processor-*.log"), key=lambda p: p.stat().st_mtime)
        log = logs[-1] if logs else None
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").strip().splitlines()[-5:]
    return f"; the end of {log.name}:\n" + "\n".join(line[:300] for line in text)


def _start(run: _Run, slot: _Slot) -> None:
    cfg, t = run.cfg, run.tuning
    env = dict(run.env)
    slot.armed = False
    slot.terminating = False
    slot.dying = False
    if run.stuck_plan and (slot.starts == 0 or not run.crash_plan):
        # A slot's first start (or any, once crash points run out), with no crash point to
        # cut it short: the stuck producer must be replaced for the slot to go on.
        env["ASSURED_STUCK_CALLS"] = run.stuck_plan.pop(0)
    elif run.crash_plan:
        env["ASSURED_CRASH_POINTS"] = run.crash_plan.pop(0)
        slot.armed = True
    cmd = _app_command(run, slot) if run.plan is not None else [
        sys.executable, "-m", "assured.audit.processor",
        "--log", cfg.log_url, "--guarantee", cfg.guarantee, "--group", run.group,
        "--input", run.input, "--output", run.output, "--sink", cfg.sink, "--db", run.db,
        "--slot", str(slot.index), "--history", str(run.history), "--marks", str(run.marks),
        "--session-timeout-ms", str(t.session_timeout_ms),
        "--handle-delay-ms", str(cfg.handle_delay_ms),
        "--transaction-timeout-ms", str(t.transaction_timeout_ms),
        "--max-poll-interval-ms", str(t.max_poll_interval_ms),
        "--delivery-timeout-ms", str(t.delivery_timeout_ms),
        "--slow-ms", str(t.slow_ms),
        "--concurrency", str(cfg.concurrency), "--ordering", cfg.ordering,
        "--handler-latency-ms", str(cfg.handler_latency_ms),
    ]  # fmt: skip
    errors = (run.workdir / f"processor-{slot.index}.log").open("ab")
    slot.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    slot.started_at = time.monotonic()
    errors.close()
    slot.starts += 1
    run.event(
        "started", slot=slot.index, pid=slot.proc.pid, crash_point=env.get("ASSURED_CRASH_POINTS"),
        stuck=env.get("ASSURED_STUCK_CALLS"),
    )  # fmt: skip


def app_config(cfg: AuditConfig, plan: AppPlan) -> AuditConfig:
    """``cfg`` as it applies to the App under audit: its own guarantee and sink."""
    cfg.guarantee, cfg.sink = plan.guarantee, plan.sink_kind
    cfg.messages = len(plan.records)
    if plan.sink_kind == "postgres":
        cfg.postgres_dsn = plan.db
    return cfg


def _app_command(run: _Run, slot: _Slot) -> list[str]:
    """The processor of ``assured audit --app``: the user's App (see app_processor)."""
    cfg, t, plan = run.cfg, run.tuning, run.plan
    assert plan is not None
    assert cfg.app is not None
    return [
        sys.executable, "-m", "assured.audit.app_processor",
        "--app", cfg.app.app, "--folder", str(cfg.app.folder), "--log", cfg.log_url,
        "--slot", str(slot.index), "--history", str(run.history), "--sink-path", plan.sink_path,
        "--session-timeout-ms", str(t.session_timeout_ms),
        "--transaction-timeout-ms", str(t.transaction_timeout_ms),
        "--max-poll-interval-ms", str(t.max_poll_interval_ms),
        "--delivery-timeout-ms", str(t.delivery_timeout_ms),
        "--handle-delay-ms", str(cfg.handle_delay_ms),
    ]  # fmt: skip


def _inject(run: _Run, slots: list[_Slot], kind: str) -> None:
    if kind == "broker-kill":
        _kill_broker(run)
        return
    if kind == "db-restart":
        _restart_database(run)
        return
    if kind == "rebalance":
        _rebalance(run, slots)
        return
    if kind == "write-stall" and run.cfg.log_url.startswith("kafka:"):
        _stall_broker(run)
        return
    live = [
        s
        for s in slots
        if s.alive() and not (s.stopped_until or s.terminating or s.dying) and _settled(run, s)
    ]
    if not live:  # everyone is down or frozen: try again a little later
        _later(run, kind)
        return
    if kind == "write-stall":
        _stall_writer(run, live)
        return
    slot = run.rng.choice(live)
    assert slot.proc is not None
    sig = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigstop": signal.SIGSTOP}[kind]
    with contextlib.suppress(ProcessLookupError):
        os.kill(slot.proc.pid, sig)
    if kind == "sigterm":
        slot.terminating = True
    if kind == "sigkill":
        slot.dying = True  # not picked again before it is reaped and restarted
    if kind == "sigstop":  # a zombie: frozen past its session timeout, then back
        slot.stopped_until = time.monotonic() + 2 * run.tuning.session_timeout_ms / 1000
    run.faults[kind] += 1
    run.event(kind, slot=slot.index, pid=slot.proc.pid)


# A processor of a user's App is a target once it has been up this long: one signalled as it
# starts has run none of the App's code (nor set up its signal handlers), and shows nothing.
_APP_SETTLE_S = 0.5


def _settled(run: _Run, slot: _Slot) -> bool:
    return run.plan is None or time.monotonic() - slot.started_at >= _APP_SETTLE_S


def _later(run: _Run, kind: str) -> None:
    """Put a fault that found no target back into the plan, a little further on."""
    run.schedule.append((min(0.95, run.fraction + 0.05), kind))
    run.schedule.sort()


# -- write-stall -------------------------------------------------------------------------------


def _write_lock_holder(shm: Path) -> int | None:
    """The process holding the write lock of the SQLite WAL database whose -shm is ``shm``
    (SQLite's writer takes a POSIX lock on one byte of that file, which /proc/locks lists)."""
    try:
        st = shm.stat()
        lines = _PROC_LOCKS.read_text().splitlines()
    except OSError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        parts = line.split()  # n: POSIX ADVISORY WRITE pid maj:min:inode start end
        if (
            len(parts) == 8
            and parts[1] == "POSIX"
            and parts[3] == "WRITE"
            and parts[5] == where
            and parts[6] == str(_SQLITE_WRITE_LOCK)
        ):
            return int(parts[4])
    return None


def _stall_writer(run: _Run, live: list[_Slot]) -> None:
    """Catch a processor holding the engine's write lock, SIGSTOP it there, and leave it
    frozen for ``stall_s``, longer than the others' delivery timeout: their writes fail while
    their reads go on. Only a processor seen holding the lock once frozen counts."""
    if time.monotonic() < run.stalled_until:  # the lock is frozen already: nobody else has it
        _later(run, "write-stall")
        return
    shm = Path(f"{getattr(run.log, 'path', '')}-shm")
    by_pid = {s.proc.pid: s for s in live if s.proc is not None}
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        pid = _write_lock_holder(shm)
        if pid not in by_pid:
            time.sleep(0.0002)
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        settle = time.monotonic() + 0.2
        while not _frozen(pid) and time.monotonic() < settle:
            time.sleep(0.0005)
        if _write_lock_holder(shm) == pid:
            slot = by_pid[pid]
            slot.stopped_until = run.stalled_until = time.monotonic() + run.tuning.stall_s
            run.faults["write-stall"] += 1
            run.event("write-stall", slot=slot.index, pid=pid, seconds=run.tuning.stall_s)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # it let go before it stopped: try again
    run.event("write-stall-missed")
    _later(run, "write-stall")


def _stall_broker(run: _Run) -> None:
    """SIGSTOP one broker for ``stall_s`` (past the processors' delivery and transaction
    timeouts), then SIGCONT it. One broker at a time, shared with broker-kill."""
    cluster = run.cfg.broker
    if run.broker_down.is_set():
        _later(run, "write-stall")
        return
    victim = run.rng.choice(cluster.running())
    (node,) = [n for n in cluster.members if n.node_id == victim]
    proc = node.process()
    if proc is None:
        _later(run, "write-stall")
        return
    run.broker_down.set()
    proc.suspend()
    run.faults["write-stall"] += 1
    run.event("broker-stopped", node=victim, seconds=run.tuning.stall_s)

    def resume() -> None:
        try:
            time.sleep(run.tuning.stall_s)
        finally:
            with contextlib.suppress(Exception):
                proc.resume()
            run.event("broker-resumed", node=victim)
            run.broker_down.clear()

    threading.Thread(target=resume, daemon=True).start()


# -- rebalance ---------------------------------------------------------------------------------


def _rebalance(run: _Run, slots: list[_Slot]) -> None:
    """One change of membership: a processor leaves (SIGTERM, drained, not restarted) or one
    joins (a parked slot, or a new one), between 1 and ``processes + 2`` members."""
    wanted = [s for s in slots if s.wanted]
    movable = [s for s in wanted if s.alive() and not s.stopped_until and not s.terminating]
    can_join = len(wanted) < run.cfg.processes + 2
    can_leave = len(wanted) > 1 and bool(movable)
    if not (can_join or can_leave):
        _later(run, "rebalance")
        return
    if can_join and (not can_leave or run.rng.random() < 0.5):
        slot = _join(run, slots)
        run.event("joined", slot=slot.index)
    else:
        slot = run.rng.choice(movable)
        _leave(slot)
        run.event("left", slot=slot.index, pid=slot.proc.pid if slot.proc else None)
    run.faults["rebalance"] += 1


def _join(run: _Run, slots: list[_Slot]) -> _Slot:
    """A member joins: a parked slot started again, or a new one."""
    parked = [s for s in slots if not s.wanted and s.proc is None]
    slot = parked[0] if parked else _Slot(len(slots))
    if not parked:
        slots.append(slot)
    slot.wanted = True
    _start(run, slot)
    return slot


def _leave(slot: _Slot) -> None:
    """A member leaves for good: SIGTERM (it drains and leaves the group), then stays parked."""
    assert slot.proc is not None
    slot.wanted, slot.terminating = False, True
    with contextlib.suppress(ProcessLookupError):
        os.kill(slot.proc.pid, signal.SIGTERM)


def _nudge(run: _Run, slots: list[_Slot], step: str) -> None:
    """Membership changes around a frozen zombie, whose open transaction may hold its
    partitions' committed positions (pending until it commits or aborts). A first ``join`` as
    it freezes: the group waits for the zombie's session to end, then hands its partitions out,
    and the members given them wait for those positions. A second ``join`` while they wait:
    every member's partitions are taken and given again, the waiting ones' too: what Kafka's
    wait for stable offsets (KIP-447) must survive, or those partitions start over from their
    beginning. ``leave`` once the zombie is back: the members that joined go again."""
    if step == "join":
        if len([s for s in slots if s.wanted]) >= run.cfg.processes + 2:
            return
        slot = _join(run, slots)
        run.nudged.append(slot)
        run.event("nudge-joined", slot=slot.index)
        return
    joined, run.nudged = run.nudged, []
    for slot in joined:
        if slot.alive() and not slot.stopped_until and not slot.terminating:
            _leave(slot)
            run.event("nudge-left", slot=slot.index, pid=slot.proc.pid if slot.proc else None)


# -- db-restart --------------------------------------------------------------------------------


def _restart_database(run: _Run) -> None:
    """Restart PostgreSQL in the background, ``fast`` and ``immediate`` in turn."""
    if run.db_down.is_set():
        _later(run, "db-restart")
        return
    mode = ("fast", "immediate")[run.db_restarts % 2]
    run.db_restarts += 1
    run.db_down.set()
    run.event("db-restart", mode=mode)

    def restart() -> None:
        try:
            restart_postgres(run.cfg.postgres, mode)
            run.faults["db-restart"] += 1
            run.event("db-restarted", mode=mode)
        except Exception as e:  # reported; the run goes on with whatever the server does
            run.event("db-restart-failed", mode=mode, error=str(e)[:500])
        finally:
            run.db_down.clear()

    threading.Thread(target=restart, daemon=True).start()


def restart_postgres(server: Any, mode: str) -> None:
    """Restart a PostgreSQL server: ``server.restart(mode)`` if it has one, else ``pg_ctl
    restart -m mode`` on its data directory (``server`` is that path, or has a ``workdir``
    holding ``data``), run as the directory's owner when we are root."""
    method = getattr(server, "restart", None)
    if callable(method):
        method(mode)
        return
    from assured.testing.postgres import find_bin_dir

    data = Path(server) if isinstance(server, str | Path) else Path(server.workdir) / "data"
    bin_dir = getattr(server, "bin_dir", None) or find_bin_dir()
    cmd = [
        str(Path(bin_dir) / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "-t", "60",
        "-l", str(data / "audit-restart.log"), "restart",
    ]  # fmt: skip
    owner = data.stat().st_uid
    if os.geteuid() == 0 and owner != 0:
        cmd = ["runuser", "-u", pwd.getpwuid(owner).pw_name, "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise HarnessError(
            f"pg_ctl restart -m {mode} failed (exit {done.returncode}): "
            f"{(done.stdout + done.stderr).strip()[-500:]}"
        )


# -- brokers -----------------------------------------------------------------------------------


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


# -- progress and the end ----------------------------------------------------------------------


def _consumed(run: _Run, ends: dict[TopicPartition, int]) -> int:
    """Records consumed for good: committed positions, from the group or the sink's table."""
    committed = _committed(run)
    if any(off < run.last_committed.get(tp, -1) for tp, off in committed.items()):
        committed = _confirmed(run, committed)
    for tp, off in committed.items():
        if off < run.last_committed.get(tp, -1):
            run.regressions.append(f"{tp}: {run.last_committed[tp]} -> {off}")
        run.last_committed[tp] = off
    return sum(min(committed.get(tp, 0), end) for tp, end in ends.items())


def _committed(run: _Run) -> dict[TopicPartition, int]:
    cfg = run.cfg
    if cfg.guarantee == "exactly-once" and cfg.sink != "topic":
        try:  # the database's own offsets table, read without taking any write lock
            return _stored_offsets(run)
        except Exception:  # the table appears with the first processor; a restart breaks us
            _drop_offsets_reader(run)
            return dict(run.last_committed)
    try:
        return run.admin().committed_offsets(run.group, run.inputs)
    except Exception:  # a broker may be down: try again next tick
        return dict(run.last_committed)


def _confirmed(run: _Run, seen: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
    """Offsets that went backwards, read again as a starting consumer reads them (stable). A
    group coordinator elected after a broker died answers a plain read from its own high
    watermark, which may lag the old leader's: offsets a commit or two old that no consumer
    would start from. Only a drop the stable read shows too is the group's; one it does not
    show (or a stable read that fails) is left out, and the last offsets seen are kept."""
    if run.cfg.guarantee == "exactly-once" and run.cfg.sink != "topic":
        return seen  # the database's own table: no replicas to lag
    try:
        stable = run.admin().committed_offsets(run.group, run.inputs, stable=True)
    except Exception:
        stable = {}
    out = dict(seen)
    for tp, off in seen.items():
        last = run.last_committed.get(tp, -1)
        if off < last:
            again = stable.get(tp)
            if again is None or again >= last:
                run.event("offset-read-lagged", partition=str(tp), read=off, stable=again)
                out[tp] = max(last, again if again is not None else last)
            else:
                out[tp] = again
    return out


_STORED = (
    "SELECT topic, partition, next_offset FROM assured_offsets "
    "WHERE group_id = ? AND next_offset IS NOT NULL"
)


def _stored_offsets(run: _Run) -> dict[TopicPartition, int]:
    """The sink's stored offsets, by a plain read: a processor frozen in the middle of a
    database batch (a zombie) holds the write lock, and must not stall the audit too."""
    if run.offsets_reader is None:
        if run.cfg.sink == "sqlite":
            if not Path(run.db).exists():
                return {}
            run.offsets_reader = sqlite3.connect(run.db, timeout=1, isolation_level=None)
        else:
            import psycopg

            run.offsets_reader = psycopg.connect(run.db, autocommit=True, connect_timeout=2)
    query = _STORED if run.cfg.sink == "sqlite" else _STORED.replace("?", "%s")
    rows = run.offsets_reader.execute(query, (run.group,)).fetchall()
    return {TopicPartition(t, p): o for t, p, o in rows}


def _drop_offsets_reader(run: _Run) -> None:
    if run.offsets_reader is not None:
        with contextlib.suppress(Exception):
            run.offsets_reader.close()
        run.offsets_reader = None


def _stop_all(run: _Run, slots: list[_Slot]) -> None:
    for slot in slots:
        if slot.proc is not None and slot.proc.poll() is None:
            _zombie_resumed(run, slot, time.monotonic())
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
    if run.cfg.sink != "topic" or not run.outputs:
        return []
    deadline = time.monotonic() + max(20, 2 * run.tuning.transaction_timeout_ms / 1000)
    while True:
        with run.log.admin() as admin:
            stuck = []
            for topic in run.outputs:
                for p in range(admin.describe_topic(topic).partitions):
                    w = admin.watermarks(TopicPartition(topic, p))
                    if w.lso < w.high:
                        stuck.append(f"{topic}[{p}] lso={w.lso} high={w.high}")
        if not stuck or time.monotonic() > deadline:
            return stuck
        time.sleep(0.5)


def _effects(run: _Run) -> list[Effect]:
    if run.cfg.sink == "topic":
        out = []
        for r in read_topic(run.log, run.output, "read_committed"):
            mid, txn, by = r.header("id"), r.header("txn"), r.header("run")
            out.append(
                Effect(
                    (mid or b"").decode(),
                    (r.key or b"").decode(),
                    f"{r.partition}@{r.offset}",
                    txn.decode() if txn else None,
                    by.decode() if by else None,
                )
            )
        return out
    query = "SELECT msg_id, account, seq FROM audit_effects ORDER BY seq"
    return [Effect(m, a, f"row {s}") for m, a, s in _sink_rows(run, query)]


def _sink_rows(run: _Run, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return sink_rows(run.db, run.cfg.sink == "postgres", query, params)


def _dead_letters(run: _Run, source: list[Record]) -> list[str]:
    """One id per dead letter. From the dead-letter topic, and with a sink also from the
    runtime's ``assured_dead_letters`` table (dead letters committed with the effects and
    published by a relay, maybe not yet): an id counts as many times as the more of the two
    holds it, so a letter committed but not yet relayed is not lost, and one relayed twice,
    or committed twice, is a duplicate."""
    in_topic: Counter[str] = Counter()
    with run.log.admin() as admin:
        has_topic = f"{run.input}.dlq" in admin.list_topics()
    if has_topic:
        in_topic.update(
            (r.header("id") or b"").decode()
            for r in read_topic(run.log, f"{run.input}.dlq", "read_committed")
        )
    in_table: Counter[str] = Counter()
    if run.cfg.sink != "topic":
        ids = {(r.partition, r.offset): (r.header("id") or b"").decode() for r in source}
        query = (
            "SELECT source_partition, source_offset FROM assured_dead_letters "
            "WHERE group_id = ? AND source_topic = ?"
        )
        with contextlib.suppress(Exception):  # no such table: no dead letters there
            rows = _sink_rows(run, query, (run.group, run.input))
            in_table.update(ids.get((int(p), int(o)), f"?{p}@{o}") for p, o in rows)
    counts = {i: max(in_topic[i], in_table[i]) for i in set(in_topic) | set(in_table)}
    return [i for i, n in counts.items() for _ in range(n)]


def _fresh_effects_table(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as pg:
        pg.execute("DROP TABLE IF EXISTS audit_effects")


def history_lines(events: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(e) + "\n" for e in events)
