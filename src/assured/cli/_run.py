"""``assured run``: an App from the shell, until SIGTERM or SIGINT.

What it says goes to stderr, one line each: the runtime's log lines (``assured.runtime``: the
start, assignments, waiting for the group, dead letters, a summary every few seconds on a
terminal, commits at debug level) as text or as JSON objects. A mistake (a bad target, a bad
setting, a handler registered wrongly) is one line and exit 2; a failure of the log is one line
and exit 1.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import sqlite3
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer

from assured.errors import AssuredError, ConfigError, UnknownTopicError, UsageError

__all__ = ["JsonLogFormatter", "TextLogFormatter", "run"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}  # fmt: skip
FORMATS = ("text", "json")
GUARANTEE_NAMES = ("at-most-once", "at-least-once", "exactly-once")

# What every LogRecord has; anything else on a record was passed as ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _one_line(text: str) -> str:
    return " ".join(text.split())


class TextLogFormatter(logging.Formatter):
    """``2025-01-31 12:00:00.123 INFO assured.runtime: message``, always one line; at debug
    level an error's traceback follows it."""

    def __init__(self, tracebacks: bool = False):
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        line = (
            f"{when}.{int(record.msecs):03d} {record.levelname} {record.name}: "
            f"{_one_line(record.getMessage())}"
        )
        if record.exc_info and self.tracebacks:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    then the record's structured fields (``event``, ``topic``, ``partition``, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "time": f"{when}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line.setdefault(key, value)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class _Said:
    """How this command speaks on stderr: the log format, and its own error lines."""

    def __init__(self, fmt: str = "text") -> None:
        self.fmt = fmt

    def error(self, message: str, code: int) -> NoReturn:
        """``message`` as one line on stderr (a JSON object with --log-format json); exit."""
        text = _one_line(message)
        if self.fmt == "json":
            line = json.dumps(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "level": "error",
                    "logger": "assured.cli",
                    "message": text,
                    "exit_code": code,
                },
                ensure_ascii=False,
            )
        else:
            line = f"error: {text}"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        raise typer.Exit(code)


@contextlib.contextmanager
def _logging(level: int, fmt: str) -> Iterator[None]:
    """Log lines to stderr, in ``fmt``, from ``level`` up, for as long as the command runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLogFormatter() if fmt == "json" else TextLogFormatter(level <= logging.DEBUG)
    )
    root = logging.getLogger()
    before = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(before)
        handler.close()


def run(
    target: str = typer.Argument(
        ...,
        help="The App to run, as module:attribute (e.g. payments:app). The module is imported "
        "from the current directory first, then from sys.path.",
        show_default=False,
        metavar="MODULE:APP",
    ),
    log: str | None = typer.Option(
        None,
        "--log",
        "-b",
        help="Log URL (embedded:///path.db or kafka://host:9092); replaces the App's own. "
        "Default: the App's setting.",
        show_default=False,
        metavar="URL",
    ),
    group: str | None = typer.Option(
        None,
        "--group",
        "-G",
        help="Consumer group; replaces the App's own. Default: the App's setting.",
        show_default=False,
        metavar="GROUP",
    ),
    guarantee: str | None = typer.Option(
        None,
        "--guarantee",
        help="at-most-once, at-least-once or exactly-once; replaces the App's own. "
        "Default: the App's setting.",
        show_default=False,
        metavar="GUARANTEE",
    ),
    max_messages: int | None = typer.Option(
        None,
        "--max-messages",
        help="Stop after handling this many records (committing them first).",
        show_default=False,
    ),
    until_idle: float | None = typer.Option(
        None,
        "--until-idle",
        help="Stop once every partition the group assigned is read to its end and nothing "
        "new came for this many seconds (time spent waiting for the group does not count).",
        show_default=False,
    ),
    log_level: str = typer.Option(
        "info",
        "--log-level",
        help="Least level shown: debug, info, warning or error.",
        metavar="LEVEL",
    ),
    log_format: str = typer.Option(
        "text",
        "--log-format",
        help="text (readable lines) or json (one object per line).",
        metavar="FORMAT",
    ),
    progress: bool | None = typer.Option(
        None,
        "--progress/--no-progress",
        help="A one-line summary (records/s, lag, commits, aborts, dead letters) every "
        "--progress-every seconds. Default: on when stderr is a terminal.",
        show_default=False,
    ),
    progress_every: float = typer.Option(
        5.0, "--progress-every", help="Seconds between two summaries."
    ),
) -> None:
    """Run an App until SIGTERM or SIGINT (or --max-messages / --until-idle).

    The first signal finishes the batch, commits or aborts, and leaves the group; a second
    exits at once. Exit codes: 0 done; 1 the log failed; 2 a mistake (the target, a flag, a
    setting, a handler's registration)."""
    said = _Said("json" if log_format == "json" else "text")
    if log_format not in FORMATS:
        said.error(f"--log-format {log_format!r}: text or json", 2)
    level = LEVELS.get(log_level.lower())
    if level is None:
        said.error(f"--log-level {log_level!r}: one of {', '.join(LEVELS)}", 2)
    if guarantee is not None and guarantee.replace("_", "-").lower() not in GUARANTEE_NAMES:
        said.error(f"--guarantee {guarantee!r}: one of {', '.join(GUARANTEE_NAMES)}", 2)
    if max_messages is not None and max_messages < 1:
        said.error(f"--max-messages {max_messages}: at least 1", 2)
    if until_idle is not None and until_idle < 0:
        said.error(f"--until-idle {until_idle:g}: 0 seconds or more", 2)
    if progress_every <= 0:
        said.error(f"--progress-every {progress_every:g}: more than 0 seconds", 2)
    if progress is None:
        progress = sys.stderr.isatty()
    overrides = {
        name: value
        for name, value in (("log", log), ("group", group), ("guarantee", guarantee))
        if value is not None
    }
    with _logging(level, said.fmt):
        app = _load(target, said, level)
        try:
            if overrides:
                app.configure(**overrides)
            app.run(
                max_messages=max_messages,
                until_idle=until_idle,
                progress_every=progress_every if progress else None,
            )
        except AssuredError as e:
            _debug_traceback(level)
            said.error(str(e), _exit_code(e))
        except sqlite3.Error as e:  # damage no check of the engine met first: still one line
            _debug_traceback(level)
            said.error(
                f"the engine file could not be read ({e}); it may be corrupt: restore it from a "
                "copy, or move it aside and start a new one",
                1,
            )


def _exit_code(e: AssuredError) -> int:
    """2: the command or the App asked for something wrong; 1: the log failed."""
    return 2 if isinstance(e, ConfigError | UsageError | UnknownTopicError) else 1


def _debug_traceback(level: int) -> None:
    if level <= logging.DEBUG:
        logging.getLogger("assured.cli").debug("traceback:\n%s", traceback.format_exc())


def _load(target: str, said: _Said, level: int) -> Any:
    """The App ``target`` names (``module:attribute``), or one line saying why not."""
    from assured.runtime import App

    module_name, colon, attr = target.partition(":")
    if (
        not colon
        or not all(part.isidentifier() for part in module_name.split("."))
        or not attr.isidentifier()
    ):
        said.error(f"{target!r}: expected module:attribute (e.g. payments:app)", 2)
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        _debug_traceback(level)
        if e.name is not None and (module_name + ".").startswith(e.name + "."):
            said.error(
                f"no module named {e.name!r} (looked in {cwd} and on sys.path); run from the "
                "folder that holds it, or set PYTHONPATH",
                2,
            )
        said.error(f"importing {module_name!r} failed: {e}", 2)
    except AssuredError as e:  # a handler registered wrongly, a bad setting: at import
        _debug_traceback(level)
        said.error(f"{module_name}: {e}", _exit_code(e))
    except SyntaxError as e:  # its message names the file and the line
        _debug_traceback(level)
        said.error(f"importing {module_name!r} failed: SyntaxError: {e}", 2)
    except Exception as e:
        _debug_traceback(level)
        said.error(f"importing {module_name!r} failed: {_where(e)}{type(e).__name__}: {e}", 2)
    try:
        app = getattr(module, attr)
    except AttributeError:
        apps = sorted(name for name, value in vars(module).items() if isinstance(value, App))
        found = (
            f"; its App instances: {', '.join(apps)}"
            if apps
            else "; it has no assured App at module level"
        )
        said.error(f"module {module_name!r} has no attribute {attr!r}{found}", 2)
    if not isinstance(app, App):
        said.error(
            f"{target} is a {type(app).__module__}.{type(app).__qualname__}, not an assured App "
            "(make one with App(...) and register handlers with @app.handler(topic))",
            2,
        )
    return app


def _where(e: BaseException) -> str:
    """``file:line: `` of the innermost frame of ``e``."""
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        return f"{frames[-1].filename}:{frames[-1].lineno}: "
    return ""
