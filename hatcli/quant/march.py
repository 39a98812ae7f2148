"""March profiles by name: the ones hat ships, the ones plugins register, and profile files.

The schema (`MarchProfile` and its parts) lives in `hatcli.march_profile`; this module finds a
profile. Names come from the `register_marches` hook (hat's own profiles, `SHIPPED_MARCHES`, are
registered by the built-in plugin like any other); a name ending in `.toml` is read as a profile
file, so a recipe or `--march` can point at a profile that `hat perf --fit` wrote.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from hatcli.march_profile import CostModel, MarchProfile, OpRule, QuantRules, read_march_file

__all__ = ["CostModel", "MarchProfile", "OpRule", "QuantRules", "SHIPPED_MARCHES", "is_march_file",
           "list_marches", "load_march", "march_names", "shipped_march_file"]

SHIPPED_MARCHES = ("bayes", "bayes_e", "bernoulli2", "nash_e", "nash_m", "nash_p", "host")
"""The profiles in `hatcli/quant/marches/`, in the order `hat march list` shows them."""


def shipped_march_file(name: str) -> Traversable:
    """The packaged TOML file of shipped march `name`."""
    return resources.files("hatcli.quant").joinpath("marches", f"{name}.toml")


def is_march_file(name: str) -> bool:
    """Whether `name` names a profile file (ends in `.toml`) rather than a registered march."""
    return name.endswith(".toml")


def load_march(name: str) -> MarchProfile:
    """Return the profile of march `name` (registered by a plugin, or a `.toml` profile file).

    Raises a UsageError naming the valid marches (or the file and its bad key)."""
    if is_march_file(name):
        return read_march_file(Path(name))
    from hatcli.plugins import marches

    return marches().get(name, order=march_names())


def march_names() -> list[str]:
    """The names of every registered march: hat's own in `SHIPPED_MARCHES` order, then the
    plugins' by name."""
    from hatcli.plugins import marches

    names = marches().names()
    return [n for n in SHIPPED_MARCHES if n in names] + [n for n in names if n not in SHIPPED_MARCHES]


def list_marches() -> list[MarchProfile]:
    """Return every registered march profile, in `march_names` order."""
    return [load_march(n) for n in march_names()]
