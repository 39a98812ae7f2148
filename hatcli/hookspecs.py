"""Every plugin hook of hat, in one place, typed and documented.

Hooks follow the `register_*(register)` style: a plugin is handed a `register` callable and
calls it once per thing it provides. pluggy rejects an implementation whose arguments a spec
does not declare, so specs can grow new arguments without breaking existing plugins.

A plugin is any module exposed through the `hat.plugins` entry-point group:

    [project.entry-points."hat.plugins"]
    mobilenet = "hat_mobilenet.plugin"

Registration is all-or-nothing per plugin: if any of a plugin's hooks raises, registers the wrong
kind of object or a name that is taken, or the plugin implements a hook not declared here, the
plugin is reported broken by `hat plugins` and none of what it registered is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from hatcli.family import CallbackSpec, ModelFamily, Packer, QuantSchemeSpec
from hatcli.march_profile import MarchProfile
from hatcli.runtime_spec import RuntimeSpec

hookspec = pluggy.HookspecMarker("hat")
hookimpl = pluggy.HookimplMarker("hat")


@hookspec
def register_families(register: Callable[[ModelFamily], None]) -> None:
    """Register model families: call `register(family)` with a `ModelFamily` instance.

    The family's `name` becomes the key that recipes use in `[model] name = ...`.
    Registering a name that another plugin already registered makes this plugin broken.
    """


@hookspec
def register_packers(register: Callable[[Packer], None]) -> None:
    """Register dataset packers: call `register(packer)` with a `Packer`.

    The packer's `name` becomes the KIND of `hat pack KIND`.
    """


@hookspec
def register_callbacks(register: Callable[[CallbackSpec], None]) -> None:
    """Register training callbacks: call `register(spec)` with a `CallbackSpec`.

    Recipes switch one on per stage with ``callbacks = [{name = "NAME", arg = value}]`` in the
    stage's table (``[float]``, ``[qat]``).
    """


@hookspec
def register_quant_schemes(register: Callable[[QuantSchemeSpec], None]) -> None:
    """Register quantization-aware-training schemes: call `register(spec)` with a `QuantSchemeSpec`.

    Recipes choose one with ``[quant] scheme = "NAME"`` (with `weight_bits`, `activation_bits`
    and per-layer overrides); docs/quant_schemes.md describes the scheme object and its fake quants.
    """


@hookspec
def register_marches(register: Callable[[MarchProfile], None]) -> None:
    """Register march profiles: call `register(profile)` with a `hatcli.march_profile.MarchProfile`.

    A profile is data (quantization rules, supported ops and their limits, the latency cost model);
    ship it as a TOML file in the plugin's package and register `read_march_file(path)`. Recipes
    choose it with ``[quant] march = "NAME"``, commands with ``--march NAME``; docs/marches.md
    describes every field.
    """


@hookspec
def register_runtimes(register: Callable[[RuntimeSpec], None]) -> None:
    """Register runtimes that run artifacts: call `register(spec)` with a `hatcli.runtime_spec.RuntimeSpec`.

    `hat compile` writes the artifact model each registered runtime reads (`spec.form`) and lists
    the runtimes in the manifest; `hat eval --stage deploy`, `hat infer`, `hat perf` and
    `hat benchmark` take ``--runtime NAME``. Register the runtime even when its library is not
    installed: `spec.missing()` then says how to install it, and hat reports that line.
    """
