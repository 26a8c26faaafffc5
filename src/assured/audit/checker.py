"""The checker: reads only the source topic, the output (read_committed and read_uncommitted),
the dead-letter topic and the sink, never the runtime's own counters, and names every anomaly.

Messages are compared by id, not offset: transaction markers take offsets, so gaps in offsets
are not losses.

A message's *outcome* is an effect (a committed output record or sink row carrying its id) or
a dead letter. The workload says which kind each message must end with (see
:mod:`assured.audit.workload`): an effect for ``ok``, ``transient``, ``fatal``, ``slow`` and
``zombie``; a dead letter for ``poison``, ``permanent`` and ``oversize``. Dead letters are
counted with their multiplicity, like effects. The rules:

========================  =====================================================  ====  ====  ====
anomaly                   an id with ...                                          EOS   ALO   AMO
========================  =====================================================  ====  ====  ====
lost                      no outcome of the kind it must have                    fail  fail  count
duplicate                 two or more effects, or two or more dead letters       fail  count fail
effect-and-dead-letter    both an effect and a dead letter                       fail  count fail
refused-effect            an effect, though its handler never succeeds           fail  fail  fail
stray-effect              an effect, though it is no input's id                  fail  fail  fail
aborted-read              an effect written in a transaction reported aborted    fail  --    --
unseen, reordered, ...    as in the design's table                               (unchanged)
========================  =====================================================  ====  ====  ====

Why: exactly-once promises one outcome, of the right kind. At-most-once promises never more
than one outcome: an effect *and* a dead letter is two (whoever replays the dead-letter topic
acts a second time). At-least-once promises at least one; extra outcomes are its price, counted,
not failed. An effect for a message whose handler never returns can only be a failed attempt's
output that leaked; every protocol keeps "a failed call leaves nothing behind", so it fails all.

Transaction labels: each effect on the output topic carries the label of the transaction that
wrote it and the processor run (a token per process) that wrote it; the processors report each
label's outcome into the history. A transaction is keyed by (run, label), so a restarted
processor that counts its labels from 1 again is never confused with its predecessor. A key
reported only ``aborted`` is aborted: its visible effects are aborted reads. A key reported
both committed and aborted, or with an outcome other than those two (``unknown``), is
*ambiguous*: the checker does not call its effects aborted reads (what read_committed shows is
what the log committed), and counts such keys in ``ambiguous_transactions`` for a human to read.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from assured._secrets import redact_url
from assured.audit.workload import REFUSED_FATES
from assured.log import Isolation, Log, Record, TopicPartition

__all__ = ["ANOMALIES", "Effect", "Findings", "History", "parse_history", "read_topic", "verdict"]

ANOMALIES = (
    "lost",
    "duplicate",
    "effect-and-dead-letter",
    "refused-effect",
    "aborted-read",
    "unseen",
    "reordered",
    "hanging-transaction",
    "commit-regression",
    "stray-effect",
)
# What fails each guarantee; the rest is counted. Exactly-once fails on every anomaly.
FAILING = {
    "exactly-once": ANOMALIES,
    "at-least-once": ("lost", "refused-effect", "unseen", "commit-regression", "stray-effect"),
    "at-most-once": (
        "duplicate",
        "effect-and-dead-letter",
        "refused-effect",
        "unseen",
        "commit-regression",
        "stray-effect",
    ),
}
SHOWN = 20  # ids shown per anomaly


@dataclass(frozen=True)
class Effect:
    """One committed effect of one input message."""

    id: str
    account: str
    where: str  # output partition@offset, or sink row
    txn: str | None = None  # the label of the transaction that wrote it
    run: str | None = None  # the processor run (one per process) that wrote it


@dataclass
class Findings:
    guarantee: str
    log: str
    sink: str
    sent: int
    effects: int
    dead_lettered: int  # dead-letter records, each repeat counted
    anomalies: dict[str, list[str]] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    verdict: str = ""
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    ambiguous_transactions: int = 0  # labels told both committed and aborted, or unknown
    # Where repeated outcomes came from, for a human to read: see :func:`duplicate_evidence`.
    evidence: dict[str, Any] = field(default_factory=dict)
    app: str = ""  # assured audit --app: the App audited (module:attribute)

    def count(self, anomaly: str) -> int:
        return len(self.anomalies.get(anomaly, []))

    @property
    def lost(self) -> int:
        return self.count("lost")

    @property
    def duplicated(self) -> int:
        return self.count("duplicate")

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["lost"] = self.lost
        out["duplicated"] = self.duplicated
        out["anomalies"] = {
            name: {"count": len(ids), "ids": ids[:SHOWN]} for name, ids in self.anomalies.items()
        }
        return out


@dataclass
class History:
    """What the processors wrote down: each transaction's reported outcomes, keyed by
    (run, label), and each planned fault that fired inside a handler."""

    outcomes: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    fired: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # fault -> ids

    def aborted(self) -> set[tuple[str, str]]:
        """Keys reported aborted and nothing else."""
        return {key for key, told in self.outcomes.items() if told == {"aborted"}}

    def ambiguous(self) -> set[tuple[str, str]]:
        """Keys reported both committed and aborted, or with another outcome (unknown)."""
        return {
            key for key, told in self.outcomes.items() if told not in ({"aborted"}, {"committed"})
        }


def parse_history(lines: Iterable[str]) -> History:
    """The processors' history file: ``{"txn", "outcome", "run"}`` lines for transactions and
    ``{"fault", "id"}`` lines for faults fired in a handler. A line cut short by a SIGKILL is
    skipped."""
    out = History()
    for line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "txn" in event and "outcome" in event:
            out.outcomes[(str(event.get("run", "")), str(event["txn"]))].add(event["outcome"])
        elif "fault" in event and "id" in event:
            out.fired[str(event["fault"])].add(str(event["id"]))
    return out


def read_topic(log: Log, topic: str, isolation: Isolation, settle_s: float = 2.0) -> list[Record]:
    """Every record of ``topic`` visible at ``isolation``, up to the end of each partition.

    The end is a partition's LSO (read_committed) or high watermark; a consumer's position may
    stop short of it where transaction markers close the partition, so reading also ends once
    nothing more arrived for ``settle_s`` after the first record (15 s if none comes)."""
    with log.admin() as admin:
        parts = [TopicPartition(topic, p) for p in range(admin.describe_topic(topic).partitions)]
        ends = {tp: admin.watermarks(tp) for tp in parts}
    if all(w.high == w.low for w in ends.values()):
        return []
    out: list[Record] = []
    with log.consumer(isolation=isolation) as consumer:
        consumer.assign(parts)
        started = time.monotonic()
        quiet_since = started
        while time.monotonic() - started < 60:
            got = consumer.poll(max_records=2000, timeout=0.2)
            out += got
            if got:
                quiet_since = time.monotonic()
                continue
            end = {tp: w.lso if isolation == "read_committed" else w.high for tp, w in ends.items()}
            if all(consumer.position(tp) >= end[tp] for tp in parts):
                break
            if out and time.monotonic() - quiet_since > settle_s:
                break
            if not out and time.monotonic() - started > 15:  # e.g. nothing but aborted records
                break
    return out


def check(
    *,
    guarantee: str,
    log_url: str,
    sink: str,
    ids: list[str],
    keys: dict[str, str],
    fates: Mapping[str, str],
    acked: set[str],
    source: Iterable[Record],
    effects: list[Effect],
    dead_letters: Iterable[str],
    history: History | None = None,
    hanging: list[str],
    regressions: list[str],
    ordered: bool = True,
    id_header: str = "id",
) -> Findings:
    """Every anomaly of the module's table, by message id. ``fates`` maps ids to their fate
    (ids not in it are ``ok``); ``dead_letters`` holds one id per dead-letter record.

    A user's App's effects (``assured audit --app``) have no order the audit knows of (rows a
    query returns): ``ordered=False`` leaves the ``reordered`` check out. ``id_header``: the
    input records' header holding their id."""
    history = history or History()
    counts = Counter(e.id for e in effects)
    dlq = Counter(dead_letters)
    refused = {i for i, fate in fates.items() if fate in REFUSED_FATES}
    seen_in_source = {
        r.header(id_header).decode()  # type: ignore[union-attr]
        for r in source
        if r.header(id_header) is not None
    }
    anomalies: dict[str, list[str]] = {name: [] for name in ANOMALIES}
    anomalies["lost"] = [i for i in ids if (dlq[i] if i in refused else counts[i]) == 0]
    anomalies["duplicate"] = [i for i in ids if counts[i] > 1 or dlq[i] > 1]
    anomalies["effect-and-dead-letter"] = [i for i in ids if counts[i] and dlq[i]]
    anomalies["refused-effect"] = [i for i in ids if i in refused and counts[i]]
    aborted = history.aborted()
    anomalies["aborted-read"] = sorted(
        {e.id for e in effects if e.txn is not None and (e.run or "", e.txn) in aborted}
    )
    anomalies["unseen"] = sorted(i for i in acked if i not in seen_in_source)
    anomalies["reordered"] = _reordered(effects, ids, keys) if ordered else []
    known = set(ids)
    anomalies["stray-effect"] = sorted({e.id for e in effects if e.id not in known})
    anomalies["hanging-transaction"] = hanging
    anomalies["commit-regression"] = regressions
    ambiguous = history.ambiguous()
    findings = Findings(
        guarantee=guarantee,
        log=redact_url(log_url),
        sink=sink,
        sent=len(ids),
        effects=len(effects),
        dead_lettered=sum(dlq.values()),
        anomalies=anomalies,
        ambiguous_transactions=len(
            {(e.run or "", e.txn) for e in effects if (e.run or "", e.txn or "") in ambiguous}
        ),
    )
    if anomalies["duplicate"]:
        findings.evidence = duplicate_evidence(anomalies["duplicate"], effects, dlq, history)
    verdict(findings)
    return findings


def duplicate_evidence(
    duplicated: list[str], effects: list[Effect], dlq: Mapping[str, int], history: History
) -> dict[str, Any]:
    """What tells a repeated outcome's cause: for each transaction that wrote an effect of a
    duplicated id, how many such effects it holds and what its processor said of it; and for
    the first ids, each effect's place and transaction. Two transactions both told committed,
    each holding a whole batch, point at positions that did not move with the outputs; one
    told aborted points at an abort that did not happen."""
    wanted = set(duplicated)
    per_txn: Counter[tuple[str, str]] = Counter(
        (e.run or "", e.txn or "") for e in effects if e.id in wanted
    )
    transactions = [
        {
            "run": run,
            "txn": txn,
            "told": sorted(history.outcomes.get((run, txn), ())) or ["nothing"],
            "duplicated_effects": n,
        }
        for (run, txn), n in sorted(per_txn.items(), key=lambda kv: (-kv[1], kv[0]))[:SHOWN]
    ]
    first = set(duplicated[:SHOWN])
    ids: dict[str, dict[str, Any]] = {
        i: {"effects": [], "dead_letters": dlq.get(i, 0)} for i in duplicated[:SHOWN]
    }
    for e in effects:
        if e.id in first:
            ids[e.id]["effects"].append({"where": e.where, "run": e.run, "txn": e.txn})
    return {"transactions": transactions, "ids": ids}


def _reordered(effects: list[Effect], ids: list[str], keys: dict[str, str]) -> list[str]:
    """Accounts whose effects (first occurrence of each id) are not in input order."""
    rank = {mid: n for n, mid in enumerate(ids)}
    last: dict[str, int] = {}
    first_seen: set[str] = set()
    bad: set[str] = set()
    for e in effects:
        if e.id in first_seen or e.id not in rank:
            continue
        first_seen.add(e.id)
        account = keys.get(e.id, e.account)
        if rank[e.id] < last.get(account, -1):
            bad.add(account)
        last[account] = max(last.get(account, -1), rank[e.id])
    return sorted(bad)


def verdict(f: Findings) -> None:
    """The module's table: exactly-once passes only with no anomaly at all; at-least-once fails
    on loss (extra outcomes are counted); at-most-once fails on extra outcomes (loss is
    counted); a leaked effect of a refused message fails them all."""
    failing = [a for a in FAILING[f.guarantee] if f.count(a)]
    f.reasons = [f"{a}={f.count(a)}" for a in failing]
    f.verdict = "fail" if failing else "pass"
