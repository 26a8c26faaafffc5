"""The command line fed bad input, case after case from one table: each must exit 1 or 2 as
the top-level help documents (2: the command is wrong; 1: the log or its data failed), say so
in exactly one line on stderr, print no traceback, and write nothing: no file appears, and no
file's bytes change.

The cases run in-process (typer's CliRunner keeps stdout and stderr apart), so the whole table
takes seconds; two of them also run through the real ``assured`` executable, to show that the
entry point itself prints no traceback. ``assured run`` has a table of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from assured.cli import app
from assured.log import TopicPartition, open_log

BIN = str(Path(sys.executable).parent / "assured")
LIMIT = 1_000_000  # the embedded engine's record limit, as `topic describe` shows it


# -- files the cases start from ------------------------------------------------------------------


def _sound(path: Path) -> None:
    """An engine file: topic t (1 partition, 10 records), topic wide (3 partitions), and group
    g with a committed offset."""
    log = open_log(f"embedded://{path}")
    with log.admin() as admin:
        admin.create_topic("t", 1)
        admin.create_topic("wide", 3)
    with log.producer() as producer:
        for i in range(10):
            producer.send("t", b"v%d" % i, partition=0)
            producer.flush()  # ten batches of one record
    with log.consumer(group_id="g") as consumer:
        consumer.assign([TopicPartition("t", 0)])
        consumer.commit({TopicPartition("t", 0): 3})


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sound engine file, checkpointed and closed, made once and copied by the cases."""
    path = tmp_path_factory.mktemp("template") / "log.db"
    _sound(path)
    assert not path.with_name("log.db-wal").exists()  # every connection closed: all in the file
    return path


Setup = Callable[[Path, Path], None]  # (work folder, template)


def engine(name: str = "log.db") -> Setup:
    def make(folder: Path, template: Path) -> None:
        shutil.copy(template, folder / name)

    return make


def damaged_batch(folder: Path, template: Path) -> None:
    """SQLite's pages are sound; the first record batch of t is not."""
    shutil.copy(template, folder / "batch.db")
    with contextlib.closing(sqlite3.connect(folder / "batch.db")) as conn, conn:
        conn.execute("UPDATE batches SET data = x'00' WHERE id = (SELECT min(id) FROM batches)")


def truncated(folder: Path, template: Path) -> None:
    data = template.read_bytes()
    (folder / "cut.db").write_bytes(data[: len(data) // 2])


def garbled(folder: Path, template: Path) -> None:
    data = bytearray(template.read_bytes())
    for at in range(4096, len(data), 4096 * 2):  # every other page from the second on
        data[at : at + 64] = b"\xde\xad\xbe\xef" * 16
    (folder / "garbled.db").write_bytes(bytes(data))


def text_file(name: str, content: bytes = b"my notes, not a database\n" * 20) -> Setup:
    def make(folder: Path, template: Path) -> None:
        (folder / name).write_bytes(content)

    return make


def both(*setups: Setup) -> Setup:
    def make(folder: Path, template: Path) -> None:
        for setup in setups:
            setup(folder, template)

    return make


# -- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]  # "{d}" is the work folder (also the working directory)
    code: int  # 2: the command is wrong; 1: the log or its data failed
    says: str  # a fragment of the one line on stderr
    setup: Setup | None = None
    stdin: bytes = b""

    @property
    def id(self) -> str:
        return " ".join(self.argv)[:80]


LOG = "embedded://{d}/log.db"
TYPO = "embedded://{d}/typo.db"

CASES = [
    # -- top level and version: typer's usage errors, said in one line too
    Case(("--bogus",), 2, "No such option: --bogus"),
    Case(("nosuchcommand",), 2, "No such command 'nosuchcommand'"),
    Case(("version", "extra"), 2, "unexpected extra argument"),
    Case(("version", "--bogus"), 2, "No such option: --bogus"),
    # -- topic
    Case(("topic", "create"), 2, "Missing argument 'name'"),
    Case(("topic", "create", "bad name", "-b", "embedded://{d}/new.db"), 2, "Kafka refuses"),
    Case(("topic", "create", "x", "-p", "0", "-b", "embedded://{d}/new.db"), 2, "Invalid value"),
    Case(
        ("topic", "create", "x", "-c", "retention.ms=soon", "-b", "embedded://{d}/new.db"),
        2,
        "retention.ms='soon' is not a number",
    ),
    Case(("topic", "create", "x", "-c", "nokv", "-b", "embedded://{d}/new.db"), 2, "key=value"),
    Case(("topic", "create", "t", "-b", LOG), 2, "already exists", engine()),
    Case(("topic", "create", "x", "-b", "embedded://{d}/no/x.db"), 2, "folder"),
    Case(("topic", "create", "x", "-b", "embedded://{d}/cut.db"), 1, "corrupt", truncated),
    Case(("topic", "list", "-b", TYPO), 2, "typo.db does not exist"),
    Case(("topic", "list"), 2, "assured.db does not exist"),  # the default, ./assured.db
    Case(("topic", "list", "-b", "embedded:/x.db"), 2, "lacks the '//'"),
    Case(("topic", "list", "-b", ""), 2, "the log URL is empty"),
    Case(("topic", "list", "-b", "redis://localhost"), 2, "unknown log URL"),
    Case(("topic", "list", "-b", "embedded://tmp/x.db"), 2, "ambiguous"),
    Case(("topic", "list", "-b", LOG + "?durabilty=full"), 2, "unknown embedded log option"),
    Case(("topic", "list", "-b", LOG, "-X", "nokv"), 2, "expected key=value", engine()),
    Case(
        ("topic", "list", "-b", "embedded://{d}/junk.db"), 1, "not a SQLite", text_file("junk.db")
    ),
    Case(("topic", "list", "-b", "embedded://{d}/e.db"), 1, "is empty", text_file("e.db", b"")),
    Case(("topic", "describe", "nope", "-b", LOG), 2, "'nope' does not exist", engine()),
    Case(("topic", "delete", "nope", "-b", LOG), 2, "'nope' does not exist", engine()),
    Case(("topic", "delete", "t", "-b", TYPO), 2, "typo.db does not exist"),
    # -- produce
    Case(("produce", "-b", LOG), 2, "Missing option '--topic'", engine()),
    Case(("produce", "-t", "t", "-b", LOG, "-l", "{d}/none.txt"), 2, "cannot read", engine()),
    Case(("produce", "-t", "t", "-b", LOG, "-l", "{d}"), 2, "cannot read", engine()),
    Case(("produce", "-t", "t", "-b", LOG, "-D", ""), 2, "must not be empty", engine()),
    Case(("produce", "-t", "t", "-b", LOG, "-D", "\\x"), 2, "bad backslash escape", engine()),
    Case(("produce", "-t", "t", "-b", LOG, "-K", ""), 2, "must not be empty", engine()),
    Case(("produce", "-t", "t", "-b", LOG, "-k", "a", "-K", ":"), 2, "exclude", engine()),
    Case(("produce", "-t", "t", "-b", LOG, "-H", "nokv"), 2, "name=value", engine()),
    Case(("produce", "-t", "nope", "-b", LOG), 2, "'nope' does not exist", engine(), b"a\n"),
    Case(("produce", "-t", "nope", "-b", LOG), 2, "'nope' does not exist", engine()),  # no input
    Case(("produce", "-t", "wide", "-p", "7", "-b", LOG), 2, "no partition 7", engine(), b"a\n"),
    Case(("produce", "-t", "t", "-p", "-1", "-b", LOG), 2, "Invalid value", engine()),
    Case(("produce", "-t", "t", "-b", TYPO), 2, "typo.db does not exist", None, b"a\n"),
    Case(
        ("produce", "-t", "t", "-b", LOG),
        2,
        f"{LIMIT + 1} bytes for topic 't' is over the limit of {LIMIT}",
        engine(),
        b"x" * (LIMIT + 1) + b"\n",
    ),
    Case(
        ("produce", "-t", "t", "-b", "embedded://{d}/batch.db"),
        1,
        "refusing to write",
        damaged_batch,
        b"a\n",
    ),
    Case(("produce", "-t", "t", "-b", "embedded://{d}/garbled.db"), 1, "corrupt", garbled, b"a\n"),
    Case(("produce", "-t", "t", "-b", "embedded://{d}/cut.db"), 1, "corrupt", truncated, b"a\n"),
    Case(
        ("produce", "-t", "t", "-b", "embedded://{d}/junk.db"),
        1,
        "not a SQLite",
        text_file("junk.db"),
        b"a\n",
    ),
    # -- consume
    Case(("consume", "-b", LOG), 2, "Missing option '--topic'", engine()),
    Case(("consume", "-t", "t", "-b", TYPO, "-e"), 2, "typo.db does not exist"),
    Case(("consume", "-t", "nope", "-b", LOG, "-e"), 2, "'nope' does not exist", engine()),
    Case(("consume", "-t", "t", "-b", LOG, "-p", "5", "-e"), 2, "no partition 5", engine()),
    Case(("consume", "-t", "t", "-b", LOG, "-o", "middle"), 2, "beginning, end, stored", engine()),
    Case(("consume", "-t", "t", "-b", LOG, "-o", "stored", "-e"), 2, "-G", engine()),
    Case(("consume", "-t", "t", "-b", LOG, "--isolation", "dirty"), 2, "isolation", engine()),
    Case(("consume", "-t", "t", "-b", LOG, "-c", "0"), 2, "Invalid value", engine()),
    Case(("consume", "-t", "t", "-b", LOG, "-f", "%s\\x"), 2, "bad backslash escape", engine()),
    Case(
        ("consume", "-t", "t", "-b", "embedded://{d}/batch.db", "-e"),
        1,
        "offset 0 is damaged",
        damaged_batch,
    ),
    # -- group
    Case(("group", "describe", "nope", "-b", LOG), 2, "group 'nope' does not exist", engine()),
    Case(("group", "describe", "-b", LOG), 2, "Missing argument 'group'", engine()),
    Case(("group", "list", "-b", TYPO), 2, "typo.db does not exist"),
    Case(("group", "list", "-b", "kafka://"), 2, "names no broker"),
    Case(("group", "list", "-b", "kafka://host:port"), 2, "host:port"),
    # -- audit: every option is checked before a run starts
    Case(("audit", "--guarantee", "twice"), 2, "--guarantee 'twice'"),
    Case(("audit", "--faults", "meteor"), 2, "unknown fault(s) meteor"),
    Case(("audit", "--faults", ","), 2, "names no fault"),
    Case(("audit", "--sink", "carrier-pigeon"), 2, "sink 'carrier-pigeon'"),
    Case(("audit", "--sink", "postgres"), 2, "--postgres-dsn"),
    Case(("audit", "--faults", "db-restart"), 2, "--postgres-data"),
    Case(("audit", "--faults", "broker-kill"), 2, "kafka://"),
    Case(("audit", "--log", "embedded:/x.db"), 2, "lacks the '//'"),
    Case(("audit", "--messages", "0"), 2, "Invalid value"),
    Case(("audit", "--timeout", "0"), 2, "Invalid value"),
    Case(("audit", "--report", "{d}/report"), 2, "a file is there", text_file("report")),
    # -- demo
    Case(("demo", "--messages", "5"), 2, "Invalid value"),
    Case(("demo", "--kills", "0"), 2, "Invalid value"),
    Case(("demo", "--report", "{d}/report"), 2, "a file is there", text_file("report")),
    # -- bench: refused before any engine file or result is written
    Case(("bench", "--suite", "quantum"), 2, "unknown suite 'quantum'"),
    Case(("bench", "--durability", "sometimes"), 2, "--durability 'sometimes'"),
    Case(("bench", "--log", "kafka://h:9092"), 2, "embedded engine only"),
    Case(("bench", "--log", "embedded:/tmp/b"), 2, "lacks the '//'"),
    Case(("bench", "--log", "embedded://tmp/b"), 2, "ambiguous"),
    Case(("bench", "--records", "0"), 2, "Invalid value"),
    Case(
        ("bench", "--suite", "runtime", "--systems", "fastest", "--log", "embedded://{d}/b"),
        2,
        "--systems 'fastest'",
    ),
    Case(("bench", "--results-dir", "{d}/report"), 2, "is a file", text_file("report")),
]


def test_the_table_is_wide() -> None:
    assert len(CASES) >= 40
    commands = {c.argv[0] for c in CASES}
    assert {"topic", "produce", "consume", "group", "audit", "demo", "bench", "version"} <= commands
    assert "run" not in commands


# -- the harness ---------------------------------------------------------------------------------


def snapshot(*folders: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``folders``, with its bytes."""
    seen: dict[str, bytes | None] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            seen[str(path)] = path.read_bytes() if path.is_file() else None
    return seen


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The case's folder (also the working directory, for the default ./assured.db) and the
    folder temporary files go to (the audit's and demo's work folders)."""
    folder = tmp_path / "work"
    temp = tmp_path / "temp"
    folder.mkdir()
    temp.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return folder, temp


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_and_writes_nothing(
    case: Case, work: tuple[Path, Path], template: Path
) -> None:
    folder, temp = work
    if case.setup is not None:
        case.setup(folder, template)
    before = snapshot(folder, temp)
    argv = [a.replace("{d}", str(folder)) for a in case.argv]

    result = CliRunner().invoke(app, argv, input=case.stdin, env={"ASSURED_LOG": None})

    # An exception typer had to catch would have been a traceback for a user.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert case.says in lines[0]
    assert result.stdout == ""
    assert result.exit_code == case.code, lines[0]
    assert snapshot(folder, temp) == before, "the command wrote something"


@pytest.mark.parametrize(
    ("argv", "setup", "says"),
    [
        (["produce", "-t", "t", "-b", "embedded://{d}/garbled.db"], garbled, "corrupt"),
        (["consume", "--bogus"], None, "No such option: --bogus"),
    ],
)
def test_the_real_entry_point_prints_no_traceback(
    tmp_path: Path, template: Path, argv: list[str], setup: Setup | None, says: str
) -> None:
    if setup is not None:
        setup(tmp_path, template)
    before = snapshot(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "ASSURED_LOG"}
    done = subprocess.run(
        [BIN, *(a.replace("{d}", str(tmp_path)) for a in argv)],
        input=b"a\n",
        capture_output=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr + done.stdout.decode()
    assert len(stderr.splitlines()) == 1, stderr
    assert says in stderr
    assert done.returncode in (1, 2)
    assert snapshot(tmp_path) == before
