"""Optimizers and per-iteration learning-rate schedules built from a recipe table.

The LR of a parameter group at iteration `step` (0-based, counted over the whole stage) is
`group["initial_lr"] * lr_factor(cfg, step, steps_per_epoch, epochs)`, where the factor is

    warmup(step) * decay(s)

* `warmup(step)`: over `W` warm-up iterations (`cfg.warmup_iters`, or `cfg.warmup_epochs *
  steps_per_epoch` rounded), `warmup_factor + (1 - warmup_factor) * (step + 1) / W` for `step < W`
  (exactly 1 at `step = W - 1`), then 1. Always per iteration.
* `s` is `step`, or with `cfg.by_epoch` the first iteration of `step`'s epoch, so the decay is
  piecewise constant within an epoch.
* `decay(s)`, with `p = clamp((s - W) / (total - W), 0, 1)` the fraction of the post-warm-up
  iterations done (`total = steps_per_epoch * epochs`) and `m = cfg.min_lr_factor`:
  `cosine`: `m + (1 - m) * (1 + cos(pi * p)) / 2`; `poly`: `m + (1 - m) * (1 - p) ** power`;
  `step`: `gamma ** (number of milestones <= epoch of s)`; `constant`: 1;
  `cosine_restarts` (SGDR, Loshchilov & Hutter 2017): `m + (1 - m) * (1 + cos(pi * t / T_i)) / 2`,
  where cycle `i = 0, 1, ...` lasts `T_i = max(1, round(restart_epochs * restart_mult ** i *
  steps_per_epoch))` iterations, the cycles follow each other from the end of warm-up, and `t` is
  the number of iterations between the start of the cycle that `s` falls in and `s` (before the
  end of warm-up, `t = 0`). The factor is 1 at each restart and approaches `m` at the end of each
  cycle (it equals `m` at `t = T_i`, which is the next cycle's `t = 0`).

`cosine` and `poly` therefore start at 1 right after warm-up and reach `m` at `step = total`,
the end of training (the last iteration, `total - 1`, trains at slightly more than `m * lr`).

Parameter groups (`param_groups`): without `param_rules` one group, or a decay and a no-decay
group; with them, one group per distinct (base LR, weight decay) the rules give. Each group's
`initial_lr` is its base LR, which `LrSchedule.apply` multiplies by the factor above.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import math
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

import torch

from hatcli.errors import RecipeError
from hatcli.recipe_schema import RESTART_DEFAULTS, OptimizerConfig, ParamRule


def _no_decay(param: torch.Tensor) -> bool:
    """Biases, norm weights, PReLU slopes, scalars: everything that is not a matrix or kernel."""
    return param.ndim <= 1


def _split(params: list[torch.nn.Parameter], cfg: OptimizerConfig,
           exempt: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """One group, or a decay and a no-decay group when `cfg.weight_decay_weights_only` (or when
    some parameters, by `id` in `exempt`, must never decay)."""
    if not cfg.weight_decay_weights_only and (cfg.weight_decay == 0 or not any(id(p) in exempt for p in params)):
        return [{"params": params, "weight_decay": cfg.weight_decay, "initial_lr": cfg.lr}]
    skip = (lambda p: id(p) in exempt or _no_decay(p)) if cfg.weight_decay_weights_only else (lambda p: id(p) in exempt)
    decay = [p for p in params if not skip(p)]
    no_decay = [p for p in params if skip(p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "initial_lr": cfg.lr},
              {"params": no_decay, "weight_decay": 0.0, "initial_lr": cfg.lr}]
    return [g for g in groups if g["params"]]


def _close_names(pattern: str, names: list[str], n: int = 3) -> list[str]:
    """Up to `n` parameter names that look like `pattern`: compared whole and by their last
    dotted parts (as many as the pattern has), wildcards and all."""
    depth = pattern.count(".") + 1
    score = {name: max(difflib.SequenceMatcher(None, pattern, text).ratio()
                       for text in (name, ".".join(name.split(".")[-depth:])))
             for name in names}
    return [name for name in sorted(names, key=lambda name: -score[name]) if score[name] >= 0.5][:n]


def _check_rules(rules: list[ParamRule], firsts: list[int | None], names: list[str], where: str) -> None:
    """Raise a RecipeError for a rule that matches no parameter, or only ones that earlier rules take."""
    for index, rule in enumerate(rules):
        key = f"`{where}.param_rules[{index}]` (pattern `{rule.pattern}`)"
        if index in firsts:
            continue
        hits = [name for name in names if fnmatchcase(name, rule.pattern)]
        if hits:
            earlier = sorted({first for name, first in zip(names, firsts) if name in hits and first is not None})
            raise RecipeError(f"{key} takes no parameter: every one it matches (`{hits[0]}`"
                              f"{', ...' if len(hits) > 1 else ''}) is taken by the earlier rule"
                              f"{'s' if len(earlier) > 1 else ''} "
                              f"{', '.join(f'`{rules[e].pattern}`' for e in earlier)}; the first matching rule wins, "
                              f"so put the more specific rule first")
        close = _close_names(rule.pattern, names)
        shown = f"close names: {', '.join(f'`{c}`' for c in close)}" if close else \
            f"the model's parameters are named like {', '.join(f'`{c}`' for c in names[:3])}"
        raise RecipeError(f"{key} matches no parameter of the model; {shown} "
                          f"({len(names)} parameters; `*` matches any text, dots included)")


def _ruled_groups(model: torch.nn.Module, cfg: OptimizerConfig, exempt: frozenset[int],
                  where: str) -> list[dict[str, Any]]:
    """The groups of `param_groups` when `cfg.param_rules` is not empty."""
    named = list(model.named_parameters())
    names = [name for name, _ in named]
    rules = cfg.param_rules
    firsts = [next((i for i, rule in enumerate(rules) if fnmatchcase(name, rule.pattern)), None) for name in names]
    _check_rules(rules, firsts, names, where)
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for (_, param), first in zip(named, firsts):
        if not param.requires_grad:
            continue
        rule = rules[first] if first is not None else None
        lr = cfg.lr
        if rule is not None and rule.lr is not None:
            lr = rule.lr
        elif rule is not None and rule.lr_scale is not None:
            lr = cfg.lr * rule.lr_scale
        if rule is not None and rule.weight_decay is not None:
            weight_decay = rule.weight_decay
        elif id(param) in exempt or (cfg.weight_decay_weights_only and _no_decay(param)):
            weight_decay = 0.0
        else:
            weight_decay = cfg.weight_decay
        groups.setdefault((lr, weight_decay), []).append(param)
    order = {key: n for n, key in enumerate(groups)}  # first appearance in named_parameters()
    keys = sorted(groups, key=lambda k: (k[0] != cfg.lr, k[1] != cfg.weight_decay, order[k]))
    return [{"params": groups[k], "weight_decay": k[1], "initial_lr": k[0], "lr": k[0]} for k in keys]


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig, where: str = "optimizer") -> list[dict[str, Any]]:
    """Optimizer parameter groups for the trainable parameters of `model`.

    Without `cfg.param_rules`: with `cfg.weight_decay_weights_only` the parameters with
    `ndim <= 1` (biases, BatchNorm / LayerNorm weights, PReLU slopes) go to a group with
    `weight_decay` 0 and the rest (conv and linear weights) to a group with `cfg.weight_decay`;
    empty groups are left out. Otherwise there is one group. Every group has `initial_lr = cfg.lr`,
    which `LrSchedule.apply` scales. Parameters shared between modules appear once; frozen ones
    (`requires_grad=False`) not at all. The parameters of modules whose class sets
    `no_weight_decay = True` (the learned activation scales of `hatcli.quant.lsq.LsqFakeQuantize`)
    always go to the group with `weight_decay` 0.

    With `cfg.param_rules`, each parameter takes the first rule whose `pattern` matches (`fnmatch`,
    case-sensitive) its name in `model.named_parameters()`. Its base LR is the rule's `lr`, or
    `cfg.lr * lr_scale`, or `cfg.lr`; its weight decay is the rule's `weight_decay` when the rule
    gives one - **a rule wins over `weight_decay_weights_only` and `no_weight_decay`** - else 0
    for the parameters those two exempt, else `cfg.weight_decay`. Parameters with the same
    (base LR, weight decay) share a group, whose `initial_lr` (and starting `lr`) is that base LR.
    The groups at `cfg.lr` come first (the LR `LrSchedule.apply` returns for logging is the
    stage's), the one with `cfg.weight_decay` first among them, then by first appearance in
    `named_parameters()`; the order is fixed for a model and recipe, so a checkpoint's optimizer
    state loads back. Rules see frozen parameters too but give them no group. A rule that matches
    no parameter, or only parameters an earlier rule takes, raises a `RecipeError` naming
    `{where}.param_rules[i]` and its pattern (with parameter names close to it).
    """
    exempt = frozenset(id(p) for m in model.modules() if getattr(type(m), "no_weight_decay", False) is True
                       for p in m.parameters(recurse=False))
    if cfg.param_rules:
        return _ruled_groups(model, cfg, exempt, where)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    return _split(params, cfg, exempt)


def build_optimizer(model_or_params: torch.nn.Module | Iterable[Any], cfg: OptimizerConfig,
                    where: str = "optimizer") -> torch.optim.Optimizer:
    """Return the SGD or AdamW optimizer the recipe asks for.

    `model_or_params` is preferably the model (see `param_groups`; `where`, e.g. `float.optimizer`,
    names the table in errors). An iterable of parameters (the older call style) is split the
    same way, by `ndim`; an iterable of parameter-group dicts is used as given, each group getting
    `initial_lr = cfg.lr` unless it has one. `param_rules` need parameter names, so only a model
    can be given with them.
    """
    if isinstance(model_or_params, torch.nn.Module):
        groups = param_groups(model_or_params, cfg, where)
    else:
        if cfg.param_rules:
            raise ValueError("param_rules match parameter names: pass the model, not its parameters")
        items = list(model_or_params)
        if items and all(isinstance(item, dict) for item in items):
            groups = [{"initial_lr": cfg.lr, **item} for item in items]
        else:
            groups = _split(items, cfg)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def warmup_iterations(cfg: OptimizerConfig, steps_per_epoch: int) -> int:
    """Number of warm-up iterations: `warmup_iters`, or `warmup_epochs` converted and rounded."""
    if cfg.warmup_iters > 0:
        return cfg.warmup_iters
    return int(round(cfg.warmup_epochs * max(1, steps_per_epoch)))


def lr_factor(cfg: OptimizerConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base LR at iteration `step` (0-based): warm-up times decay (module docstring)."""
    steps_per_epoch = max(1, steps_per_epoch)
    total = max(1, steps_per_epoch * epochs)
    warmup = warmup_iterations(cfg, steps_per_epoch)
    ramp = 1.0
    if step < warmup:
        ramp = cfg.warmup_factor + (1.0 - cfg.warmup_factor) * (step + 1) / warmup
    at = (step // steps_per_epoch) * steps_per_epoch if cfg.by_epoch else step
    return ramp * _decay(cfg, at, steps_per_epoch, total, warmup)


@functools.lru_cache(maxsize=16)
def _cycle_starts(first_epochs: float, mult: float, steps_per_epoch: int, upto: int) -> tuple[int, ...]:
    """Iterations (counted from the end of warm-up) at which the SGDR cycles start, up to the
    first start after `upto`: cycle `i` lasts `max(1, round(first_epochs * mult ** i * steps_per_epoch))`."""
    starts, at, i = [0], 0, 0
    while at <= upto:
        at += max(1, int(round(first_epochs * mult**i * steps_per_epoch)))
        starts.append(at)
        i += 1
    return tuple(starts)


def restart_position(cfg: OptimizerConfig, t: int, steps_per_epoch: int, total: int = 0) -> tuple[int, int]:
    """`(t_in_cycle, cycle_length)` of the `cosine_restarts` cycle at iteration `t` after warm-up."""
    first = cfg.restart_epochs if cfg.restart_epochs is not None else RESTART_DEFAULTS["restart_epochs"]
    mult = cfg.restart_mult if cfg.restart_mult is not None else RESTART_DEFAULTS["restart_mult"]
    t = max(0, t)
    if mult == 1:
        length = max(1, int(round(first * steps_per_epoch)))
        return t % length, length
    starts = _cycle_starts(first, mult, steps_per_epoch, max(t, total))
    i = bisect.bisect_right(starts, t) - 1
    return t - starts[i], starts[i + 1] - starts[i]


def _decay(cfg: OptimizerConfig, at: int, steps_per_epoch: int, total: int, warmup: int) -> float:
    if cfg.schedule == "cosine_restarts":
        t, length = restart_position(cfg, at - warmup, steps_per_epoch, total - warmup)
        return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * t / length))
    if cfg.schedule == "step":
        epoch = at // steps_per_epoch
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    if cfg.schedule in ("cosine", "poly"):
        progress = min(1.0, max(0.0, (at - warmup) / max(1, total - warmup)))
        if cfg.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = (1.0 - progress) ** cfg.power
        return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * shape
    return 1.0


class LrSchedule:
    """The schedule of one training stage: `factor(step)` and `apply(optimizer, step)`.

    >>> schedule = LrSchedule(cfg, steps_per_epoch=len(loader), epochs=stage.epochs)
    >>> lr = schedule.apply(optimizer, step)   # before optimizer.step() of iteration `step`
    """

    def __init__(self, cfg: OptimizerConfig, steps_per_epoch: int, epochs: int) -> None:
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs

    @property
    def total_steps(self) -> int:
        """Iterations in the whole stage."""
        return max(1, self.steps_per_epoch) * self.epochs

    @property
    def warmup_steps(self) -> int:
        """Iterations of linear warm-up."""
        return warmup_iterations(self.cfg, self.steps_per_epoch)

    def factor(self, step: int) -> float:
        """Multiplier of the base LR at iteration `step` (0-based)."""
        return lr_factor(self.cfg, step, self.steps_per_epoch, self.epochs)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's LR to its `initial_lr` (default `cfg.lr`) times `factor(step)`.

        Returns the LR of the first group (for logging).
        """
        factor = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group.get("initial_lr", self.cfg.lr) * factor
        return optimizer.param_groups[0]["lr"]


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Set every param group's LR to `base_lr * factor`; return it (prefer `LrSchedule.apply`)."""
    lr = base_lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
