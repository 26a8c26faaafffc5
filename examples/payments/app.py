"""Payments: each charge debits its account exactly once, in PostgreSQL.

The charge's effects (the debit, the row in ``charges``) and its consumer position commit in
one database transaction, so a crash leaves both or neither: no charge made twice, none
skipped. A charge the account cannot cover is refused (its row says so, nothing is debited).

    PAYMENTS_DSN=postgresql://user@host/db assured run examples.payments.app:app
"""

from __future__ import annotations

import os
from typing import Any

from assured import App, Message, PostgresSink
from assured.sinks import SinkTransaction

DSN = os.environ.get("PAYMENTS_DSN", "postgresql://postgres@localhost:5432/payments")
OPENING_CENTS = 50_000
ACCOUNTS = 20

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS accounts "
    "(account_id text PRIMARY KEY, balance_cents bigint NOT NULL CHECK (balance_cents >= 0))",
    # Every charge made is kept, a repeat too: that is what the audit counts. (A primary key
    # on charge_id would turn a repeat into an error; the audit would catch that too.)
    "CREATE TABLE IF NOT EXISTS charges (charge_id text NOT NULL, account_id text NOT NULL, "
    "cents bigint NOT NULL, status text NOT NULL)",
    # 20 accounts (ACCOUNTS) of 500.00 (OPENING_CENTS) each
    "INSERT INTO accounts (account_id, balance_cents) SELECT 'acct-' || lpad(n::text, 2, '0'), "
    "50000 FROM generate_series(0, 19) AS n ON CONFLICT DO NOTHING",
]

sink = PostgresSink(DSN, schema=SCHEMA)
app = App(log="embedded:///tmp/assured-examples/payments.db", group="payments",
          guarantee="exactly-once")  # fmt: skip


def debit(db: SinkTransaction, charge: dict[str, Any]) -> str:
    """Debit the charge if the account covers it; ``charged`` or ``refused``."""
    row = db.execute(
        "SELECT balance_cents FROM accounts WHERE account_id = %s FOR UPDATE", (charge["account"],)
    ).fetchone()
    if row is None or row[0] < charge["cents"]:
        return "refused"
    db.execute(
        "UPDATE accounts SET balance_cents = balance_cents - %s WHERE account_id = %s",
        (charge["cents"], charge["account"]),
    )
    return "charged"


@app.handler("charges", sink=sink, key_codec="str", value_codec="json")
def charge(msg: Message[Any], db: SinkTransaction) -> None:
    status = debit(db, msg.value)
    db.execute(
        "INSERT INTO charges (charge_id, account_id, cents, status) VALUES (%s, %s, %s, %s)",
        (msg.value["id"], msg.value["account"], msg.value["cents"], status),
    )
