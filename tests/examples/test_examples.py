"""The examples, audited as the README tells users to audit their own Apps: with
``assured audit --app``, under SIGKILLs and crash points at each guarantee's weakest point.
Each correct App passes; each variant with a classic mistake fails with duplicates, so the
audit is seen to catch the user's mistakes, not only assured's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from examples.notifications.api import NotificationsApi

ROOT = Path(__file__).resolve().parents[2]
ASSURED = str(Path(sys.executable).parent / "assured")
FAULTS = ["--faults", "sigkill,crash-points", "--kills", "6", "--seed", "3"]


def audit(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """``assured audit --json ...`` from the project's folder: its exit code and its row."""
    done = subprocess.run(
        [ASSURED, "audit", "--json", *FAULTS, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    (row,) = json.loads(done.stdout)
    return done.returncode, row


def faults_landed(row: dict[str, Any]) -> None:
    assert row["faults"]["sigkill"] + row["faults"]["crash-points"] >= 4, row["faults"]


def test_receipts_are_exactly_once_topic_to_topic() -> None:
    code, row = audit(
        "--app", "examples.receipts.app:app", "--input", "orders=examples.receipts.data:orders",
        "--effects-topic", "receipts", "--id-field", "order_id",
    )  # fmt: skip
    assert (code, row["verdict"], row["guarantee"]) == (0, "pass", "exactly-once"), row
    assert (row["sent"], row["effects"], row["lost"], row["duplicated"]) == (300, 300, 0, 0)
    faults_landed(row)


@pytest.fixture
def payments_dsn(postgres_dsn: str) -> Iterator[str]:
    """A database of its own for one audit of the payments App."""
    name = f"payments_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as pg:
        pg.execute(f"CREATE DATABASE {name}")
    dsn = postgres_dsn.rsplit("/", 1)[0] + f"/{name}"
    yield dsn
    with psycopg.connect(postgres_dsn, autocommit=True) as pg:
        pg.execute(f"DROP DATABASE {name} WITH (FORCE)")


PAYMENTS = ["--input", "charges=examples.payments.data:charges", "--id-field", "id",
            "--effects-sql", "SELECT charge_id FROM charges", "--use-postgres"]  # fmt: skip


def test_payments_debit_each_charge_exactly_once_in_postgres(payments_dsn: str) -> None:
    code, row = audit("--app", "examples.payments.app:app", *PAYMENTS,
                      env={"PAYMENTS_DSN": payments_dsn})  # fmt: skip
    assert (code, row["verdict"], row["sink"]) == (0, "pass", "postgres"), row
    assert (row["effects"], row["lost"], row["duplicated"]) == (300, 0, 0)
    faults_landed(row)
    with psycopg.connect(payments_dsn) as pg:
        rows = pg.execute("SELECT status, count(*) FROM charges GROUP BY 1").fetchall()
        statuses: dict[str, int] = dict(rows)
        # every account's balance is its opening balance less its charges, each once
        wrong = pg.execute(
            "SELECT a.account_id FROM accounts a LEFT JOIN charges c ON c.account_id = "
            "a.account_id AND c.status = 'charged' GROUP BY a.account_id, a.balance_cents "
            "HAVING a.balance_cents + coalesce(sum(c.cents), 0) <> 50000"
        ).fetchall()
    assert statuses.get("refused", 0) > 0, statuses  # some accounts ran dry
    assert statuses["charged"] + statuses["refused"] == 300
    assert wrong == []


def test_payments_recorded_through_the_handlers_own_connection_fail_with_duplicates(
    payments_dsn: str,
) -> None:
    code, row = audit("--app", "examples.payments.careless:app", *PAYMENTS,
                      env={"PAYMENTS_DSN": payments_dsn})  # fmt: skip
    assert (code, row["verdict"]) == (1, "fail"), row
    assert row["duplicated"] > 0
    assert row["lost"] == 0


@pytest.fixture
def notifications_api(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The stand-in notifications API, on a free port: its URL and the file of what it sent."""
    db = tmp_path / "sent.db"
    server = NotificationsApi(db)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url, db
    server.shutdown()
    server.server_close()


NOTIFICATIONS = ["--input", "signups=examples.notifications.data:signups", "--id-field", "id",
                 "--effects-sql", "SELECT notification_id FROM sent",
                 "--expect", "exactly-once"]  # fmt: skip


def test_notifications_with_an_idempotency_key_reach_the_api_exactly_once(
    notifications_api: tuple[str, Path],
) -> None:
    """At-least-once delivery repeats calls after a crash; the key makes the API send once."""
    url, db = notifications_api
    code, row = audit("--app", "examples.notifications.app:app", *NOTIFICATIONS,
                      "--effects-db", str(db), env={"NOTIFY_API": url})  # fmt: skip
    assert (code, row["verdict"], row["guarantee"]) == (0, "pass", "exactly-once"), row
    assert (row["effects"], row["lost"], row["duplicated"]) == (300, 0, 0)
    faults_landed(row)


def test_notifications_without_the_key_are_sent_twice(
    notifications_api: tuple[str, Path],
) -> None:
    url, db = notifications_api
    code, row = audit("--app", "examples.notifications.app:app_without_key", *NOTIFICATIONS,
                      "--effects-db", str(db), env={"NOTIFY_API": url})  # fmt: skip
    assert (code, row["verdict"]) == (1, "fail"), row
    assert row["duplicated"] > 0
    assert row["lost"] == 0
