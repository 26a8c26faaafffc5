"""What one message to PostgreSQL costs, beside what one record's statements cost.

K records per transaction, each an INSERT, with or without a savepoint before it; sent one
message per record (``ins1``, ``sp1``: the hot path of records side by side today) or all K
in one message (``ins``, ``sp``). Prints the server backend's CPU and this client's CPU per
record, from psutil. Usage: python message_cost.py DSN K MODE [RECORDS]
"""

from __future__ import annotations

import sys
import time

import psutil
import psycopg


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main(dsn: str, per_txn: int, mode: str, records: int) -> None:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("CREATE TABLE IF NOT EXISTS message_cost (k bytea, began float8)")
    server, client = psutil.Process(conn.info.backend_pid), psutil.Process()
    server0, client0, t0 = cpu(server), cpu(client), time.perf_counter()
    done = 0
    while done < records:
        statements = []
        for j in range(per_txn):
            savepoint = f"SAVEPOINT s{j % 4096}; " if mode.startswith("sp") else ""
            insert = f"INSERT INTO message_cost VALUES ('\\x6b{done:06d}'::bytea, {time.time()})"
            statements.append(savepoint + insert)
            done += 1
        if mode.endswith("1"):  # one message per record
            conn.execute("BEGIN")
            for statement in statements:
                conn.execute(statement)
            conn.execute("COMMIT")
        else:  # the transaction's records in one message
            conn.execute("BEGIN; " + "; ".join(statements) + "; COMMIT")
    server1, client1, t1 = cpu(server), cpu(client), time.perf_counter()
    print(
        f"K={per_txn} {mode}: server {1e6 * (server1 - server0) / done:.1f} us/record, "
        f"client {1e6 * (client1 - client0) / done:.1f} us/record, {done / (t1 - t0):.0f} records/s"
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 20000)
