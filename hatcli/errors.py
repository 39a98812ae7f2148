"""The few exception types core code raises.

Core code never prints or exits: it raises one of these, and `hatcli.main` turns it into one
readable line and an exit code (`HAT_DEBUG=1` shows the traceback).
"""

from __future__ import annotations


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


class Interrupted(HatError):
    """The user pressed Ctrl-C; what was saved is named in the message. Exit code 130."""

    exit_code = 130
