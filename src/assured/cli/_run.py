"""``assured run``: an App from the shell, until SIGTERM or SIGINT."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import typer

from assured.cli._logcmds import _errors, err

__all__ = ["run"]


def run(
    target: str = typer.Argument(..., help="module:attribute naming an assured App."),
    max_messages: int | None = typer.Option(None, min=1),
    until_idle: float | None = typer.Option(None, min=0.0),
) -> None:
    """Run an App until SIGTERM or SIGINT (or --max-messages / --until-idle)."""
    from assured.runtime import App

    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        err.print(f"[red]error:[/red] {target!r}: expected module:attribute (e.g. payments:app)")
        raise typer.Exit(2)
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        err.print(f"[red]error:[/red] cannot import {module_name!r}: {e}")
        raise typer.Exit(2) from None
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        err.print(f"[red]error:[/red] {target} is not an assured App")
        raise typer.Exit(2)
    with _errors():
        stats = app.run(max_messages=max_messages, until_idle=until_idle)
    err.print(f"processed {stats.processed} record(s) in {stats.seconds:.1f} s")
