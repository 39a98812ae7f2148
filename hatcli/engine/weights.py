"""Weights from outside hat, read without running code and mapped onto a family's float model.

A weights file is a plain PyTorch state dict (`torch.save(model.state_dict(), "x.pth")`), a
training script's checkpoint that holds one under `state_dict`, `model_state_dict` or `model`, a
`.safetensors` file, or a hat checkpoint. `.pt` / `.pth` files load with
`torch.load(weights_only=True)`: a file that needs full unpickling (a whole pickled model, an
`argparse.Namespace` beside the weights) is refused with a message saying how to save weights only.

`map_weights` copies the tensors onto the model, BatchNorm buffers included, and returns a
`LoadReport`. The rules, in order:

- a `module.` (DataParallel / DDP), `model.` (Lightning and other wrappers) or `_orig_mod.`
  (`torch.compile`) prefix is stripped from the file's keys when that makes more of them fit;
- a classifier head trained for another class count (the model's first dimension is the data's
  class count, the file's is not, the other dimensions agree) is dropped and keeps the model's fresh
  initialisation: reported as ``head replaced``;
- any other shape that does not fit is an error naming the file, the key and both shapes;
- keys the model does not have are ignored and reported as unexpected;
- tensors the model has and the file lacks keep their initialisation and are reported as missing
  when float training follows; when it does not (nothing would ever train them) they are an error.
  A missing `num_batches_tracked` never matters and is not reported;
- a file none of whose tensors fits the model is an error.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hatcli.errors import UsageError
from hatcli.stages import file_sha256

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
"""Where a training script's checkpoint keeps the state dict, tried in this order."""

PREFIXES = ("module.", "model.", "_orig_mod.")
"""Key prefixes that wrappers add (DataParallel / DDP, Lightning-style `self.model`, torch.compile)."""

SAVE_HINT = 'save the weights alone with `torch.save(model.state_dict(), "{name}")`'


@dataclass
class WeightsFile:
    """The tensors of one weights file and what it was."""

    path: Path
    format: str
    """``state dict``, ``safetensors`` or ``hat checkpoint``."""
    tensors: dict[str, torch.Tensor]
    sha256: str
    hat_stage: str | None = None
    """The stage a hat checkpoint belongs to (`float`, `calibration`, `qat`); None otherwise."""


@dataclass
class LoadReport:
    """What `map_weights` did: how many tensors it copied and what did not fit."""

    loaded: int
    total: int
    """Tensors (parameters and buffers) the model has."""
    num_classes: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    head: list[dict[str, Any]] = field(default_factory=list)
    """One entry per head tensor replaced: `key`, `checkpoint` shape, `model` shape."""
    stripped_prefix: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The report as plain values, for a stage record."""
        return asdict(self)

    def notes(self) -> list[str]:
        """One sentence per tensor that did not fit (empty: every tensor of both fitted)."""
        out = [f"{h['key']}: checkpoint {h['checkpoint']}, model {h['model']}: head replaced "
                f"({self.num_classes} classes in the data; freshly initialised)" for h in self.head]
        if self.missing:
            out.append(f"{len(self.missing)} tensor(s) of the model not in the file, kept at their "
                       f"initialisation: {_listing(self.missing)}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} tensor(s) of the file the model does not have, ignored: "
                       f"{_listing(self.unexpected)}")
        return out


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# -- reading -------------------------------------------------------------------------------------


def _is_tensor_dict(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value) and all(isinstance(k, str) for k in value)
            and all(isinstance(v, torch.Tensor) for v in value.values()))


def _load_torch(path: Path, label: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found:
            raise UsageError(f"{label}: {path}: cannot be read without running code: it holds a pickled "
                             f"`{found.group(1)}`, not only tensors; hat reads weights only: "
                             f"{SAVE_HINT.format(name=path.name)}") from None
        raise UsageError(f"{label}: {path}: not a PyTorch weights file (it does not unpickle as tensors); give a "
                         f"state dict saved with torch.save (.pt / .pth) or a .safetensors file") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise UsageError(f"{label}: {path}: not a PyTorch weights file ({str(exc).splitlines()[0][:160]}); "
                         f"give a state dict saved with torch.save (.pt / .pth) or a .safetensors file") from None


def _load_safetensors(path: Path, label: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{label}: {path}: not a readable .safetensors file ({str(exc).splitlines()[0][:160]})") from None


def read_weights(path: Path, label: str = "--from") -> WeightsFile:
    """Read the weights file `path` (`label` says where it was given: `--from`, `model.weights`).

    UsageError (exit 2) for a file that is missing, needs full unpickling, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{label}: weights file not found: {path}")
    if path.suffix == ".safetensors":
        return WeightsFile(path, "safetensors", _load_safetensors(path, label), file_sha256(path))
    loaded = _load_torch(path, label)
    sha = file_sha256(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("stage"), str) and _is_tensor_dict(loaded.get("model")) \
            and "num_classes" in loaded:
        return WeightsFile(path, "hat checkpoint", loaded["model"], sha, hat_stage=loaded["stage"])
    if _is_tensor_dict(loaded):
        return WeightsFile(path, "state dict", loaded, sha)
    if isinstance(loaded, dict):
        for key in WRAPPER_KEYS:
            if _is_tensor_dict(loaded.get(key)):
                return WeightsFile(path, f"state dict (under `{key}`)", loaded[key], sha)
        keys = ", ".join(f"`{k}`" for k in list(loaded)[:8])
        raise UsageError(f"{label}: {path}: holds no state dict: expected a dict of tensors, or one under "
                         f"{' / '.join(WRAPPER_KEYS)} (its keys: {keys or 'none'}); "
                         f"{SAVE_HINT.format(name=path.name)}")
    raise UsageError(f"{label}: {path}: holds a {type(loaded).__name__}, not a state dict; "
                     f"{SAVE_HINT.format(name=path.name)}")


# -- mapping -------------------------------------------------------------------------------------


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items()}


def _align_prefix(tensors: dict[str, torch.Tensor], target: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """The file's tensors with wrapper prefixes stripped while that makes more keys fit the model."""
    stripped = ""
    best = sum(k in target for k in tensors)
    improved = True
    while improved and best < len(target):
        improved = False
        for prefix in PREFIXES:
            candidate = _strip(tensors, prefix)
            fits = sum(k in target for k in candidate)
            if fits > best:
                tensors, best, improved, stripped = candidate, fits, True, stripped + prefix
                break
    return tensors, stripped


def _is_head(saved: torch.Size, wanted: torch.Size, num_classes: int) -> bool:
    """A classifier tensor trained for another class count: first dimension the data's class count
    in the model and not in the file, every other dimension the same."""
    return (len(saved) == len(wanted) >= 1 and wanted[0] == num_classes != saved[0]
            and tuple(saved[1:]) == tuple(wanted[1:]))


def map_weights(model: torch.nn.Module, weights: WeightsFile, num_classes: int, trains_after: bool,
                label: str = "--from") -> LoadReport:
    """Copy `weights` onto `model` in place (parameters and buffers) by the rules of this module's
    docstring; `trains_after` says whether float training follows (missing tensors are then a warning,
    else an error). Raises UsageError before the model is changed when the file does not fit."""
    target = model.state_dict()
    tensors, prefix = _align_prefix(weights.tensors, target)
    where = f"{label}: {weights.path}"
    mapped: dict[str, torch.Tensor] = {}
    head: list[dict[str, Any]] = []
    wrong: list[tuple[str, list[int], list[int]]] = []
    unexpected: list[str] = []
    for key, value in tensors.items():
        if key not in target:
            unexpected.append(key)
        elif value.shape == target[key].shape:
            mapped[key] = value
        elif _is_head(value.shape, target[key].shape, num_classes):
            head.append({"key": key, "checkpoint": list(value.shape), "model": list(target[key].shape)})
        else:
            wrong.append((key, list(value.shape), list(target[key].shape)))
    if wrong:
        key, saved, wanted = wrong[0]
        more = f" (and {len(wrong) - 1} more key(s))" if len(wrong) > 1 else ""
        raise UsageError(f"{where}: `{key}` is {saved} in the file but {wanted} in the model the recipe's [model] "
                         f"table builds{more}; set [model] to the network that was saved (width, depth, ...)")
    if not mapped:
        raise UsageError(f"{where}: none of its {len(tensors)} tensors fits the model (the file has e.g. "
                         f"{_listing(list(tensors), 3)}; the model expects e.g. {_listing(list(target), 3)}); "
                         f"is it a network of this family?")
    replaced = {h["key"] for h in head}
    missing = [k for k in target if k not in mapped and k not in replaced and not k.endswith("num_batches_tracked")]
    if missing and not trains_after:
        raise UsageError(f"{where}: lacks {len(missing)} of the model's tensors ({_listing(missing, 5)}) and no "
                         f"training follows to learn them; give the whole network's weights, or start float "
                         f"training from these with `[model] weights`")
    model.load_state_dict(mapped, strict=False)
    return LoadReport(loaded=len(mapped), total=len(target), num_classes=num_classes, missing=missing,
                      unexpected=unexpected, head=head, stripped_prefix=prefix)
