"""The FastStream side of the io bench, run as a script by the Python of a virtualenv that has
``faststream[confluent]`` (it pins its own confluent-kafka, so it never shares assured's
environment). It imports nothing from assured:

    .venv-faststream/bin/python faststream_worker.py 'JSON spec'

The same work as :mod:`assured.bench._io_workers`: each call awaits ``handler_ms``, then
publishes one output stamped with the time the call began (20 digits of ns since the epoch).
FastStream's own setting for calls side by side is ``max_workers``; it accepts only
``AckPolicy.ACK_FIRST`` with it (a record is acknowledged before its call, and offsets are
auto-committed): no at-least-once, and no order. Timed from the first call to the last output's
delivery. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

try:
    from assured.bench._outside import Clock, version
except ImportError:  # run as a script in FastStream's virtualenv: this folder is on sys.path
    from _outside import Clock, version  # type: ignore[import-not-found,no-redef]


async def _run(spec: dict[str, Any], clock: Clock) -> None:
    from faststream import AckPolicy  # type: ignore[import-not-found]
    from faststream.confluent import KafkaBroker, KafkaMessage  # type: ignore[import-not-found]

    records = spec["records"]
    wait = spec["handler_ms"] / 1000
    done = asyncio.Event()
    broker = KafkaBroker(spec["bootstrap"], log_level=30)

    @broker.subscriber(  # type: ignore[untyped-decorator]
        spec["input"],
        group_id=spec["group"],
        auto_offset_reset="earliest",
        max_workers=spec["concurrency"],
        ack_policy=AckPolicy.ACK_FIRST,
    )
    async def call(body: bytes, msg: KafkaMessage) -> None:
        began = b"%020d" % time.time_ns()
        clock.start()  # at the first call, as the other io workers
        await asyncio.sleep(wait)
        await broker.publish(began, spec["output"], key=msg.raw_message.key())
        clock.tick()
        if clock.seen >= records:
            done.set()

    async with broker:
        await broker.start()
        await done.wait()


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    clock = Clock()
    asyncio.run(_run(spec, clock))
    print(json.dumps(clock.result(faststream_version=version("faststream"))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
