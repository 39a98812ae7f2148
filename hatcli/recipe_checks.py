"""Checks of a recipe beyond its schema, run by `load_recipe` before any stage starts.

`check_plain_values` refuses what TOML (or a `--set` value) can hold but no recipe key means:
non-finite numbers (`inf`, `nan`), dates, and text with a NUL or undecodable bytes. `check_registered_names` looks up the names that registries own (the
march, quantization schemes and their bit widths, transforms, callbacks, the packer of `[data.pack]`) and checks their arguments by building
the transforms and callbacks once (their constructors only store settings). Each error names
where the key was set (`locate(dotted)` gives `file:line` or `--set`), the dotted key and the
closest valid name.

Import direction: this module sits beside `recipe`, below `quant`, `data` and `plugins`, so it
imports the march names, the transform builders and the plugin registries inside the functions
that use them (read-only look-ups).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from typing import Any

from hatcli.errors import RecipeError, UsageError
from hatcli.recipe_schema import Recipe
from hatcli.registry import closest

Locate = Callable[[str], str]
"""`locate("data.mean[1]")` -> where that key was set: `file:line`, `file` or `--set`."""


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # a --set value from undecodable argv bytes holds lone surrogates
    except UnicodeEncodeError:
        return False
    return True


def _plain_value_errors(value: Any, dotted: str, locate: Locate) -> list[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{locate(dotted)}: `{dotted}`: must be a finite number (got {value})"]
    if isinstance(value, str) and ("\x00" in value or not _is_utf8(value)):
        return [f"{locate(dotted)}: `{dotted}`: text with a NUL or bytes that are not UTF-8 (got {value!r})"]
    if isinstance(value, (datetime.date, datetime.time)):
        return [f"{locate(dotted)}: `{dotted}`: a TOML date or time is not a recipe value (got {value}); "
                f"quote it if it is text"]
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _plain_value_errors(v, f"{dotted}.{k}" if dotted else k, locate)]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _plain_value_errors(v, f"{dotted}[{i}]", locate)]
    return []


def check_plain_values(data: dict[str, Any], locate: Locate) -> None:
    """Raise a RecipeError naming every non-finite number, date and unusable text anywhere in `data`."""
    errors = _plain_value_errors(data, "", locate)
    if errors:
        raise RecipeError("; ".join(errors))


def _unknown(what: str, name: str, names: list[str]) -> str:
    hint = closest(name, names)
    did_you_mean = f"; did you mean `{hint}`?" if hint else ""
    return f"unknown {what} `{name}`{did_you_mean} (available: {', '.join(names) or 'none installed'})"


def _check_march(recipe: Recipe, locate: Locate) -> None:
    from hatcli.quant.march import is_march_file, list_marches, load_march, march_names

    name = recipe.quant.march
    if is_march_file(name):
        try:
            profile = load_march(name)
        except UsageError as exc:
            raise RecipeError(f"{locate('quant.march')}: `quant.march`: {exc}") from None
    elif name not in (names := march_names()):
        raise RecipeError(f"{locate('quant.march')}: `quant.march`: {_unknown('march', name, names)}")
    else:
        profile = load_march(name)
    if recipe.quant.int16 and not profile.quant.allow_int16:
        allowed = ", ".join(m.name for m in list_marches() if m.quant.allow_int16)
        raise RecipeError(f"{locate('quant.int16')}: `quant.int16` asks for int16 but march `{name}` has no "
                          f"int16 activations; remove the patterns or choose a march that has them ({allowed})")


def _bits_error(spec: Any, kind: str, bits: int) -> str | None:
    low, high = getattr(spec, f"{kind}_bits")
    if low <= bits <= high:
        return None
    can = f"{low}" if low == high else f"{low} to {high}"
    return f"scheme `{spec.name}` trains {kind}s at {can} bits, not {bits}"


def _check_schemes(recipe: Recipe, locate: Locate) -> None:
    """Every scheme `[quant]` and `[[quant.layers]]` name exists, at bit widths it can train."""
    from hatcli.plugins import quant_schemes

    registry, quant = quant_schemes(), recipe.quant
    choices = [("quant", quant.scheme, quant.weight_bits, quant.activation_bits)]
    for index, rule in enumerate(quant.layers):
        choices.append((f"quant.layers[{index}]", rule.scheme or quant.scheme,
                        rule.weight_bits or quant.weight_bits, rule.activation_bits or quant.activation_bits))
    for where, name, weight_bits, activation_bits in choices:
        key = f"{where}.scheme"
        if name not in registry:
            raise RecipeError(f"{locate(key)}: `{key}`: {_unknown('quantization scheme', name, registry.names())}")
        spec = registry.get(name)
        for kind, bits in (("weight", weight_bits), ("activation", activation_bits)):
            problem = _bits_error(spec, kind, bits)
            if problem:
                raise RecipeError(f"{locate(f'{where}.{kind}_bits')}: `{where}.{kind}_bits`: {problem}; "
                                  f"set `{kind}_bits` within that range or choose another scheme")


def _check_pack_kind(recipe: Recipe, locate: Locate) -> None:
    from hatcli.plugins import packers

    pack = recipe.data.pack
    if pack is not None and pack.kind not in packers():
        raise RecipeError(f"{locate('data.pack.kind')}: `data.pack.kind`: "
                          f"{_unknown('packer', pack.kind, packers().names())}")


def _check_transforms(recipe: Recipe, locate: Locate) -> None:
    from hatcli.data.transforms import build_batch_transforms, build_transforms

    data = recipe.data
    for key, specs, build in (("data.train_transforms", data.train_transforms, build_transforms),
                              ("data.val_transforms", data.val_transforms, build_transforms),
                              ("data.batch_transforms", data.batch_transforms, build_batch_transforms)):
        try:
            build(specs, where=key)
        except RecipeError as exc:  # the message starts with the entry's key, e.g. `data.val_transforms[1].size`
            raise RecipeError(f"{locate(key)}: {exc}") from None
        except (Exception, SystemExit) as exc:  # a plugin's transform factory may fail in any way
            raise RecipeError(f"{locate(key)}: {key}: cannot build these transforms "
                              f"({type(exc).__name__}: {exc}); check their arguments") from None


def build_callbacks(specs: list[dict[str, Any]], where: str, locate: Locate = lambda key: "recipe") -> list[Any]:
    """Build the plugin callbacks a stage's `callbacks` list names; errors name the key (`where[i]`)."""
    from hatcli.plugins import callbacks

    available = callbacks()
    built = []
    for i, spec in enumerate(specs):
        key = f"{where}[{i}]"
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            raise RecipeError(f"{locate(key)}: {key}: expected a table like {{name = \"early_stopping\"}}, "
                              f"got {spec!r}")
        if name not in available:
            raise RecipeError(f"{locate(key)}: {key}.name: {_unknown('callback', name, available.names())}")
        args = {k: v for k, v in spec.items() if k != "name"}
        try:
            built.append(available.get(name).factory(**args))
        except (Exception, SystemExit) as exc:  # a plugin's constructor may refuse its arguments in any way
            raise RecipeError(f"{locate(key)}: {key}: bad arguments for callback `{name}`: {exc}") from None
    return built


def _check_callbacks(recipe: Recipe, locate: Locate) -> None:
    for stage, specs in (("float", recipe.float_.callbacks), ("qat", recipe.qat.callbacks)):
        build_callbacks(specs, f"{stage}.callbacks", locate)


def check_registered_names(recipe: Recipe, locate: Locate) -> None:
    """Raise a RecipeError for an unknown march, packer, transform or callback, or bad arguments to them."""
    _check_march(recipe, locate)
    _check_schemes(recipe, locate)
    _check_pack_kind(recipe, locate)
    _check_transforms(recipe, locate)
    _check_callbacks(recipe, locate)


def check_float_start(recipe: Recipe, weights: str | None, locate: Locate) -> None:
    """`float.epochs = 0` trains nothing: the float stage is then `[model] weights`, which must be set."""
    if recipe.float_.epochs == 0 and weights is None:
        raise RecipeError(f"{locate('float.epochs')}: `float.epochs = 0` trains nothing, so the float stage needs "
                          f"weights to be: set `[model] weights = \"my_float.pth\"` (or import a file as the float "
                          f"stage with `hat train RECIPE --stage calibration --from my_float.pth`)")
