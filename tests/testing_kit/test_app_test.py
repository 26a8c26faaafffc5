"""The in-process test kit (issue 17): a user's App, untouched, on an embedded log of its own."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from assured import App, Message, Output, SqliteSink
from assured.errors import UsageError
from assured.runtime import Guarantee
from assured.testing import AppTest

pytest_plugins = ["pytester"]


class Charge(BaseModel):
    id: int
    cents: int


def payments(guarantee: Guarantee = "exactly-once") -> App:
    app = App(log="kafka://payments-broker:9092", group="payments", guarantee=guarantee)

    @app.handler("charges", output="receipts", value_codec=Charge, key_codec="str", retries=1,
                 backoff_ms=1)  # fmt: skip
    def charge(msg: Message[Charge], out: Output) -> None:
        if msg.value.cents <= 0:
            raise ValueError(f"charge {msg.value.id}: {msg.value.cents} cents")
        out.send({"charge": msg.value.id, "ok": True}, key=msg.key)

    return app


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_send_run_and_read_with_the_apps_own_codecs(guarantee: Guarantee) -> None:
    app = payments(guarantee)
    with AppTest(app) as t:
        t.send("charges", {"id": 7, "cents": 250}, key="acct-1")  # through the Charge model
        t.send("charges", Charge(id=8, cents=100), key="acct-2")
        t.send("charges", {"id": 9, "cents": 0}, key="acct-1")  # refused by the handler
        t.send("charges", b"not json")  # refused by the codec
        stats = t.run_until_idle()
        assert stats.processed == 4
        assert t.outputs("receipts") == [{"charge": 7, "ok": True}, {"charge": 8, "ok": True}]
        assert [r.key for r in t.records("receipts")] == ["acct-1", "acct-2"]
        assert t.committed("charges") == {0: 4}
        letters = t.dead_letters("charges")
        assert [r.value for r in letters] == [b'{"id":9,"cents":0}', b"not json"]
        assert b"0 cents" in (letters[0].headers["assured.error.message"] or b"")
        assert letters[1].headers["assured.error.type"] == b"DecodeError"
        folder = t.folder
    assert not folder.exists()
    assert app.settings.log == "kafka://payments-broker:9092"  # the App's own log is back


def test_async_handlers_and_partitions() -> None:
    app = App(group="g", guarantee="at-least-once")

    @app.handler("in", output="out", value_codec="json", concurrency=8)
    async def double(msg: Message, out: Output) -> None:
        await asyncio.sleep(0.001)
        out.send({"n": msg.value["n"] * 2}, key=msg.key)

    with AppTest(app, partitions=3) as t:
        for n in range(30):
            t.send("in", {"n": n}, key=f"k{n % 5}")
        t.run_until_idle()
        assert sorted(v["n"] for v in t.outputs("out")) == [2 * n for n in range(30)]
        assert sum(t.committed("in").values()) == 30


def test_effects_in_the_sinks_database(tmp_path: Path) -> None:
    sink = SqliteSink(str(tmp_path / "ledger.db"))
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE ledger (account TEXT, cents INTEGER)")
    app = App(group="ledger", guarantee="exactly-once")

    @app.handler("charges", sink=sink, value_codec="json", key_codec="str")
    def book(msg: Message, db: Any) -> None:
        db.execute("INSERT INTO ledger VALUES (?, ?)", (msg.key, msg.value["cents"]))

    with AppTest(app) as t:
        t.send("charges", {"cents": 250}, key="acct-1")
        t.send("charges", {"cents": 100}, key="acct-1")
        t.run_until_idle()
        t.run_until_idle()  # a second run finds nothing new: exactly once
        assert t.query("SELECT account, SUM(cents) FROM ledger GROUP BY account") == [
            ("acct-1", 350)
        ]


def test_mistakes_are_said() -> None:
    with pytest.raises(UsageError, match="no handlers"):
        AppTest(App(group="g"))
    app = payments()
    with AppTest(app) as t:
        with pytest.raises(UsageError, match="no handler reads 'receipts'"):
            t.committed("receipts")
        with pytest.raises(UsageError, match="one sink"):
            t.query("SELECT 1")


def test_the_fixture_the_way_the_readme_says(pytester: pytest.Pytester) -> None:
    """A user's project: an App in its own module, the App named in the pytest configuration,
    and a test that takes the ``assured_app`` fixture (the plugin comes with assured)."""
    pytester.makepyfile(
        shop="""
        from assured import App, Message, Output

        app = App(log="kafka://shop:9092", group="shop", guarantee="exactly-once")

        @app.handler("orders", output="invoices", value_codec="json")
        def invoice(msg: Message, out: Output) -> None:
            out.send({"order": msg.value["id"], "total": msg.value["qty"] * 3})
        """,
        test_shop="""
        def test_an_order_is_invoiced_once(assured_app):
            assured_app.send("orders", {"id": 1, "qty": 2})
            assured_app.run_until_idle()
            assert assured_app.outputs("invoices") == [{"order": 1, "total": 6}]
            assert assured_app.committed("orders") == {0: 1}

        def test_the_factory(assured_test):
            from shop import app

            t = assured_test(app, partitions=2)
            t.send("orders", {"id": 2, "qty": 1}, partition=1)
            t.run_until_idle()
            assert t.outputs("invoices") == [{"order": 2, "total": 3}]
        """,
    )
    pytester.makeini("[pytest]\nassured_app = shop:app\n")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_the_fixture_without_an_app_named_says_what_to_set(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(assured_app):\n    pass\n")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)  # at setup: the fixture could not be made
    result.stdout.fnmatch_lines(['*assured_app = "module:attribute"*'])


def test_the_apps_own_database_is_never_touched(tmp_path: Path) -> None:
    """A SQLite sink writes to a copy of its file for the test: the App's database keeps its
    rows and its stored positions (a test run had overwritten them, and the next production
    run stopped: the database held no position where the log had one)."""
    path = tmp_path / "ledger.db"
    sink = SqliteSink(str(path))
    with sink, sink.transaction() as tx:
        tx.execute("CREATE TABLE ledger (cents INTEGER)")
        tx.execute("INSERT INTO ledger VALUES (1)")
    app = App(group="ledger", guarantee="exactly-once")

    @app.handler("charges", sink=sink, value_codec="json")
    def book(msg: Message, db: Any) -> None:
        db.execute("INSERT INTO ledger VALUES (?)", (msg.value["cents"],))

    before = path.read_bytes()
    metrics = app.metrics
    for _ in range(2):  # twice in a row, each from the App's own state
        with AppTest(app) as t:
            t.send("charges", {"cents": 250})
            t.run_until_idle()
            assert t.query("SELECT cents FROM ledger ORDER BY cents") == [(1,), (250,)]
            assert t.committed("charges") == {0: 1}  # the sink's stored position
    assert path.read_bytes() == before
    assert sink.path == path
    assert app.metrics is metrics


def test_a_postgres_sink_is_used_only_when_said(tmp_path: Path) -> None:
    from assured import PostgresSink

    app = App(group="g")

    @app.handler("in", sink=PostgresSink("postgresql://prod@db:5432/pay"))
    def book(msg: Message, db: Any) -> None: ...

    with pytest.raises(UsageError, match="use_postgres=True"):
        AppTest(app)
    assert app.settings.log.startswith("embedded:")  # nothing of the App was changed
