"""TOML recipe -> a typed, validated Recipe.

A recipe may `extends = "base.toml"` (a path relative to the recipe; chains allowed) and is deep
merged over its base, except the tables it lists in `replace = ["model", ...]`, which replace the
base's; `[model]` is replaced without asking when its `name` (the family) changes. `--set a.b=value`
overrides are applied last, each value read as a TOML value (a bare word that is not valid TOML is
taken as a string). The result is validated whole before anything runs: the schema in strict mode
(a value keeps its TOML type), the family's `[model]` table, then `hatcli.recipe_checks`. Every
error names the file, the dotted key, the line where known and the closest valid key.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import tomli_w
from pydantic import BaseModel, ValidationError

from hatcli.errors import RecipeError
from hatcli.family import FamilyConfig, ModelFamily
from hatcli.recipe_checks import check_float_start, check_plain_values, check_registered_names
from hatcli.recipe_schema import Recipe
from hatcli.registry import closest

SET_SOURCE = "--set"
M = TypeVar("M", bound=BaseModel)


@dataclass
class LoadedRecipe:
    """A validated recipe with where it came from and its family."""

    recipe: Recipe
    model: FamilyConfig
    family: ModelFamily
    resolved: dict[str, Any]
    path: Path

    @property
    def sha256(self) -> str:
        """Hash of the resolved recipe, for checkpoints and up-to-date checks."""
        return recipe_hash(self.resolved)

    def section_hash(self, *keys: str) -> str:
        """Hash of only the named top-level sections (what one stage depends on)."""
        return recipe_hash({k: self.resolved.get(k) for k in keys})

    def to_toml(self) -> str:
        """Return the resolved recipe as TOML text."""
        return dump_toml(self.resolved)

    @property
    def run_dir(self) -> Path:
        """The folder of this recipe's outputs: `<work_dir>/<task>`."""
        return Path(self.recipe.work_dir) / self.recipe.task


def recipe_hash(data: Any) -> str:
    """Return a stable sha256 of a JSON-able structure."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def dump_toml(data: dict[str, Any]) -> str:
    """Serialize a resolved recipe (None values dropped: TOML has no null)."""
    return tomli_w.dumps(_drop_none(data))


# -- reading and merging -------------------------------------------------------------------

MAX_RECIPE_BYTES = 1 << 20
"""A recipe is a few kilobytes; anything over 1 MiB is refused before it is read."""

FAMILY_TABLE = "model"
"""The table replaced instead of merged when its `name` (the model family) changes."""


def _read_text(path: Path) -> str:
    """The UTF-8 text of the recipe file `path`; every way it can fail is one RecipeError."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a special file (FIFO, socket or device)"
        raise RecipeError(f"{path}: is {kind}, not a file; give the path of a recipe TOML file")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: too large for a recipe (over {MAX_RECIPE_BYTES} bytes); is it the right file?")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark some editors write
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          f"save the recipe as UTF-8") from None


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    """The text and the parsed tables of the recipe file `path`."""
    text = _read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        if m := re.search(r"\s*\(at line (\d+), column \d+\)$", message):
            raise RecipeError(f"{path}:{m.group(1)}: invalid TOML: {message[:m.start()]}") from None
        raise RecipeError(f"{path}: invalid TOML: {message}") from None
    except RecursionError:
        raise RecipeError(f"{path}: invalid recipe: arrays or tables nested too deeply") from None
    _check_depth(data, str(path))
    return text, data


MAX_DEPTH = 32
"""Deepest nesting of tables and arrays a recipe may use (real ones use under 6)."""


def _check_depth(value: Any, source: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH (merging and validation recurse over it)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RecipeError(f"{source}: invalid recipe: arrays or tables nested more than {MAX_DEPTH} deep")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)


def _merge(base: dict, over: dict, origin: dict[str, Path | str], source: Path | str, prefix: str = "") -> dict:
    out = dict(base)
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origin, source, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
            _mark(value, dotted, origin, source)
    return out


def _mark(value: Any, dotted: str, origin: dict[str, Path | str], source: Path | str) -> None:
    origin[dotted] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(v, f"{dotted}.{k}", origin, source)


def _drop_table(data: dict, dotted: str, origin: dict[str, Path | str]) -> None:
    """Remove the table at `dotted` from `data`, and where its keys came from."""
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(last, None)
    for key in [k for k in origin if k == dotted or k.startswith(dotted + ".")]:
        del origin[key]


def _tables(data: dict, prefix: str = "") -> list[str]:
    """Dotted names of every table in `data`."""
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out += [f"{prefix}{key}", *_tables(value, f"{prefix}{key}.")]
    return out


def _has_table(data: dict, dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, dict)


def _replaced_tables(value: Any, data: dict, path: Path, text: str) -> list[str]:
    """The tables a recipe's `replace = [...]` names, checked against the tables it sets."""
    where = f"{path}:{find_key_line(text, 'replace') or 1}"
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{where}: `replace` must be a list of dotted table names, e.g. replace = [\"model\"]; "
                          f"got {value!r}")
    for dotted in value:
        if not _has_table(data, dotted):
            hint = closest(dotted, _tables(data))
            did_you_mean = f"; did you mean `{hint}`?" if hint else ""
            raise RecipeError(f"{where}: `replace` names `{dotted}`, which is not a table of this recipe"
                              f"{did_you_mean} (a replaced table is the one this file gives)")
    return list(value)


def _family_changes(base: dict, over: dict) -> bool:
    """Whether `over` names another model family than `base` (then `[model]` is replaced)."""
    old, new = base.get(FAMILY_TABLE), over.get(FAMILY_TABLE)
    return (isinstance(old, dict) and isinstance(new, dict) and "name" in old and "name" in new
            and old["name"] != new["name"])


def _load_chain(path: Path, origin: dict[str, Path | str], seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise RecipeError(f"recipe `extends` loops: {chain}")
    text, data = _read_toml(path)
    parent = data.pop("extends", None)
    replace = _replaced_tables(data.pop("replace"), data, path, text) if "replace" in data else []
    if parent is None:
        base: dict[str, Any] = {}
    elif not isinstance(parent, str):
        raise RecipeError(f"{path}:{find_key_line(text, 'extends') or 1}: `extends` must be a path string, "
                          f"got {parent!r}")
    else:
        base_path = path.parent / parent
        if not base_path.exists():
            raise RecipeError(f"{path}:{find_key_line(text, 'extends') or 1}: `extends = {parent!r}` names "
                              f"{base_path}, which does not exist")
        base = _load_chain(base_path, origin, (*seen, path))
    if _family_changes(base, data) and FAMILY_TABLE not in replace:
        replace.append(FAMILY_TABLE)
    for dotted in replace:
        _drop_table(base, dotted, origin)
    return _merge(base, data, origin, path)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into its key path and TOML-parsed value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", key):
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE with a dotted KEY, e.g. --set float.epochs=3")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as a path: taken as a string
    except RecursionError:
        raise RecipeError(f"--set {key}: arrays or tables nested too deeply") from None
    _check_depth(value, f"--set {key}")
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], origin: dict[str, Path | str]) -> dict:
    """Apply `--set` overrides to a merged recipe dict.

    A `model.name` override that switches family is applied first and starts `[model]` afresh
    (as `extends` does), so the other `model.*` overrides apply to the new family in any order.
    """
    data = copy.deepcopy(data)
    parsed = [(text, *parse_override(text)) for text in overrides]
    parsed.sort(key=lambda item: item[1] != [FAMILY_TABLE, "name"])  # stable: model.name first
    for text, keys, value in parsed:
        if keys == [FAMILY_TABLE, "name"] and _family_changes(data, {FAMILY_TABLE: {"name": value}}):
            _drop_table(data, FAMILY_TABLE, origin)
        node = data
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                where = ".".join(keys[: i + 1])
                raise RecipeError(f"--set {text}: `{where}` is a value, not a table")
            node = child
        node[keys[-1]] = value
        _mark(value, ".".join(keys), origin, SET_SOURCE)
    return data


# -- validation errors -----------------------------------------------------------------------


def find_key_line(text: str, dotted: str) -> int | None:
    """Return the 1-based line where `dotted` is set in TOML `text`, if it can be found."""
    table: list[str] = []
    header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    assign = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")
    for number, line in enumerate(text.split("\n"), start=1):
        if m := header.match(line):
            table = [p.strip().strip("\"'") for p in m.group(1).split(".")]
            if ".".join(table) == dotted:
                return number
            continue
        if m := assign.match(line):
            key = [p.strip().strip("\"'") for p in m.group(1).split(".")]
            if ".".join(table + key) == dotted:
                return number
    return None


def _valid_keys(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """Field names (with aliases) of the table at `loc` inside `model`."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields:
            return []
        field = next((f for n, f in fields.items() if part in (n, f.alias)), None)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return [f.alias or n for n, f in current.model_fields.items()]


def dotted_key(loc: tuple[str | int, ...] | list[str | int]) -> str:
    """`("data", "mean", 1)` -> `data.mean[1]`: a key path as the recipe spells it."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def where(dotted: str, origin: dict[str, Path | str], fallback: Path) -> str:
    """`file:line` (or `file`, or `--set`) where the key `dotted` (e.g. `data.mean[1]`) was set.

    The line is that of the key itself or, when it is not written out (an item of a list, a
    missing key), of the nearest table or key above it.
    """
    parts = dotted.split("[", 1)[0].split(".")
    prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    source: Path | str = next((origin[p] for p in prefixes if p in origin), fallback)
    if source == SET_SOURCE:
        return SET_SOURCE
    text = _read_text(Path(source))
    line = next((n for key in (dotted, *prefixes) if (n := find_key_line(text, key))), None)
    return f"{source}:{line}" if line else str(source)


_EXPECTED = re.compile(r"'([^']*)'")


def _error_message(err: dict[str, Any], schema: type[BaseModel], prefix: tuple[str, ...],
                   origin: dict[str, Path | str], path: Path) -> str:
    """One pydantic error as `file:line: message` with the dotted key and, where it helps, a hint."""
    loc = (*prefix, *err["loc"])
    dotted = dotted_key(loc)
    at = where(dotted, origin, path)
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(schema, tuple(str(p) for p in err["loc"][:-1]))
        hint = closest(str(loc[-1]), valid)
        suggestion = f"; did you mean `{hint}`?" if hint else f"; valid keys: {', '.join(valid)}"
        return f"{at}: unknown key `{dotted}`{suggestion}"
    if err["type"] == "missing":
        return f"{at}: missing required key `{dotted}`"
    got = err.get("input")
    text = err["msg"].removeprefix("Value error, ")  # our validators' own messages
    message = f"{at}: `{dotted}`: {text} (got {got!r})"
    if err["type"] == "literal_error" and isinstance(got, str):
        hint = closest(got, _EXPECTED.findall(str(err.get("ctx", {}).get("expected", ""))))
        message += f"; did you mean `{hint}`?" if hint else ""
    if err["type"] == "string_type" and at == SET_SOURCE:
        message += f"; a --set value is read as TOML: quote it to give text, e.g. --set '{dotted}=\"{got}\"'"
    return message


def _raise_validation(exc: ValidationError, schema: type[BaseModel], prefix: tuple[str, ...],
                      origin: dict[str, Path | str], path: Path) -> NoReturn:
    raise RecipeError("; ".join(_error_message(err, schema, prefix, origin, path) for err in exc.errors()))


def _validate(schema: type[M], data: dict[str, Any], prefix: tuple[str, ...],
              origin: dict[str, Path | str], path: Path, context: dict[str, Any] | None = None) -> M:
    """Validate `data` against `schema` in strict mode: a value keeps its TOML type.

    Validated as JSON, so a TOML array fills a tuple and a whole number a float, while a string is
    never a number and a boolean never an integer (`--set float.epochs=true` is an error).
    `context` is pydantic's validation context (validators read it as `info.context`).
    """
    try:
        return schema.model_validate_json(json.dumps(data), strict=True, context=context)
    except ValidationError as exc:
        _raise_validation(exc, schema, prefix, origin, path)


def _resolve_weights(model_config: FamilyConfig, source: Path | str | None) -> FamilyConfig:
    """`[model] weights` as an absolute path: relative to the recipe file that set it (as `extends`
    is), to the working directory when `--set` gave it."""
    weights = getattr(model_config, "weights", None)
    if weights is None:
        return model_config
    path = Path(weights).expanduser()
    if not path.is_absolute():
        base = Path.cwd() if source in (None, SET_SOURCE) else Path(source).parent
        path = base / path
    return model_config.model_copy(update={"weights": str(path.resolve())})


# -- entry point ---------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Load, merge, override and validate the recipe at `path` (including its `[model]` table).

    Everything is checked here, before any stage runs: the schema, the family's `[model]` table,
    plain values (finite numbers, no dates) and the names that registries own (march, transforms,
    callbacks, packer) with their arguments.
    """
    from hatcli.plugins import families

    path = Path(path)
    origin: dict[str, Path | str] = {}
    data = _load_chain(path, origin)
    data = apply_overrides(data, overrides or [], origin)
    locate = functools.partial(where, origin=origin, fallback=path)
    check_plain_values(data, locate)
    recipe = _validate(Recipe, data, (), origin, path)
    model_table = data["model"]
    name = model_table.get("name")
    if not isinstance(name, str):
        raise RecipeError(f"{locate('model')}: `model.name` must name a model family "
                          f"(installed: {', '.join(families().names()) or 'none'})")
    try:
        family = families().get(name)
    except Exception as exc:
        raise RecipeError(f"{locate('model.name')}: `model.name`: {exc}") from None
    # the family's validators may need the input size (an arch of a fixed input size): `info.context`
    model_config = _validate(family.config_class, model_table, (FAMILY_TABLE,), origin, path,
                             context={"input_size": tuple(recipe.data.input_size)})
    # again on the validated values: a whole number too large for a float became inf
    check_plain_values({**recipe.model_dump(by_alias=True), FAMILY_TABLE: model_config.model_dump()}, locate)
    check_registered_names(recipe, locate)
    model_config = _resolve_weights(model_config, origin.get(f"{FAMILY_TABLE}.weights"))
    check_float_start(recipe, getattr(model_config, "weights", None), locate)
    resolved = recipe.model_dump(mode="json", by_alias=True)
    resolved["model"] = model_config.model_dump(mode="json")
    if resolved["model"].get("weights", "") is None:
        del resolved["model"]["weights"]  # unset: the resolved recipe (and every fingerprint) as before the key
    return LoadedRecipe(recipe=recipe, model=model_config, family=family, resolved=resolved, path=path)
