"""Receipts: every order becomes one receipt, exactly once, topic to topic.

Each order's receipt is written in the same Kafka transaction as the order's consumer offset,
so a crash anywhere leaves either both or neither: no order without its receipt, none twice.
"""

from __future__ import annotations

from typing import Any

from assured import App, Message, Output

app = App(
    log="embedded:///tmp/assured-examples/receipts.db", group="receipts", guarantee="exactly-once"
)


@app.handler("orders", output="receipts", key_codec="str", value_codec="json")
def receipt(msg: Message[Any], out: Output) -> None:
    order = msg.value
    total = sum(line["cents"] * line["quantity"] for line in order["lines"])
    out.send(
        {"order_id": order["order_id"], "customer": msg.key, "total_cents": total},
        key=msg.key,
    )
