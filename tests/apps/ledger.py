"""An App for the tests of ``assured audit --app``: exactly-once into a SQLite sink (its file
at ``LEDGER_DB``), whose handler does what ``LEDGER_MODE`` says: ``ok`` (one row per entry),
``refuse`` (raises for every entry: each is dead-lettered) or ``crash`` (the handler's client
fails for good on the first entry, so the App stops every time it starts)."""

from __future__ import annotations

import os
from typing import Any

from assured import App, Message, SqliteSink
from assured.errors import FatalError
from assured.sinks import SinkTransaction

MODE = os.environ.get("LEDGER_MODE", "ok")
sink = SqliteSink(
    os.environ.get("LEDGER_DB", "/nonexistent/ledger.db"),
    schema="CREATE TABLE IF NOT EXISTS ledger (entry_id TEXT NOT NULL, cents INTEGER NOT NULL)",
)
app = App(log="embedded:///nonexistent/log.db", group="ledger", guarantee="exactly-once")


class BrokenClientError(FatalError):
    """The handler's own client failed for good: the App must stop."""


@app.handler("entries", sink=sink, value_codec="json", retries=0, backoff_ms=1)
def enter(msg: Message[Any], db: SinkTransaction) -> None:
    if MODE == "refuse":
        raise ValueError(f"entry {msg.value['id']} refused")
    if MODE == "crash":
        raise BrokenClientError("the ledger's client is broken")
    db.execute(
        "INSERT INTO ledger (entry_id, cents) VALUES (?, ?)", (msg.value["id"], msg.value["cents"])
    )


def entries(n: int = 60) -> list[dict[str, Any]]:
    return [{"key": f"a{i % 7}", "value": {"id": f"e-{i:04d}", "cents": 100 + i}} for i in range(n)]


def broken() -> list[dict[str, Any]]:
    raise RuntimeError("no entries today")


# An App that reads its own dead letters: a second stage, refused by the audit.
two_stages = App(log="embedded:///nonexistent/log.db", group="ledger-2", guarantee="exactly-once")
two_stages.handler("entries", sink=sink, value_codec="json")(enter)
two_stages.handler("entries.dlq", sink=sink)(lambda msg, db: None)
