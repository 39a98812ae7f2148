"""The few exception and warning types core code raises.

Core code never prints or exits: it raises one of these, and `hatcli.main` turns it into one
readable line and an exit code (`HAT_DEBUG=1` shows the traceback). Something the user should
know that does not stop the work goes through `warn`, which `hatcli.main` prints as one
``warning:`` line (a library user sees an ordinary Python warning, and can filter it).
"""

from __future__ import annotations

import warnings


class HatError(Exception):
    """A failure the user can act on; exit code 1 (a runtime failure)."""

    exit_code = 1


class UsageError(HatError):
    """Bad command-line usage: an unknown name, a bad option value; exit code 2."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe that cannot be loaded or does not validate; exit code 2."""


class PluginError(HatError):
    """A plugin that is broken or registers something twice."""


class DataError(HatError):
    """Packed or raw data that cannot be read, or is not what the recipe says."""


class ArtifactError(HatError):
    """A checkpoint, exported program or compiled artifact that is missing, stale or tampered with."""


class Interrupted(KeyboardInterrupt):
    """The user pressed Ctrl-C and the work saved what it had; the message names what was saved.

    It is a KeyboardInterrupt, so that hat used as a library (a notebook, a test under pytest)
    stops as on any Ctrl-C instead of an `except Exception` going on; `hatcli.main` turns it into
    one line and exit code 130. `hint` says how to continue, in terms of the command that ran it
    (the command layer sets it: only it knows what was typed).
    """

    exit_code = 130

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class HatWarning(UserWarning):
    """Something the user should know that does not stop the work (e.g. a stage built on an
    unfinished one)."""


def warn(message: str) -> None:
    """Tell the user `message` without stopping: one ``warning:`` line from the CLI, a
    `HatWarning` for a library user."""
    warnings.warn(message, HatWarning, stacklevel=2)
