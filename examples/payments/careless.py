"""The payments App with a mistake the audit must catch: the handler records each charge
through a connection of its own, outside the sink's transaction. That row commits at once;
when a crash comes before the transaction commits, the charge is handled again and recorded
twice. ``assured audit --app examples.payments.careless:app`` fails with duplicates."""

from __future__ import annotations

from typing import Any

import psycopg

from assured import App, Message, PostgresSink
from assured.sinks import SinkTransaction
from examples.payments.app import DSN, SCHEMA, debit

sink = PostgresSink(DSN, schema=SCHEMA)
app = App(log="embedded:///tmp/assured-examples/payments.db", group="payments-careless",
          guarantee="exactly-once")  # fmt: skip
_own: list[psycopg.Connection[Any]] = []  # the handler's own connection, made on first use


@app.handler("charges", sink=sink, key_codec="str", value_codec="json")
def charge(msg: Message[Any], db: SinkTransaction) -> None:
    status = debit(db, msg.value)
    if not _own:
        _own.append(psycopg.connect(DSN, autocommit=True))
    _own[0].execute(  # the mistake: not db.execute
        "INSERT INTO charges (charge_id, account_id, cents, status) VALUES (%s, %s, %s, %s)",
        (msg.value["id"], msg.value["account"], msg.value["cents"], status),
    )
