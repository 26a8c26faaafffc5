"""``App.configure``: settings replaced after the App was made (what ``assured run -b/--group/
--guarantee`` use), validated as the App's own, winning over ``ASSURED_*`` variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from assured import App, Message, open_log
from assured.errors import ConfigError


def test_configure_replaces_settings_and_a_log_given_as_an_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASSURED_GROUP", "from-env")
    first, second = open_log(f"embedded://{tmp_path}/a.db"), open_log(f"embedded://{tmp_path}/b.db")
    for log in (first, second):
        with log.admin() as admin:
            admin.create_topic("in", 1)
    with second.producer() as producer:
        producer.send("in", b"x")
        producer.flush()
    app = App(log=first, guarantee="at-most-once")
    seen: list[bytes] = []

    @app.handler("in")
    def handle(msg: Message) -> None:
        seen.append(msg.value)

    assert app.settings.group == "from-env"
    app.configure(log=second.url, group="billing", guarantee="exactly-once")
    assert (app.settings.group, app.guarantee) == ("billing", "exactly-once")
    assert app.metrics.guarantee == "exactly-once"

    assert app.run(until_idle=0.2).processed == 1
    assert seen == [b"x"], "the log named by configure() was read, not the object given first"
    with second.admin() as admin:
        assert sum(admin.committed_offsets("billing", ["in"]).values()) == 1


def test_a_bad_value_changes_nothing() -> None:
    app = App(log="embedded:///tmp/never-opened.db", group="g")
    with pytest.raises(ConfigError, match="guarantee"):
        app.configure(guarantee="twice")
    with pytest.raises(ConfigError, match="commit_interval_ms"):
        app.configure(commit_interval_ms=-1)
    assert (app.settings.group, app.guarantee, app.settings.commit_interval_ms) == (
        "g",
        "at-least-once",
        100,
    )
