"""TOML recipe -> a typed, validated Recipe.

A recipe may `extends = "base.toml"` (a path relative to the recipe; chains allowed) and is deep
merged over its base; `--set a.b=value` overrides are applied last, each value read as a TOML
value (a bare word that is not valid TOML is taken as a string). Validation errors name the
file, the dotted key, the line where known and the closest valid key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from hatcli.errors import RecipeError
from hatcli.family import FamilyConfig, ModelFamily
from hatcli.recipe_schema import Recipe
from hatcli.registry import closest

SET_SOURCE = "--set"


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


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: invalid TOML: {exc}") from None


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


def _load_chain(path: Path, origin: dict[str, Path | str], seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise RecipeError(f"recipe `extends` loops: {chain}")
    data = _read_toml(path)
    parent = data.pop("extends", None)
    if parent is None:
        base: dict[str, Any] = {}
    elif not isinstance(parent, str):
        raise RecipeError(f"{path}: `extends` must be a path string, got {parent!r}")
    else:
        base = _load_chain(path.parent / parent, origin, (*seen, path))
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
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], origin: dict[str, Path | str]) -> dict:
    """Apply `--set` overrides to a merged recipe dict."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
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
    for number, line in enumerate(text.splitlines(), start=1):
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


def _where(dotted: str, origin: dict[str, Path | str], fallback: Path) -> str:
    parts = dotted.split(".")
    source: Path | str = fallback
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in origin:
            source = origin[".".join(parts[:i])]
            break
    if source == SET_SOURCE:
        return SET_SOURCE
    line = find_key_line(Path(source).read_text(encoding="utf-8"), dotted)
    return f"{source}:{line}" if line else str(source)


def _raise_validation(exc: ValidationError, schema: type[BaseModel], prefix: tuple[str, ...],
                      origin: dict[str, Path | str], path: Path) -> None:
    messages = []
    for err in exc.errors():
        loc = prefix + tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc)
        where = _where(dotted, origin, path)
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(schema, tuple(str(p) for p in err["loc"][:-1]))
            hint = closest(loc[-1], valid)
            suggestion = f"; did you mean `{hint}`?" if hint else f"; valid keys: {', '.join(valid)}"
            messages.append(f"{where}: unknown key `{dotted}`{suggestion}")
        elif err["type"] == "missing":
            messages.append(f"{where}: missing required key `{dotted}`")
        else:
            got = err.get("input")
            messages.append(f"{where}: `{dotted}`: {err['msg']} (got {got!r})")
    raise RecipeError("; ".join(messages))


# -- entry point ---------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Load, merge, override and validate the recipe at `path` (including its `[model]` table)."""
    from hatcli.plugins import families

    path = Path(path)
    origin: dict[str, Path | str] = {}
    data = _load_chain(path, origin)
    data = apply_overrides(data, overrides or [], origin)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        _raise_validation(exc, Recipe, (), origin, path)
    model_table = data.get("model", {})
    name = model_table.get("name")
    if not isinstance(name, str):
        raise RecipeError(f"{_where('model', origin, path)}: `model.name` must name a model family "
                          f"(installed: {', '.join(families().names()) or 'none'})")
    try:
        family = families().get(name)
    except Exception as exc:
        raise RecipeError(f"{_where('model.name', origin, path)}: {exc}") from None
    try:
        model_config = family.config_class.model_validate(model_table)
    except ValidationError as exc:
        _raise_validation(exc, family.config_class, ("model",), origin, path)
    resolved = recipe.model_dump(mode="json", by_alias=True)
    resolved["model"] = model_config.model_dump(mode="json")
    return LoadedRecipe(recipe=recipe, model=model_config, family=family, resolved=resolved, path=path)
