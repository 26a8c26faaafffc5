"""The checker: reads only the source topic, the output (read_committed and read_uncommitted),
the dead-letter topic and the sink, never the runtime's own counters, and names every anomaly.

Messages are compared by id, not offset: transaction markers take offsets, so gaps in offsets
are not losses."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from assured.log import Isolation, Log, Record, TopicPartition

__all__ = ["ANOMALIES", "Effect", "Findings", "read_topic", "verdict"]

ANOMALIES = (
    "lost",
    "duplicate",
    "aborted-read",
    "unseen",
    "reordered",
    "hanging-transaction",
    "commit-regression",
)
SHOWN = 20  # ids shown per anomaly


@dataclass(frozen=True)
class Effect:
    """One committed effect of one input message."""

    id: str
    account: str
    where: str  # output partition@offset, or sink row
    txn: str | None = None


@dataclass
class Findings:
    guarantee: str
    log: str
    sink: str
    sent: int
    effects: int
    dead_lettered: int
    anomalies: dict[str, list[str]] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    verdict: str = ""
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0

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
    poison: set[str],
    acked: set[str],
    source: Iterable[Record],
    effects: list[Effect],
    dead_letters: Iterable[str],
    aborted_txns: set[str],
    hanging: list[str],
    regressions: list[str],
) -> Findings:
    """Every anomaly of the design's table, by message id."""
    counts = Counter(e.id for e in effects)
    expected = [i for i in ids if i not in poison]
    dlq = set(dead_letters)
    seen_in_source = {r.header("id").decode() for r in source if r.header("id") is not None}  # type: ignore[union-attr]
    anomalies: dict[str, list[str]] = {name: [] for name in ANOMALIES}
    anomalies["lost"] = [i for i in expected if counts[i] == 0] + [
        i for i in sorted(poison) if i not in dlq and counts[i] == 0
    ]
    anomalies["duplicate"] = [i for i in ids if counts[i] > 1]
    anomalies["aborted-read"] = sorted({e.id for e in effects if e.txn in aborted_txns})
    anomalies["unseen"] = sorted(i for i in acked if i not in seen_in_source)
    anomalies["reordered"] = _reordered(effects, ids, keys)
    anomalies["hanging-transaction"] = hanging
    anomalies["commit-regression"] = regressions
    findings = Findings(
        guarantee=guarantee,
        log=log_url,
        sink=sink,
        sent=len(ids),
        effects=len(effects),
        dead_lettered=len(dlq),
        anomalies=anomalies,
    )
    verdict(findings)
    return findings


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
    """The design's rules: exactly-once passes only with no anomaly at all; at-least-once fails
    on loss (duplicates are counted); at-most-once fails on duplicates (loss is counted)."""
    if f.guarantee == "exactly-once":
        failing = [a for a in ANOMALIES if f.count(a)]
    elif f.guarantee == "at-least-once":
        failing = [a for a in ("lost", "unseen", "commit-regression") if f.count(a)]
    else:
        failing = [a for a in ("duplicate", "unseen", "commit-regression") if f.count(a)]
    f.reasons = [f"{a}={f.count(a)}" for a in failing]
    f.verdict = "fail" if failing else "pass"


def parse_history(lines: Iterable[str]) -> set[str]:
    """Transactions the processors said they aborted."""
    out: set[str] = set()
    for line in lines:
        if line.strip():
            event = json.loads(line)
            if event.get("outcome") == "aborted":
                out.add(event["txn"])
    return out
