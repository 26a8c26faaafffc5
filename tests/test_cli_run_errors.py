"""``assured run`` with bad input: each mistake is one line on stderr, no traceback, exit 2 (1
where the log itself failed). In-process (typer's CliRunner), with each case's App module
written to a temporary folder on sys.path."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from assured.cli import app as cli

HEAD = "from assured import App, Message, Output, SqliteSink\n"
ONE_HANDLER = HEAD + textwrap.dedent("""
    app = App(log="embedded://{tmp}/log.db", group="g")

    @app.handler("charges")
    def charge(msg: Message) -> None:
        pass
""")


@dataclass
class Case:
    name: str
    args: list[str]
    code: int
    says: str  # a piece of the one line on stderr
    module: str = ONE_HANDLER  # written as <case module>.py; {tmp} is the test's folder
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # more files in the folder


CASES = [
    Case(
        "output and sink together",
        ["run", "{mod}:app"],
        2,
        "to an output topic or to a sink, not both",
        HEAD
        + textwrap.dedent("""
            app = App(log="embedded://{tmp}/log.db")

            @app.handler("charges", output="receipts", sink=SqliteSink("{tmp}/db.sqlite"))
            def charge(msg: Message, out: Output) -> None:
                pass
        """),
    ),
    Case(
        "unknown codec",
        ["run", "{mod}:app"],
        2,
        "unknown codec 'yaml'",
        HEAD
        + textwrap.dedent("""
            app = App(log="embedded://{tmp}/log.db")

            @app.handler("charges", value_codec="yaml")
            def charge(msg: Message) -> None:
                pass
        """),
    ),
    Case(
        "two handlers on one topic",
        ["run", "{mod}:app"],
        2,
        "topic 'charges' already has a handler",
        ONE_HANDLER
        + textwrap.dedent("""
            @app.handler("charges")
            def again(msg: Message) -> None:
                pass
        """),
    ),
    Case(
        "a setting that is not a number",
        ["run", "{mod}:app"],
        2,
        "commit_interval_ms = 'fast' (from ASSURED_COMMIT_INTERVAL_MS)",
        env={"ASSURED_COMMIT_INTERVAL_MS": "fast"},
    ),
    Case(
        "a metrics port out of range",
        ["run", "{mod}:app"],
        2,
        "metrics_port = '99999' (from ASSURED_METRICS_PORT)",
        env={"ASSURED_METRICS_PORT": "99999"},
    ),
    Case(
        "an unknown guarantee in the environment",
        ["run", "{mod}:app"],
        2,
        "guarantee = 'twice' (from ASSURED_GUARANTEE)",
        env={"ASSURED_GUARANTEE": "twice"},
    ),
    Case(
        "a typo in the config file",
        ["run", "{mod}:app"],
        2,
        "unknown setting 'comit_interval_ms' in '{tmp}/assured.toml'",
        env={"ASSURED_CONFIG_FILE": "{tmp}/assured.toml"},
        files={"assured.toml": "comit_interval_ms = 5\n"},
    ),
    Case(
        "a config file that is not TOML",
        ["run", "{mod}:app"],
        2,
        "config file '{tmp}/assured.toml' is not valid TOML",
        env={"ASSURED_CONFIG_FILE": "{tmp}/assured.toml"},
        files={"assured.toml": "group = \n"},
    ),
    Case(
        "a config file that does not exist",
        ["run", "{mod}:app"],
        2,
        "config file '{tmp}/nope.toml'",
        env={"ASSURED_CONFIG_FILE": "{tmp}/nope.toml"},
    ),
    Case(
        "no attribute of that name",
        ["run", "{mod}:app"],
        2,
        "module '{mod}' has no attribute 'app'; its App instances: payments",
        ONE_HANDLER.replace("app", "payments"),
    ),
    Case(
        "no attribute and no App",
        ["run", "{mod}:app"],
        2,
        "module '{mod}' has no attribute 'app'; it has no assured App at module level",
        "x = 1\n",
    ),
    Case(
        "not an App",
        ["run", "{mod}:app"],
        2,
        "{mod}:app is a builtins.dict, not an assured App",
        "app = {}\n",
    ),
    Case("no such module", ["run", "no_such_module_here:app"], 2, "no module named"),
    Case(
        "a module that needs a missing package",
        ["run", "{mod}:app"],
        2,
        "importing '{mod}' failed: No module named 'no_such_dependency'",
        "import no_such_dependency\n",
    ),
    Case(
        "a module that raises at import",
        ["run", "{mod}:app"],
        2,
        "{mod}.py:1: NameError: name 'undefined_name' is not defined",
        "print(undefined_name)\n",
    ),
    Case(
        "a module with a syntax error",
        ["run", "{mod}:app"],
        2,
        "importing '{mod}' failed: SyntaxError:",
        "app = App(\n",
    ),
    Case("no colon in the target", ["run", "payments"], 2, "expected module:attribute"),
    Case("an empty attribute", ["run", "payments:"], 2, "expected module:attribute"),
    Case("a target that is not a name", ["run", "pay-ments:app"], 2, "expected module:attribute"),
    Case("an unknown log URL", ["run", "{mod}:app", "-b", "nosuch://x"], 2, "unknown log URL"),
    Case("a log URL without a file", ["run", "{mod}:app", "--log", "embedded://"], 2, "embedded"),
    Case(
        "a log that is not an engine file",
        ["run", "{mod}:app", "-b", "embedded://{tmp}/not-a-log.db"],
        1,
        "not-a-log.db",
        files={"not-a-log.db": "these are not the pages of an engine file\n" * 200},
    ),
    Case("an unknown log level", ["run", "{mod}:app", "--log-level", "loud"], 2, "--log-level"),
    Case("an unknown log format", ["run", "{mod}:app", "--log-format", "xml"], 2, "text or json"),
    Case("an unknown guarantee", ["run", "{mod}:app", "--guarantee", "twice"], 2, "--guarantee"),
    Case("zero messages", ["run", "{mod}:app", "--max-messages", "0"], 2, "--max-messages"),
    Case("a negative idle time", ["run", "{mod}:app", "--until-idle", "-1"], 2, "--until-idle"),
    Case(
        "an App without handlers",
        ["run", "{mod}:app"],
        2,
        "the App has no handlers",
        HEAD + 'app = App(log="embedded://{tmp}/log.db")\n',
    ),
    Case(
        "an input topic that does not exist",
        ["run", "{mod}:app"],
        2,
        "topic 'charges' (of handler charge) does not exist",
    ),
    Case(
        "a mistake said as JSON",
        ["run", "{mod}:app", "--guarantee", "twice", "--log-format", "json"],
        2,
        '"level": "error", "logger": "assured.cli", "message": "--guarantee \'twice\'',
    ),
]


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on sys.path for the case's module; the module is forgotten afterwards."""
    sys.path.insert(0, str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in set(sys.modules) - before:
        if name.startswith("case_"):
            del sys.modules[name]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_run_is_one_line_and_an_exit_code(
    case: Case, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = f"case_{CASES.index(case)}"

    def fill(text: str) -> str:
        return text.replace("{tmp}", str(folder)).replace("{mod}", mod)

    (folder / f"{mod}.py").write_text(fill(case.module))
    for name, text in case.files.items():
        (folder / name).write_text(fill(text))
    for key, value in case.env.items():
        monkeypatch.setenv(key, fill(value))
    monkeypatch.chdir(folder)

    done = CliRunner().invoke(cli, [fill(a) for a in case.args])

    shown = f"exit {done.exit_code}; stderr: {done.stderr!r}; stdout: {done.stdout!r}"
    assert done.exit_code == case.code, shown
    assert len(done.stderr.strip().splitlines()) == 1, shown
    assert fill(case.says) in done.stderr, shown
    assert "Traceback" not in done.stderr + done.stdout, shown
    assert not isinstance(done.exception, Exception) or isinstance(done.exception, SystemExit)
    assert not (folder / "log.db").exists() or case.name == "an input topic that does not exist"
