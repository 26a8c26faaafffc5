"""The README's payments example (its first handler), as ``assured run payments:app`` runs it.

The log named here is never used by the tests: they give ``assured run -b`` a fresh one."""

from assured import App, Message, Output

app = App(log="embedded:///var/lib/pay/log.db", group="payments", guarantee="exactly-once")


@app.handler("charges", output="receipts", value_codec="json", retries=3)
def charge(msg: Message, out: Output) -> None:
    out.send({"charge": msg.value["id"], "ok": True}, key=msg.key)  # inside the transaction
