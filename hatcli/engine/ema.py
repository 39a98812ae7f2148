"""Exponential moving average (EMA) of a model's weights, for evaluation and export.

    ema = ModelEMA(model)            # after the model is on its device
    for images, targets in loader:
        ...; optimizer.step()
        ema.update(model)            # after every optimizer step
    evaluate(ema.module, ...)        # the averaged model (eval mode, no gradients)

Works for plain modules, DistributedDataParallel / DataParallel wrappers (the wrapped module is
averaged) and `torch.fx.GraphModule`s such as prepared fake-quant graphs.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch


def unwrap(model: Any) -> torch.nn.Module:
    """The module inside a DistributedDataParallel / DataParallel-like wrapper, else `model`.

    A wrapper is an object with a `.module` that is an `nn.Module`, when it is not itself a module
    or is a module whose only child is `module` and that has no parameters or buffers of its own.
    """
    inner = getattr(model, "module", None)
    if not isinstance(inner, torch.nn.Module):
        return model
    if not isinstance(model, torch.nn.Module):
        return inner
    if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return inner
    only_child = [name for name, _ in model.named_children()] == ["module"]
    own_state = any(True for _ in model.parameters(recurse=False)) or any(True for _ in model.buffers(recurse=False))
    return inner if only_child and not own_state else model


class ModelEMA:
    """Keeps `ema = d * ema + (1 - d) * model` over the model's state, updated after each step.

    The effective decay at the `n`-th update (1-based) is `decay * (1 - exp(-n / tau))`, so the
    first updates follow the model closely and the average only slowly forgets it later;
    `tau = 0` uses `decay` from the first update on.

    Floating-point entries of the state dict (parameters, BatchNorm running statistics, observer
    ranges, fake-quant scales) are averaged; the others (`num_batches_tracked`, integer zero
    points and flags) are copied from the model.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9998, tau: float = 2000) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if tau < 0:
            raise ValueError(f"EMA tau must be >= 0, got {tau}")
        self.decay = decay
        self.tau = tau
        self.updates = 0
        self._module = copy.deepcopy(unwrap(model)).eval()
        for param in self._module.parameters():
            param.requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (eval mode, `requires_grad=False`)."""
        return self._module

    def effective_decay(self, n: int | None = None) -> float:
        """Decay used by the `n`-th update (default: the last one made)."""
        n = self.updates if n is None else n
        if self.tau == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-n / self.tau))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> float:
        """Fold the current weights of `model` (or of the module it wraps) in; return the decay used.

        Entries whose shape changed (e.g. per-channel observer ranges that were still empty when
        the EMA was made) or that are not tensors are taken from the model as they are.
        """
        self.updates += 1
        d = self.effective_decay()
        source = unwrap(model).state_dict()
        target = self._module.state_dict()
        replace: dict[str, Any] = {}
        for key, value in source.items():
            mine = target.get(key)
            if not isinstance(value, torch.Tensor) or not isinstance(mine, torch.Tensor) or mine.shape != value.shape:
                replace[key] = value
            elif mine.dtype.is_floating_point:
                mine.lerp_(value.detach().to(device=mine.device, dtype=mine.dtype), 1.0 - d)
            else:
                mine.copy_(value)
        if replace:
            self._module.load_state_dict(replace, strict=False)
        return d

    def state_dict(self) -> dict[str, Any]:
        """`{"updates", "decay", "tau", "model"}`: everything needed to resume the average."""
        return {"updates": self.updates, "decay": self.decay, "tau": self.tau, "model": self._module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (the averaged weights and the update count)."""
        self.updates = int(state["updates"])
        self.decay = float(state.get("decay", self.decay))
        self.tau = float(state.get("tau", self.tau))
        self._module.load_state_dict(state["model"])
