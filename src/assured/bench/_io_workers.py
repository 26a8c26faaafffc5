"""The io bench's processors, each in its own process: assured with an ``async def`` handler
side by side, and a bare asyncio loop bounded by a semaphore. Each handler call awaits
``handler_ms``, then sends one output stamped with the time the call began (the first 20
digits: ns since the epoch, as the latency reader expects).

python -m assured.bench._io_workers io-assured|io-bare SPEC_JSON
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from assured.bench._workers import Meter

__all__ = ["main"]


def _stamp() -> bytes:
    return b"%020d" % time.time_ns()


def run_io_assured(spec: dict[str, Any]) -> dict[str, Any]:
    from assured import App, Message, Output

    meter = Meter(spec["records"])
    wait = spec["handler_ms"] / 1000
    app = App(
        log=spec["log"],
        group=spec["group"],
        guarantee=spec["guarantee"],
        max_poll_records=spec["max_poll_records"],
    )

    @app.handler(spec["input"], output=spec["output"], concurrency=spec["concurrency"])
    async def call(msg: Message, out: Output) -> None:
        if not meter.seen:
            meter.tick(1)  # the clock starts at the first call
        began = _stamp()
        await asyncio.sleep(wait)
        out.send(began, key=msg.key)

    stats = app.run(max_messages=spec["records"])
    meter.seen = stats.processed
    return meter.result()


def run_io_bare(spec: dict[str, Any]) -> dict[str, Any]:
    """Poll without waiting, start a task per record while the semaphore allows (no order, no
    guarantee), send its output when its wait is over; offsets are committed as polled."""
    meter = Meter(spec["records"])
    wait = spec["handler_ms"] / 1000
    poll, send, finish = _bare_clients(spec)

    async def loop() -> None:
        gate = asyncio.Semaphore(spec["concurrency"])
        running: set[asyncio.Task[None]] = set()
        done = 0

        async def one(key: bytes | None) -> None:
            nonlocal done
            try:
                began = _stamp()
                await asyncio.sleep(wait)
                send(began, key)
                done += 1
            finally:
                gate.release()

        polled = 0
        while polled < spec["records"]:
            batch = poll(min(500, spec["records"] - polled))
            if not batch:
                await asyncio.sleep(0.001)
                continue
            for key in batch:
                await gate.acquire()
                if not meter.seen:
                    meter.tick(1)
                task = asyncio.create_task(one(key))
                running.add(task)
                task.add_done_callback(running.discard)
            polled += len(batch)
        await asyncio.gather(*running)
        meter.seen = done

    asyncio.run(loop())
    finish()
    return meter.result()


def _bare_clients(
    spec: dict[str, Any],
) -> tuple[
    Callable[[int], list[bytes | None]], Callable[[bytes, bytes | None], None], Callable[[], None]
]:
    """poll(n) -> keys of up to n records, without waiting; send(value, key); finish()."""
    if spec["bootstrap"]:
        from confluent_kafka import Consumer, Producer

        consumer = Consumer(
            {
                "bootstrap.servers": spec["bootstrap"],
                "group.id": spec["group"],
                "auto.offset.reset": "earliest",
                "enable.auto.commit": True,
            }
        )
        consumer.subscribe([spec["input"]])
        producer = Producer(
            {"bootstrap.servers": spec["bootstrap"], "linger.ms": 5, "enable.idempotence": True}
        )

        def poll(n: int) -> list[bytes | None]:
            producer.poll(0)
            return [m.key() for m in consumer.consume(n, 0) if not m.error()]

        def send(value: bytes, key: bytes | None) -> None:
            while True:
                try:
                    producer.produce(spec["output"], value, key)
                    return
                except BufferError:
                    producer.poll(0.01)

        def finish() -> None:
            producer.flush()
            consumer.close()

        return poll, send, finish

    from assured.log import TopicPartition, open_log

    log = open_log(spec["log"])
    log_consumer = log.consumer(group_id=spec["group"])
    log_consumer.subscribe([spec["input"]])
    log_producer = log.producer()

    def log_poll(n: int) -> list[bytes | None]:
        records = log_consumer.poll(n, 0)
        if records:
            last = {TopicPartition(r.topic, r.partition): r.offset + 1 for r in records}
            log_consumer.commit(last, asynchronous=True)
        return [r.key for r in records]

    def log_send(value: bytes, key: bytes | None) -> None:
        log_producer.send(spec["output"], value, key=key)

    def log_finish() -> None:
        log_producer.flush()
        log_producer.close()
        log_consumer.close()
        log.close()

    return log_poll, log_send, log_finish


_ROLES = {"io-assured": run_io_assured, "io-bare": run_io_bare}


def main(argv: list[str]) -> int:
    role, spec = argv[0], json.loads(argv[1])
    print(json.dumps(_ROLES[role](spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
