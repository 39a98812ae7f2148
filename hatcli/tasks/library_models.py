"""Families that wrap a library's own model registry (timm, torchvision, ...): the shared part.

Such a family names an arch of the library's registry (`[model] arch`) and hands the recipe's
`options` to the library's builder (`timm.create_model(arch, **kwargs)`,
`torchvision.models.get_model(arch, **kwargs)`). What is the same for every library lives here:

- the build probe. A builder hands its keyword arguments down a chain of functions (entrypoint,
  config helper, model class), some of which swallow what they do not know in `**kwargs`, so
  neither the entrypoint's signature nor the model class's tells which keys are taken.
  `probe_build` builds the model on the meta device (no memory, no initialisation cost) while a
  profile hook watches the Python calls: an option counts as taken when a function called by one
  that carried it in its `**kwargs` has a parameter of that name and received exactly that value;
  an option that is never taken under its name but changes the built model (its `repr`) counts
  too. Then the model runs once on an input of the recipe's size, so an input it cannot take is
  known at recipe load. Whatever fails on the meta device is tried again on the CPU before it is
  reported, so a builder that reads tensor values while building is not refused for it.
- `check_options`, the option check built on it, with its one-line messages naming the library,
  the arch and the key (and `refuse_reserved` for the keys hat sets itself);
- `LibraryArchConfig`, a `[model]` table base with `arch`, `options` and the recipe's input size
  kept from the validation context, and `LibraryFamily`, the classification family that builds
  it, both driven by an `ArchLibrary` (the library's look-up, option check and builder).

A family keeps only what is its library's own: the registry look-up, the builder, the keyword
arguments hat itself sets (the input size, ...), the keys it refuses.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from hatcli.family import FamilyConfig
from hatcli.tasks.classification import ClassificationFamily

PROBE_CLASSES = 10
"""The class count the recipe-load probe builds with (the data's count is known only at training)."""

_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")
_MULTIPLE = re.compile(r"multiple values for (?:keyword )?argument '(\w+)'")


@dataclass
class Probe:
    """What building (and running) one model with some options showed."""

    model_class: type | None = None
    received: set[str] = field(default_factory=set)
    """The options some function of the builder received by name."""
    offered: list[str] = field(default_factory=list)
    """Parameter names of the library's functions that the options were handed to (hints for a typo)."""
    output_shape: tuple[int, ...] | None = None
    """The output's shape for one image of the asked input size (None: not run, or not a tensor)."""
    model_repr: str = ""
    error: BaseException | None = None
    """Why the build or the run failed (on the CPU too), or None."""
    refused_key: str | None = None
    """The option a builder refused outright (`unexpected keyword argument`), if that was the failure."""
    fixed_key: str | None = None
    """The option the arch sets itself (`multiple values for keyword argument`), if that was the failure."""
    stage: str = ""
    """`build` or `run`: where `error` happened."""


def _same(given: Any, got: Any) -> bool:
    """Whether a function received the option's value (a TOML array may arrive as a list or a tuple)."""
    if isinstance(given, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(given) == len(got) and all(_same(a, b) for a, b in zip(given, got))
    try:
        return bool(given == got)
    except Exception:  # a tensor, or a type whose == is not a plain truth value
        return False


def _library_of(build: Callable[..., Any]) -> str:
    """The top-level package `build` comes from (`timm`, `torchvision`), unwrapping a partial."""
    return (getattr(getattr(build, "func", build), "__module__", "") or "").split(".")[0]


def traced_build(build: Callable[..., torch.nn.Module], options: dict[str, Any], probe: Probe) -> torch.nn.Module:
    """Call `build(**options)`, recording on `probe` which options some function received by
    name (`received`) and which parameter names the library's functions offered them (`offered`),
    also when the build raises.

    A profile hook sees every Python call: a frame whose `**kwargs` holds an option carries it;
    a function called directly from a carrier with a parameter of the option's name, holding the
    option's value, received it. The parameters of the library's functions called from carriers
    are the names an option could have had (for "did you mean").
    """
    keys, library = set(options), _library_of(build)
    carriers: dict[Any, set[str]] = {}
    offered: dict[str, None] = {}

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        code = frame.f_code
        count = code.co_argcount + code.co_kwonlyargcount
        carried = carriers.get(frame.f_back)
        local: dict[str, Any] | None = None
        if carried:
            named = code.co_varnames[:count]
            if library and frame.f_globals.get("__name__", "").split(".")[0] == library:
                offered.update(dict.fromkeys(n for n in named if n != "self" and not n.startswith("_")))
            for key in carried.intersection(named):
                local = frame.f_locals if local is None else local
                if key in local and _same(options[key], local[key]):
                    probe.received.add(key)
        if code.co_flags & inspect.CO_VARKEYWORDS:
            local = frame.f_locals if local is None else local
            varkw = local.get(code.co_varnames[count + bool(code.co_flags & inspect.CO_VARARGS)])
            if isinstance(varkw, dict) and (held := keys.intersection(varkw)):
                carriers[frame] = held

    def entry(**kwargs: Any) -> torch.nn.Module:  # the first carrier: every option
        return build(**kwargs)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        return entry(**options)
    finally:
        sys.setprofile(previous)
        carriers.clear()
        probe.offered = list(offered)


def _run(model: torch.nn.Module, input_size: tuple[int, int], device: str) -> tuple[int, ...] | None:
    """Run `model` once in eval mode on one zero image of `input_size`; the output's shape (None: not a tensor)."""
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, *input_size, device=device))
    return tuple(out.shape) if isinstance(out, torch.Tensor) else None


def _attempt(build: Callable[..., torch.nn.Module], options: dict[str, Any], input_size: tuple[int, int] | None,
             device: str) -> Probe:
    """Build `build(**options)` on `device` (and run it when `input_size` is given); what happened."""
    probe = Probe(stage="build")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a library's deprecation notes are not the recipe's problem
        try:
            with torch.device(device):
                model = traced_build(build, options, probe)
        except Exception as exc:
            probe.error = exc
            if isinstance(exc, TypeError):
                refused, fixed = _UNEXPECTED.search(str(exc)), _MULTIPLE.search(str(exc))
                probe.refused_key = refused.group(1) if refused and refused.group(1) in options else None
                probe.fixed_key = fixed.group(1) if fixed and fixed.group(1) in options else None
            return probe
        probe.model_class, probe.model_repr = type(model), repr(model)
        if input_size is not None:
            probe.stage = "run"
            try:
                probe.output_shape = _run(model, input_size, device)
            except Exception as exc:
                probe.error = exc
                return probe
    probe.stage = ""
    return probe


def probe_build(build: Callable[..., torch.nn.Module], options: dict[str, Any],
                input_size: tuple[int, int] | None = None) -> Probe:
    """Build `build(**options)` (and run it on one zero image of `input_size` when given) on the
    meta device, or on the CPU where the meta device was what failed; say what happened."""
    probe = _attempt(build, options, input_size, "meta")
    if probe.error is None or probe.refused_key or probe.fixed_key:
        return probe
    return _attempt(build, options, input_size, "cpu")


def probe_baseline(build: Callable[..., torch.nn.Module], base: dict[str, Any]) -> Probe:
    """Build with only `base`, the keyword arguments hat itself sets (no recipe options), to learn
    the model class and to compare against; meta device first, the CPU where that failed."""
    probe = _attempt(build, base, None, "meta")
    if probe.error is not None and not (probe.refused_key or probe.fixed_key):
        probe = _attempt(build, base, None, "cpu")
    return probe


def unused_options(build: Callable[..., torch.nn.Module], base: dict[str, Any], options: dict[str, Any],
                   probe: Probe, baseline: Probe) -> list[str]:
    """The recipe `options` of a successful `probe` that no function received by name and that,
    each added alone to `base`, build the same model as `baseline`: the builder swallowed them."""
    unused = []
    for key in sorted(set(options) - probe.received):
        alone = _attempt(build, {**base, key: options[key]}, None, "meta")
        if alone.error is None and key not in alone.received and alone.model_repr == baseline.model_repr:
            unused.append(key)
    return unused


def named_parameters(model_class: type | None, skip: set[str]) -> list[str]:
    """The keyword parameters of the first `__init__` along `model_class`'s MRO that names any
    (a subclass that takes only `*args, **kwargs` hands them to its base), minus `skip`."""
    for klass in (model_class.__mro__ if model_class else ()):
        init = vars(klass).get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
        if names:
            return [n for n in names if n not in skip]
    return []


def one_line(exc: BaseException) -> str:
    """An exception as `Type: first line of its message`."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- the option check -------------------------------------------------------------------------------

def size_text(size: tuple[int, int]) -> str:
    """An input size (H, W) as `HxW`, as the messages write it."""
    return f"{size[0]}x{size[1]}"


def _with(options: dict[str, Any]) -> str:
    """` with options {...}` for a message, or nothing when there are none."""
    return f" with options {options}" if options else ""


def refuse_reserved(options: Mapping[str, Any], reserved: Mapping[str, str]) -> None:
    """Raise a one-line ValueError for the first key of `options` that is in `reserved` (the keys
    hat sets itself, or that the recipe has its own key for), saying why."""
    for key in options:
        if key in reserved:
            raise ValueError(f"`{key}` cannot be set here: {reserved[key]}")


def check_options(library: str, arch: str, options: dict[str, Any], input_size: tuple[int, int] | None, *,
                  build: Callable[..., torch.nn.Module], base: dict[str, Any], reserved: Collection[str] = (),
                  size_keys: Collection[str] = (), classes: int = PROBE_CLASSES,
                  shape_hint: str = "") -> dict[str, Any]:
    """Return `options` if `build(**base, **options)` takes every key and the network runs on
    `input_size` and gives one logit per class (`classes` of them: `build` is the library's builder
    for `arch` with that class count); else raise a one-line ValueError naming `library`, the arch
    and the key.

    `base` is what hat itself gives the builder (the input size where the arch needs one:
    `size_keys` are those keys); `reserved` are the keys the family refuses (left out of the
    "did you mean" hints); `shape_hint` ends the message for a wrong output shape. The family
    calls `refuse_reserved` first, before it works out `base`.
    """
    probe = probe_build(build, {**base, **options}, input_size)
    if probe.fixed_key:
        raise ValueError(f"{library} arch `{arch}` sets `{probe.fixed_key}` itself; remove it from the options "
                         f"or choose an arch with the value you want")
    if probe.refused_key:
        raise ValueError(not_taken(library, arch, probe.refused_key, probe_baseline(build, base).model_class,
                                   probe.offered, reserved))
    if probe.error is None and set(options) - probe.received:  # not received by name: swallowed, or used otherwise?
        baseline = probe_baseline(build, base)
        unused = unused_options(build, base, options, probe, baseline)
        if unused:
            raise ValueError(not_taken(library, arch, unused[0], baseline.model_class, probe.offered, reserved))
    if probe.error is not None:
        if probe.stage == "run":
            assert input_size is not None  # the network runs only on a given input size
            raise ValueError(f"{library} arch `{arch}`{_with(options)} cannot run on an input of "
                             f"{size_text(input_size)} (`data.input_size`): {one_line(probe.error)}")
        sized = (f" for an input of {size_text(input_size)} (`data.input_size`)"
                 if input_size and set(base) & set(size_keys) else "")
        raise ValueError(f"{library} cannot build `{arch}`{_with(options)}{sized}: {one_line(probe.error)}")
    expected = (1, classes)
    if input_size is not None and probe.output_shape != expected:
        raise ValueError(f"{library} arch `{arch}`{_with(options)} does not return one logit per class "
                         f"(output shape {probe.output_shape}, expected {expected}){shape_hint}")
    return options


def not_taken(library: str, arch: str, key: str, model_class: type | None, offered: list[str],
              reserved: Collection[str] = ()) -> str:
    """The error for an option `key` the arch does not take: the closest name its builder chain
    offered (none of `reserved`), and the keyword arguments of its model class."""
    names = named_parameters(model_class, set(reserved))
    # the class's own keywords first; the builder chain's other parameter names only when very close
    # (many are set by the arch's entrypoint itself, e.g. efficientnet's `width_mult` / `depth_mult`)
    close = (difflib.get_close_matches(key, [n for n in names if n != key], n=1)
             or difflib.get_close_matches(key, [n for n in offered if n not in reserved and n != key], n=1, cutoff=0.85))
    hint = f"; did you mean `{close[0]}`?" if close else ""
    takes = f"; its model class `{model_class.__name__}` takes {', '.join(names)}" if model_class and names else ""
    return f"{library} arch `{arch}` takes no keyword argument `{key}`{hint}{takes}"


# -- the [model] table ------------------------------------------------------------------------------

def context_input_size(info: ValidationInfo) -> tuple[int, int] | None:
    """The recipe's `data.input_size` (H, W) from the validation context hat gives a `[model]`
    table (None when the table is validated on its own, e.g. `tiny_config()`)."""
    size = (info.context or {}).get("input_size")
    return (int(size[0]), int(size[1])) if size is not None else None


class ArchLibrary(Protocol):
    """What a family's wrapper of one library provides (a module of four functions will do, as
    `hat_timm.arch` and `hat_torchvision.arch` are): the registry look-up, the option check (built on
    `check_options` above), the keyword arguments hat itself sets, and the builder."""

    def check_arch(self, arch: str) -> str:
        """Return `arch` if the library registers it, else raise a one-line ValueError."""

    def check_options(self, arch: str, options: dict[str, Any], input_size: tuple[int, int] | None) -> dict[str, Any]:
        """Return `options` if `arch`'s builder takes them and the network runs at `input_size`
        (None: not known), else raise a one-line ValueError."""

    def hat_kwargs(self, arch: str, input_size: tuple[int, int] | None) -> tuple[tuple[str, Any], ...]:
        """The keyword arguments hat itself gives `arch`'s builder for `input_size`, as (key, value) pairs."""

    def builder(self, arch: str, num_classes: int) -> Callable[..., torch.nn.Module]:
        """The library's builder of `arch`, untrained, with `num_classes` outputs; call it with keyword arguments."""


class LibraryArchConfig(FamilyConfig):
    """Base of a `[model]` table that names an arch of a library's registry (`arch`) and its
    builder's keyword arguments (`options`), keeping the recipe's `data.input_size` it was
    validated with (`input_size`).

    A subclass sets `library` (its `ArchLibrary`); the options are checked only once the arch is
    known good (else the arch's error is the one shown).
    """

    library: ClassVar[ArchLibrary]
    """The library's registry look-up, option check, hat's own keyword arguments and builder."""

    arch: str
    """A name of the library's registry; the family's builder builds it, untrained."""
    options: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    """Keyword arguments of the arch's builder, as the library names them; the keys hat sets itself
    are refused."""

    _input_size: tuple[int, int] | None = PrivateAttr(None)

    @field_validator("arch")
    @classmethod
    def _check_arch(cls, arch: str) -> str:
        return cls.library.check_arch(arch)

    @field_validator("options")
    @classmethod
    def _check_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "arch" not in info.data:  # the arch itself was refused: that error is the one to show
            return options
        return cls.library.check_options(info.data["arch"], options, context_input_size(info))

    @model_validator(mode="after")
    def _keep_input_size(self, info: ValidationInfo) -> LibraryArchConfig:
        self._input_size = context_input_size(info)
        return self

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The recipe's `data.input_size` this table was validated with (None: validated on its own)."""
        return self._input_size

    def build_kwargs(self) -> dict[str, Any]:
        """What the builder gets besides the arch and what the library's builder fixes: the
        library's `hat_kwargs` for this input size, then the options."""
        return {**dict(self.library.hat_kwargs(self.arch, self.input_size)), **self.options}


class LibraryFamily(ClassificationFamily):
    """Base of a classification family of any arch of a library's registry, by name, built
    untrained: a subclass sets `name`, `config_class` (a `LibraryArchConfig` subclass, whose
    `library` builds the network) and `tiny_arch`."""

    config_class: ClassVar[type[LibraryArchConfig]]
    min_input_size: ClassVar[tuple[int, int]] = (32, 32)
    """What the tiny config takes; an arch's own limit is checked when a recipe loads (the network
    runs once, on the meta device, at the recipe's `data.input_size`)."""
    tiny_arch: ClassVar[str]
    """The arch of `tiny_config()`: one that builds, quantizes and compiles in seconds at 32x32."""

    def tiny_config(self) -> FamilyConfig:
        """`tiny_arch` with no options, for tests that run every family."""
        return self.config_class(name=self.name, arch=self.tiny_arch)

    def build_float_model(self, config: FamilyConfig, num_classes: int) -> torch.nn.Module:
        """The library's builder of the arch with `num_classes` outputs, called with hat's own keyword
        arguments and the recipe's options (`config.build_kwargs()`): the arch untrained."""
        assert isinstance(config, self.config_class)
        return self.config_class.library.builder(config.arch, num_classes)(**config.build_kwargs())
