"""How much an oversized output costs exactly-once side by side: N records, an async handler
that waits 20 ms and sends one output, every EVERY-th of them 2 MB (over the embedded engine's
limit of 1,000,000 bytes), concurrency 200, retries 1. Prints the records committed per
second (read back: outputs read_committed, dead letters, the group's committed offsets).

    python measure.py EVERY [N]     (EVERY 0: no oversized output)
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from assured import App, Message, Output
from assured.log import TopicPartition, open_log

every = int(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
logging.basicConfig(level=logging.ERROR)
url = f"embedded://{tempfile.mkdtemp()}/log.db"
log = open_log(url)
with log.admin() as admin:
    for topic in ("in", "out"):
        admin.create_topic(topic, 4)
    admin.create_topic("in.dlq", 1)
with log.producer() as producer:
    for i in range(n):
        producer.send("in", b"%d" % i, key=b"k%04d" % (i % 1000))
    producer.flush()

app = App(log=log, group="g", guarantee="exactly-once")


@app.handler("in", output="out", concurrency=200, retries=1, backoff_ms=10)
async def handle(msg: Message, out: Output) -> None:
    await asyncio.sleep(0.02)
    big = every and int(msg.value or b"0") % every == 0
    out.send(b"x" * 2_000_000 if big else msg.value, key=msg.key)


began = time.perf_counter()
stats = app.run(until_idle=1.0)
seconds = time.perf_counter() - began - 1.0  # less the idle second that ends the run


def count(topic: str, partitions: int) -> int:
    with log.consumer() as consumer:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        seen = 0
        while batch := consumer.poll(10_000, timeout=0.5):
            seen += len(batch)
        return seen


with log.admin() as admin:
    committed = sum(admin.committed_offsets("g", ["in"]).values())
outputs, letters = count("out", 4), count("in.dlq", 1)
print(json.dumps({
    "every": every, "records": n, "committed": committed, "outputs": outputs,
    "dead_letters": letters, "seconds": round(seconds, 2),
    "committed_per_s": round(committed / seconds),
}))
