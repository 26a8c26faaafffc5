"""``python -m examples.payments``: the payments App, and its careless variant, audited under
crashes on PostgreSQL (``PAYMENTS_DSN``, else a throwaway server started here). The first
passes; the second, which records charges through its own connection, fails with duplicates."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg

from examples._run import audit

ARGS = ["--input", "charges=examples.payments.data:charges", "--id-field", "id",
        "--effects-sql", "SELECT charge_id FROM charges", "--use-postgres"]  # fmt: skip


def fresh_database(server_dsn: str) -> str:
    """A new database on the server (the audit wants no earlier effects)."""
    name = f"payments_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as pg:
        pg.execute(f"CREATE DATABASE {name}")
    return server_dsn.rsplit("/", 1)[0] + f"/{name}"


def main(server_dsn: str) -> int:
    passed = audit("--app", "examples.payments.app:app", *ARGS,
                   env={"PAYMENTS_DSN": fresh_database(server_dsn)})  # fmt: skip
    print("\nThe same App, recording each charge through a connection of its own:", flush=True)
    careless = audit("--app", "examples.payments.careless:app", *ARGS,
                     env={"PAYMENTS_DSN": fresh_database(server_dsn)})  # fmt: skip
    return 0 if (passed, careless) == (0, 1) else 1


if "PAYMENTS_DSN" in os.environ:
    raise SystemExit(main(os.environ["PAYMENTS_DSN"]))
from assured.testing.postgres import PostgresServer  # noqa: E402 -- only when none is given

folder = Path(tempfile.mkdtemp(prefix="assured-pg-"))
server = PostgresServer(workdir=folder)
server.start()
try:
    raise SystemExit(main(server.dsn))
finally:
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)
