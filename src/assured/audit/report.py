"""The audit's report: a terminal table, JSON, a PNG chart, and the full history as JSONL."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from assured.audit.checker import ANOMALIES, Findings

__all__ = ["plain_lines", "table", "write_report"]

_OTHER = [a for a in ANOMALIES if a not in ("lost", "duplicate")]
_VERDICTS = {"pass": "[green]PASS[/green]", "inconclusive": "[yellow]INCONCLUSIVE[/yellow]"}


def table(results: Sequence[Findings], title: str = "assured audit") -> Table:
    t = Table(title=title)
    for column in ("guarantee", "sent", "effects", "lost", "duplicated", "other anomalies",
                   "faults injected", "verdict"):  # fmt: skip
        t.add_column(
            column,
            justify="right" if column in ("sent", "effects", "lost", "duplicated") else "left",
        )
    for f in results:
        other = ", ".join(f"{a}={f.count(a)}" for a in _OTHER if f.count(a)) or "none"
        faults = ", ".join(f"{k}={v}" for k, v in f.faults.items() if v) or "none"
        verdict = _VERDICTS.get(f.verdict, "[red]FAIL[/red]")
        if f.reasons:
            verdict += f" ({', '.join(f.reasons)})"
        t.add_row(f.guarantee, str(f.sent), str(f.effects), str(f.lost), str(f.duplicated),
                  other, faults, verdict)  # fmt: skip
    return t


def plain_lines(f: Findings, noun: str = "messages", verb: str = "handled") -> list[str]:
    """Two plain sentences about one row, from its numbers."""
    lost = f"{f.lost} {noun} lost" if f.lost else f"no {noun} lost"
    dup = f"{f.duplicated} {verb} twice" if f.duplicated else f"none {verb} twice"
    expect = {
        "at-most-once": "commits before handling: a crash loses what was in hand, repeats nothing.",
        "at-least-once": "commits after handling: a crash repeats what was in hand, loses nothing.",
        "exactly-once": "commits effects and positions at once: a crash loses and repeats nothing.",
    }[f.guarantee]
    return [f"{f.guarantee}: {lost}, {dup}.", f"  {expect}"]


def write_report(
    results: Sequence[Findings], events: Sequence[dict[str, Any]], folder: Path
) -> list[Path]:
    """``folder``/audit.json, audit.png (a chart) and history.jsonl; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    as_json = folder / "audit.json"
    as_json.write_text(json.dumps([f.as_json() for f in results], indent=2) + "\n")
    history = folder / "history.jsonl"
    with history.open("w") as out:
        for event in events:
            out.write(json.dumps(event) + "\n")
        for f in results:
            out.write(json.dumps({"event": "findings", **f.as_json()}) + "\n")
    chart = folder / "audit.png"
    _chart(results, chart)
    return [as_json, chart, history]


def _chart(results: Sequence[Findings], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f.guarantee for f in results]
    lost = [f.lost for f in results]
    dup = [f.duplicated for f in results]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], lost, width=0.4, label="lost", color="#d62728")
    ax.bar([x + 0.2 for x in xs], dup, width=0.4, label="duplicated", color="#ff7f0e")
    for x, (lo, du) in enumerate(zip(lost, dup, strict=True)):
        ax.annotate(str(lo), (x - 0.2, lo), ha="center", va="bottom", fontsize=9)
        ax.annotate(str(du), (x + 0.2, du), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(
        list(xs), [f"{n}\n{f.verdict.upper()}" for n, f in zip(names, results, strict=True)]
    )
    ax.set_ylabel("messages")
    sent = results[0].sent if results else 0
    ax.set_title(f"assured audit: {sent} messages each, processes crashed on purpose")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
