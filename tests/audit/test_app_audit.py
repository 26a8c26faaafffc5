"""``assured audit --app``: what it refuses, each in one line and before any run, and that it
reads the input it is given (a JSONL file, a generator) as the App's codecs expect."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from assured.audit.apps import ID_HEADER, AppTarget, _copy_sqlite, read_inputs
from assured.cli import app as cli
from assured.errors import ConfigError
from assured.log import open_log

RECEIPTS = ["--app", "examples.receipts.app:app", "--effects-topic", "receipts",
            "--id-field", "order_id"]  # fmt: skip


def orders(tmp_path: Path, lines: list[str]) -> str:
    """``orders=FILE``: a file of its own for each call, holding ``lines``."""
    path = tmp_path / f"orders{len(list(tmp_path.glob('orders*.jsonl')))}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return f"orders={path}"


def refused(args: list[str]) -> str:
    result = CliRunner().invoke(cli, ["audit", *args])
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr  # one line
    return result.stderr


def test_bad_input_is_refused_in_one_line_naming_where(tmp_path: Path) -> None:
    ok = '{"key": "c-1", "value": {"order_id": "o-1", "lines": []}}'
    cases = [
        ([*RECEIPTS, "--input", orders(tmp_path, [ok, "{not"])], "orders0.jsonl:2 is not JSON"),
        (
            [*RECEIPTS, "--input", orders(tmp_path, [ok, '{"value": {"lines": []}}'])],
            "orders1.jsonl:2: its value has no field 'order_id'",
        ),
        ([*RECEIPTS, "--input", orders(tmp_path, [ok, ok])], "id 'o-1' was already given"),
        ([*RECEIPTS, "--input", orders(tmp_path, ['["c-1", 5]'])], "expected an object"),
        ([*RECEIPTS, "--input", "orders=no/such/file.jsonl"], "cannot read"),
        ([*RECEIPTS, "--input", "orders"], "topic=FILE.jsonl or topic=module:function"),
        ([*RECEIPTS, "--input", orders(tmp_path, [ok]).replace("orders=", "refunds=")],
         "the App has no handler for 'refunds'"),
        (["--app", "examples.nowhere:app", "--input", "x=y.jsonl", "--effects-sql", "SELECT 1"],
         "no module named 'examples.nowhere'"),
        (["--app", "examples.receipts.data:orders", "--input", orders(tmp_path, [ok]),
          "--effects-topic", "receipts", "--id-field", "order_id"], "is not an assured App"),
        (["--app", "examples.receipts.app:app", "--input", orders(tmp_path, [ok]),
          "--effects-topic", "receipts"], "give --id-field PATH"),
        ([*RECEIPTS, "--input", orders(tmp_path, [ok]), "--effects-sql", "SELECT 1"],
         "one way to count effects"),
        ([*RECEIPTS, "--input", orders(tmp_path, [ok]), "--faults", "sigkill,handler-errors"],
         "handler-errors needs the audit's own handler"),
        ([*RECEIPTS, "--input", orders(tmp_path, [ok]), "--guarantee", "at-least-once"],
         "--expect names another one"),
        (["--input", orders(tmp_path, [ok])], "are for --app"),
        (["--app", "examples.receipts.app:app", "--input", orders(tmp_path, [ok]),
          "--effects-topic", "orders.dlq", "--id-field", "order_id"], "the App writes 'receipts'"),
        ([*RECEIPTS, "--input", "orders=tests.apps.ledger:broken"],
         "the function failed: RuntimeError: no entries today"),
    ]  # fmt: skip
    for args, says in cases:
        assert says in refused(args), args


def test_an_app_writing_to_postgres_is_audited_only_when_told_the_database_is_for_tests() -> None:
    args = ["--app", "examples.payments.app:app",
            "--input", "charges=examples.payments.data:charges",
            "--id-field", "id", "--effects-sql", "SELECT charge_id FROM charges"]  # fmt: skip
    assert "pass --use-postgres" in refused(args)


def test_a_topic_holding_records_already_is_refused(tmp_path: Path) -> None:
    """The audit counts every record of its input topic as its own: one left from an earlier
    run would be taken for this one's, so a log that has some is refused."""
    url = f"embedded://{tmp_path}/log.db"
    log = open_log(url)
    with log.admin() as admin:
        admin.create_topic("orders", 1)
    with log.producer() as producer:
        producer.send("orders", b"{}")
        producer.flush()
    log.close()
    line = '{"value": {"order_id": "o-1", "lines": []}}'
    args = [*RECEIPTS, "--input", orders(tmp_path, [line]), "--log", url]
    assert "topic 'orders' holds records already" in refused(args)


def test_inputs_are_sent_as_the_apps_codecs_read_them(tmp_path: Path) -> None:
    """A string goes out as UTF-8, any other JSON value as its JSON text, null as no value; the
    id is the position, or the --id-field; it travels in a header of its own."""
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"key": "k", "value": "plain text", "headers": {"h": "v", "n": 5}}\n'
        "\n"
        '{"value": {"id": 7, "x": [1, 2]}}\n'
        '{"key": null, "value": null}\n'
    )
    got = read_inputs([("t", str(path))], tmp_path, None)
    assert [(r.id, r.key, r.value) for r in got] == [
        ("0", b"k", b"plain text"),
        ("1", None, b'{"id":7,"x":[1,2]}'),
        ("2", None, None),
    ]
    assert got[0].headers == (("h", b"v"), ("n", b"5"), (ID_HEADER, b"0"))
    assert got[0].where == f"{path}:1"
    generated = read_inputs([("t", "examples.receipts.data:orders")], Path.cwd(), "order_id")
    assert len(generated) == 300
    assert generated[0].id == "o-00000"
    assert json.loads(generated[0].value or b"")["order_id"] == "o-00000"
    with pytest.raises(ConfigError, match=r"in.jsonl:1: its value is not JSON"):
        read_inputs([("t", str(path))], tmp_path, "id")  # "plain text" is no JSON object


def test_a_target_needs_inputs_and_one_way_to_count_effects() -> None:
    with pytest.raises(ConfigError, match="needs input"):
        AppTarget(app="m:app", inputs=[], effects_sql="SELECT 1").check()
    with pytest.raises(ConfigError, match="--expect 'twice'"):
        AppTarget(app="m:app", inputs=[("t", "f")], effects_sql="SELECT 1", expect="twice").check()


LEDGER = ["--app", "ledger:app", "--id-field", "id",
          "--effects-sql", "SELECT entry_id FROM ledger"]  # fmt: skip


def audit_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, *args: str) -> Any:
    """``assured audit --json`` of tests/apps/ledger.py in ``mode``; (exit code, rows)."""
    monkeypatch.chdir(Path(__file__).parents[1] / "apps")
    monkeypatch.setenv("LEDGER_MODE", mode)
    monkeypatch.setenv("LEDGER_DB", str(tmp_path / "ledger.db"))
    sys.modules.pop("ledger", None)  # imported again in this mode
    given = args if "--input" in args else (*args, "--input", "entries=ledger:entries")
    result = CliRunner().invoke(cli, ["audit", "--json", *LEDGER, *given])
    rows = json.loads(result.stdout) if result.exit_code in (0, 1, 3) and result.stdout else None
    return result.exit_code, rows, result.stderr


def test_an_apps_sqlite_file_is_copied_without_the_runtimes_state_of_an_earlier_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The App's file holds positions and dead letters of an earlier run of the same group (on
    another log): they would make the audit think the input consumed and its dead letters
    given. The copy keeps the App's tables and drops the runtime's; the file is untouched."""
    db = tmp_path / "ledger.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE ledger (entry_id TEXT NOT NULL, cents INTEGER NOT NULL)")
        conn.execute("CREATE TABLE assured_offsets (group_id TEXT, topic TEXT, partition "
                     "INTEGER, next_offset BIGINT, epoch BIGINT, incarnation TEXT)")  # fmt: skip
        conn.executemany("INSERT INTO assured_offsets VALUES ('ledger', 'entries', ?, 999, 1, "
                         "NULL)", [(p,) for p in range(4)])  # fmt: skip
        conn.commit()
    before = db.read_bytes()
    code, rows, stderr = audit_ledger(tmp_path, monkeypatch, "ok", "--kills", "4")
    assert code == 0, stderr
    assert (rows[0]["verdict"], rows[0]["effects"], rows[0]["lost"]) == ("pass", 60, 0)
    assert db.read_bytes() == before


def test_an_app_that_dead_letters_its_work_has_lost_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, rows, stderr = audit_ledger(tmp_path, monkeypatch, "refuse", "--kills", "2")
    assert code == 1, stderr
    assert rows[0]["verdict"] == "fail"
    assert (rows[0]["lost"], rows[0]["dead_lettered"]) == (60, 60)


def test_an_audit_where_no_fault_landed_is_inconclusive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three entries are handled before the first planned fault's turn: nothing was shown."""
    path = tmp_path / "three.jsonl"
    path.write_text("".join(f'{{"value": {{"id": "e{i}", "cents": 1}}}}\n' for i in range(3)))
    code, rows, stderr = audit_ledger(
        tmp_path, monkeypatch, "ok", "--kills", "10", "--faults", "sigkill", "--input",
        f"entries={path}",
    )  # fmt: skip
    assert code == 3, stderr  # not a failure, not a pass
    assert rows[0]["verdict"] == "inconclusive"
    assert "no planned fault landed" in rows[0]["reasons"][-1]


def test_an_app_that_stops_as_it_starts_ends_the_audit_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, stderr = audit_ledger(tmp_path, monkeypatch, "crash", "--kills", "0")
    assert code == 1
    assert "3 times in a row" in stderr
    assert "the ledger's client is broken" in stderr


def test_the_copy_drops_the_runtimes_tables_by_name_and_keeps_the_apps(tmp_path: Path) -> None:
    source, copy = tmp_path / "app.db", tmp_path / "copy.db"
    with contextlib.closing(sqlite3.connect(source)) as conn:
        for table in ("assured_offsets", "assured_dead_letters", "assured_notes", "Assured_Log"):
            conn.execute(f"CREATE TABLE {table} (x TEXT)")
        conn.commit()
    _copy_sqlite(source, copy)
    with contextlib.closing(sqlite3.connect(copy)) as conn:
        kept = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master"))
    assert kept == ["Assured_Log", "assured_notes"]


def test_an_app_that_reads_its_own_dead_letters_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its second stage would still be at work when the audit, which counts only what it sent,
    judges the run."""
    code, _, stderr = audit_ledger(tmp_path, monkeypatch, "ok", "--app", "ledger:two_stages")
    assert code == 2
    assert "reads 'entries.dlq', which it also writes" in stderr
