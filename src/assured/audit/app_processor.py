"""A processor of ``assured audit --app``: the user's App, as it is, in a process the audit
kills. Only where it runs changes (see :mod:`assured.audit.apps`): the audit's log, a copy of a
SQLite sink's file, a transactional id per slot, the timeouts the faults need; and, with
``--handle-delay-ms``, a pause before each handler call so a short run lasts long enough for
the planned faults to land mid-stream (the handler itself is called as it is).

python -m assured.audit.app_processor --app module:attribute --folder DIR --log URL --slot N
    --history FILE [--sink-path COPY] [timeouts]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import os
import time
import uuid
from pathlib import Path
from typing import Any

from assured.audit.apps import load_app
from assured.audit.processor import _History, _ProducersWith, as_a_processor
from assured.log import open_log
from assured.runtime._handling import HandlerSpec
from assured.sinks import SqliteSink

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m assured.audit.app_processor")
    parser.add_argument("--app", required=True)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--sink-path", default="", help="the copy of the App's SQLite sink")
    parser.add_argument("--session-timeout-ms", type=int, default=2000)
    parser.add_argument("--transaction-timeout-ms", type=int, default=10_000)
    parser.add_argument("--max-poll-interval-ms", type=int, default=300_000)
    parser.add_argument("--delivery-timeout-ms", type=int, default=0, help="0: the log's default")
    parser.add_argument("--handle-delay-ms", type=float, default=0.0)
    return parser.parse_args(argv)


def _paused(spec: HandlerSpec, delay: float) -> HandlerSpec:
    """``spec`` whose handler is called after ``delay`` seconds (awaited, for an async one)."""
    fn = spec.fn
    if spec.is_async:

        @functools.wraps(fn)
        async def later_async(*args: Any) -> Any:
            await asyncio.sleep(delay)
            return await fn(*args)

        return dataclasses.replace(spec, fn=later_async)

    @functools.wraps(fn)
    def later(*args: Any) -> Any:
        time.sleep(delay)
        return fn(*args)

    return dataclasses.replace(spec, fn=later)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    as_a_processor(args.slot)
    os.chdir(args.folder)
    app = load_app(args.app, args.folder)
    log = open_log(args.log)
    if args.delivery_timeout_ms:
        log = _ProducersWith(log, {"delivery.timeout.ms": args.delivery_timeout_ms})
    app.configure(
        log=log,
        transactional_id=f"{app.settings.group}-audit-slot{args.slot}",
        session_timeout_ms=args.session_timeout_ms,
        heartbeat_interval_ms=max(100, args.session_timeout_ms // 6),
        transaction_timeout_ms=args.transaction_timeout_ms,
        max_poll_interval_ms=args.max_poll_interval_ms,
        metrics_port=None,
    )
    for spec in app._specs.values():
        if args.sink_path and isinstance(spec.sink, SqliteSink):
            spec.sink.close()  # opened at import, say: its connection is to the App's own file
            spec.sink.path = Path(args.sink_path)
    if args.handle_delay_ms:
        app._specs = {
            topic: _paused(spec, args.handle_delay_ms / 1000) for topic, spec in app._specs.items()
        }
    history = _History(args.history, uuid.uuid4().hex[:10], args.slot)
    app.on_transaction = lambda label, outcome: history.write(txn=label, outcome=outcome)
    app.run()


if __name__ == "__main__":
    main()
