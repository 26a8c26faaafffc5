"""One member of a consumer group, processing at least once, for the multi-process tests.

python -m tests.embedded._group_worker LOG_URL TOPIC GROUP OUT_FILE

Appends "partition offset" for every record it processed to OUT_FILE, then commits; commits
on revoke. Prints one JSON line per rebalance event to stdout.
"""

from __future__ import annotations

import json
import sys
import time

from assured.log import TopicPartition, open_log


def main() -> None:
    url, topic, group, out_path = sys.argv[1:5]
    log = open_log(url)
    consumer = log.consumer(group_id=group, session_timeout_ms=2000, heartbeat_interval_ms=300)

    def say(event: str, tps: list[TopicPartition]) -> None:
        print(json.dumps({"event": event, "partitions": [tp.partition for tp in tps]}), flush=True)

    def on_revoke(tps: list[TopicPartition]) -> None:
        consumer.commit()
        say("revoked", tps)

    consumer.subscribe(
        [topic],
        on_assign=lambda tps: say("assigned", tps),
        on_revoke=on_revoke,
        on_lost=lambda tps: say("lost", tps),
    )
    with open(out_path, "a") as out:
        while True:
            records = consumer.poll(max_records=20, timeout=0.5)
            for r in records:
                time.sleep(0.002)  # work takes time, so a crash lands mid-stream
                out.write(f"{r.partition} {r.offset}\n")
            out.flush()
            if records:
                consumer.commit()


if __name__ == "__main__":
    main()
