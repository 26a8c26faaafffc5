"""``assured``: the typer application and its commands."""

from __future__ import annotations

import typer
from rich.console import Console

import assured
from assured.cli._audit import audit, demo
from assured.cli._bench import bench
from assured.cli._logcmds import consume, group_app, produce, topic_app
from assured.cli._run import run

app = typer.Typer(
    name="assured",
    help="Deliver stream messages at most once, at least once or exactly once, and prove it.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.command()
def version() -> None:
    """Print assured's version."""
    console.print(f"assured {assured.__version__}")


app.command()(demo)
app.command()(audit)
app.command()(bench)
app.add_typer(topic_app, name="topic")
app.command()(produce)
app.command()(consume)
app.add_typer(group_app, name="group")
app.command()(run)


def main() -> None:
    app()
