"""The root `hat` command: the ONE place where errors become messages and exit codes.

Exit codes: 0 success, 1 runtime failure, 2 usage or recipe error, 130 interrupted.
`HAT_DEBUG=1` shows the traceback of any error.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from hatcli import __version__
from hatcli.commands import (benchmark, calops, check, compile, debug, eval, export, infer, march, pack, perf, plugins,
                             recipe, report, run, sensitivity, train)
from hatcli.errors import HatError, HatWarning, Interrupted
from hatcli.progress import console

HELP_OPTIONS = ["-h", "--help"]
RESUME_TEXT = "finished stages are kept; run the same command to continue"
"""What a Ctrl-C outside a stage that saved its progress means (an `Interrupted` says more)."""


class _CtrlC(Exception):
    """A Ctrl-C carried past typer, which would turn it into a silent exit 130."""

    def __init__(self, interrupt: KeyboardInterrupt) -> None:
        super().__init__(str(interrupt))
        self.interrupt = interrupt


class _Group(TyperGroup):
    """The root group: lets a Ctrl-C reach `run_cli`, which says what was kept."""

    def invoke(self, ctx: Any) -> Any:
        """Run the subcommand; a KeyboardInterrupt leaves as `_CtrlC`."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _CtrlC(exc) from exc


app = typer.Typer(
    name="hat",
    cls=_Group,
    help="hat: from a raw dataset to a deployable integer model for an edge accelerator.\n\n"
    "Typical session:  hat pack shapes --target-data-dir data/shapes ;  hat run recipes/quickstart.toml",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": HELP_OPTIONS},
    pretty_exceptions_enable=False,
)

for module in (pack, train, eval, calops, export, check, sensitivity, debug, compile, perf, infer, run, report,
               benchmark, plugins):
    module.register(app)
app.add_typer(march.app, name="march")
app.add_typer(recipe.app, name="recipe")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """hat: from a raw dataset to a deployable integer model for an edge accelerator."""


def _hide_flag_metavars(command: Any) -> None:
    """Show no value placeholder after flags in --help (typer prints `<bool>` after each, but a
    flag takes no value), in `command` and all its subcommands, `--help` itself included."""
    ctx = command.context_class(command, help_option_names=HELP_OPTIONS)
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _hide_flag_metavars(sub)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Print a warning raised by hat as one `warning:` line (others keep Python's format)."""
    if issubclass(category, HatWarning) or (issubclass(category, UserWarning)
                                            and f"{os.sep}hatcli{os.sep}" in filename):
        console.print(f"[yellow]warning:[/] {escape(str(message))}", soft_wrap=True, highlight=False)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _interrupted_text(interrupt: KeyboardInterrupt) -> str:
    if isinstance(interrupt, Interrupted):
        return f"{interrupt}; {interrupt.hint}" if interrupt.hint else str(interrupt)
    return RESUME_TEXT


def run_cli(argv: list[str] | None = None) -> int:
    """Run `hat` with `argv` and return the exit code (errors printed as one line on stderr).

    Usage errors are reported by the CLI layer itself (exit 2); HatErrors and unexpected
    exceptions are turned into one line here, Ctrl-C into one line and 130, warnings from core
    code into one `warning:` line each.
    """
    debug = os.environ.get("HAT_DEBUG") == "1"
    command = typer.main.get_command(app)
    _hide_flag_metavars(command)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            command(args=argv, prog_name="hat", standalone_mode=True)
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except (_CtrlC, KeyboardInterrupt) as exc:
        interrupt = exc.interrupt if isinstance(exc, _CtrlC) else exc
        if debug:
            traceback.print_exception(interrupt)
        console.print(f"[yellow]interrupted[/]: {escape(_interrupted_text(interrupt))}", soft_wrap=True)
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
