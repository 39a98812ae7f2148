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
  `step`: `gamma ** (number of milestones <= epoch of s)`; `constant`: 1.

`cosine` and `poly` therefore start at 1 right after warm-up and reach `m` at `step = total`,
the end of training (the last iteration, `total - 1`, trains at slightly more than `m * lr`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from hatcli.recipe_schema import OptimizerConfig


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


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """Optimizer parameter groups for the trainable parameters of `model`.

    With `cfg.weight_decay_weights_only` the parameters with `ndim <= 1` (biases, BatchNorm /
    LayerNorm weights, PReLU slopes) go to a group with `weight_decay` 0 and the rest (conv and
    linear weights) to a group with `cfg.weight_decay`; empty groups are left out. Otherwise there
    is one group. Every group has `initial_lr = cfg.lr`, which `LrSchedule.apply` scales.
    Parameters shared between modules appear once; frozen ones (`requires_grad=False`) not at all.
    The parameters of modules whose class sets `no_weight_decay = True` (the learned activation
    scales of `hatcli.quant.lsq.LsqFakeQuantize`) always go to the group with `weight_decay` 0.
    """
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    exempt = frozenset(id(p) for m in model.modules() if getattr(type(m), "no_weight_decay", False) is True
                       for p in m.parameters(recurse=False))
    return _split(params, cfg, exempt)


def build_optimizer(model_or_params: torch.nn.Module | Iterable[Any], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Return the SGD or AdamW optimizer the recipe asks for.

    `model_or_params` is preferably the model (see `param_groups`). An iterable of parameters
    (the older call style) is split the same way, by `ndim`; an iterable of parameter-group dicts
    is used as given, each group getting `initial_lr = cfg.lr` unless it has one.
    """
    if isinstance(model_or_params, torch.nn.Module):
        groups = param_groups(model_or_params, cfg)
    else:
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


def _decay(cfg: OptimizerConfig, at: int, steps_per_epoch: int, total: int, warmup: int) -> float:
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
