"""A process that opens a transaction, writes into it, says so, and waits to be killed.

python -m tests.contract._open_txn LOG_URL TOPIC TRANSACTIONAL_ID TIMEOUT_MS
"""

from __future__ import annotations

import sys
import time

from assured.log import open_log


def main() -> None:
    url, topic, txn_id, timeout_ms = sys.argv[1:5]
    log = open_log(url)
    producer = log.producer(transactional_id=txn_id, transaction_timeout_ms=int(timeout_ms))
    producer.init_transactions()
    producer.begin_transaction()
    for i in range(5):
        producer.send(topic, f"doomed-{i}".encode(), partition=0)
    producer.flush(30)
    print("ready", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main()
