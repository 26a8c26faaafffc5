"""The audit's processor: one App under the audited guarantee, run as its own process so the
audit can kill it. Its handler turns each input message into one effect (a record on the output
topic, or a row in the sink database), and rejects ``poison`` messages.

python -m assured.audit.processor --log URL --guarantee G --group G --input T --output T
    --sink topic|sqlite|postgres [--db PATH|DSN] --slot N --history FILE
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from assured.runtime import App, Message, Output
from assured.sinks import PostgresSink, Sink, SinkTransaction, SqliteSink

__all__ = ["EFFECTS_DDL", "main"]

EFFECTS_DDL = {
    "sqlite": "CREATE TABLE IF NOT EXISTS audit_effects (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "msg_id TEXT NOT NULL, account TEXT NOT NULL, slot INTEGER NOT NULL)",
    "postgres": "CREATE TABLE IF NOT EXISTS audit_effects (seq bigserial PRIMARY KEY, "
    "msg_id text NOT NULL, account text NOT NULL, slot integer NOT NULL)",
}


class PoisonError(ValueError):
    """The message was built to be rejected."""


def _stop_with_parent() -> None:
    """If the audit that started us dies, stop gracefully rather than run on as an orphan."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m assured.audit.processor")
    parser.add_argument("--log", required=True)
    parser.add_argument("--guarantee", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--sink", choices=("topic", "sqlite", "postgres"), default="topic")
    parser.add_argument("--db", default="")
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--session-timeout-ms", type=int, default=2000)
    parser.add_argument("--commit-interval-ms", type=int, default=100)
    parser.add_argument("--handle-delay-ms", type=float, default=0.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    # Until the App takes over SIGTERM, a stop means nothing was consumed yet: exit cleanly.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    _stop_with_parent()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s slot={args.slot} pid={os.getpid()} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    slot = args.slot
    app = App(
        log=args.log,
        group=args.group,
        guarantee=args.guarantee,
        transactional_id=f"{args.group}-slot{slot}",
        session_timeout_ms=args.session_timeout_ms,
        heartbeat_interval_ms=max(100, args.session_timeout_ms // 6),
        commit_interval_ms=args.commit_interval_ms,
        max_poll_records=100,
        transaction_timeout_ms=10_000,
    )
    history = args.history.open("a", buffering=1)

    def tell(label: str, outcome: str) -> None:
        history.write(json.dumps({"txn": label, "outcome": outcome}) + "\n")

    app.on_transaction = tell

    delay = args.handle_delay_ms / 1000

    def check(msg: Message) -> tuple[str, str]:
        if delay:
            time.sleep(delay)
        if msg.header("fate") == b"poison":
            raise PoisonError(f"{msg.id} was built to be rejected")
        body = json.loads(msg.value)
        return body["id"], body["account"]

    if args.sink == "topic":

        @app.handler(args.input, output=args.output, retries=1, backoff_ms=1)
        def to_topic(msg: Message, out: Output) -> None:
            mid, account = check(msg)
            headers = [("id", mid.encode()), ("slot", str(slot).encode())]
            if out.transaction is not None:
                headers.append(("txn", out.transaction.encode()))
            out.send(mid.encode(), key=account.encode(), headers=headers)

    else:
        sink: Sink = SqliteSink(args.db) if args.sink == "sqlite" else PostgresSink(args.db)
        mark = "?" if args.sink == "sqlite" else "%s"
        columns = "INSERT INTO audit_effects (msg_id, account, slot) VALUES"
        insert = f"{columns} ({mark}, {mark}, {mark})"  # only the placeholder style varies
        with sink, sink.transaction() as tx:
            tx.execute(EFFECTS_DDL[args.sink])

        @app.handler(args.input, sink=sink, retries=1, backoff_ms=1)
        def to_db(msg: Message, db: SinkTransaction) -> None:
            mid, account = check(msg)
            db.execute(insert, (mid, account, slot))

    plant = os.environ.get("ASSURED_AUDIT_PLANT")
    if plant:  # a deliberate bug, for tests that show the audit catches it
        from assured.audit.planted import planted

        factory = planted(plant)
        app._protocol = lambda rt, sink: factory(rt)  # type: ignore[method-assign]
    app.run()


if __name__ == "__main__":
    main()
