"""``assured``: the typer application and its commands."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup

import assured
from assured.cli._audit import audit, demo
from assured.cli._bench import bench
from assured.cli._logcmds import consume, group_app, produce, topic_app
from assured.cli._run import run

_HELP = (
    "Deliver stream messages at most once, at least once or exactly once, and prove it.\n\n"
    "Exit codes: 0 done; 1 the log or its data failed (a broker out of reach, an engine file "
    "that is corrupt or not one, records not delivered, an audit verdict that failed); 2 the "
    "command is wrong (a flag or value, a malformed log URL, a file, topic, partition or group "
    "that does not exist), said in one line on stderr, with nothing written."
)


class _OneLineErrors(TyperGroup):
    """Typer's group, with a usage error (an unknown flag, a missing argument) said in one
    line, as every other error of the command is, instead of usage text and a panel."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(
                args, prog_name, complete_var, standalone_mode, windows_expand_args, **extra
            )
        try:
            # Not standalone: typer hands back a command's exit code and raises click's errors.
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except NoArgsIsHelpError:
            sys.exit(2)  # the help was printed: a bare `assured topic` asks for it
        except ClickException as e:
            hint = ""
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                hint = f" (see: {ctx.command_path} --help)"
            message = " ".join(e.format_message().split())
            Console(stderr=True, soft_wrap=True).print(
                f"[red]error:[/red] {escape(message)}{escape(hint)}"
            )
            sys.exit(e.exit_code)
        except typer.Abort:
            Console(stderr=True).print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="assured",
    cls=_OneLineErrors,
    help=_HELP,
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
