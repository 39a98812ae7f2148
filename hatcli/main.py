"""The root `hat` command: the ONE place where errors become messages and exit codes.

Exit codes: 0 success, 1 runtime failure, 2 usage or recipe error, 130 interrupted.
`HAT_DEBUG=1` shows the traceback of any error.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer
from rich.markup import escape

from hatcli import __version__
from hatcli.commands import calops, check, compile, eval, export, infer, pack, perf, plugins, recipe, run, train
from hatcli.errors import HatError
from hatcli.progress import console

app = typer.Typer(
    name="hat",
    help="hat: from a raw dataset to a deployable integer model for an edge accelerator.\n\n"
    "Typical session:  hat pack shapes --target-data-dir data/shapes ;  hat run recipes/quickstart.toml",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)

for module in (pack, train, eval, calops, export, check, compile, perf, infer, run, plugins):
    module.register(app)
app.add_typer(recipe.app, name="recipe")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """hat: from a raw dataset to a deployable integer model for an edge accelerator."""


def run_cli(argv: list[str] | None = None) -> int:
    """Run `hat` with `argv` and return the exit code (errors printed as one line on stderr).

    Usage errors are reported by the CLI layer itself (exit 2); HatErrors and unexpected
    exceptions are turned into one line here.
    """
    debug = os.environ.get("HAT_DEBUG") == "1"
    command = typer.main.get_command(app)
    try:
        command(args=argv, prog_name="hat", standalone_mode=True)
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages are kept; run the same command to continue")
        return 130
    except HatError as exc:
        if debug:
            traceback.print_exc()
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return exc.exit_code
    except Exception as exc:  # an unexpected failure still gets one readable line
        if debug:
            traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else ""
        console.print(f"[red]error:[/] {type(exc).__name__}: {escape(message)} (HAT_DEBUG=1 shows the traceback)",
                      soft_wrap=True)
        return 1


def main() -> None:
    """Console-script entry point."""
    sys.exit(run_cli())
