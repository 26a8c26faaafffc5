"""``assured``: the typer application and its commands."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

import assured
from assured.cli._bench import bench
from assured.log import partition_for_key

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


@app.command()
def demo(
    partitions: int = typer.Option(4, min=1, help="Partitions of the demo's payments topic."),
) -> None:
    """The payment example: audit all three guarantees under crashes.

    The audit is not built yet; until it is, this shows the one piece of the delivery path that
    exists: where each payment's key lands, computed as Kafka's Java clients compute it.
    """
    console.print(
        "[bold]assured demo[/bold]: the crash audit of the three guarantees is not built yet "
        "(it needs the log, the runtime and the audit).\n"
        "What runs today: Java-compatible key partitioning, which both backends will use so a "
        "payment account's charges stay in order on one partition.\n"
    )
    table = Table(title=f"payment accounts → partition (of {partitions})")
    table.add_column("account key")
    table.add_column("partition", justify="right")
    for account in ("acct-0001", "acct-0002", "acct-0003", "acct-0042", "acct-1337"):
        table.add_row(account, str(partition_for_key(account.encode(), partitions)))
    console.print(table)


app.command()(bench)


def main() -> None:
    app()
