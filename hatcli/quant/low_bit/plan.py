"""Which scheme and bit widths each convolution / linear layer gets: the `[quant]` table, resolved
per layer by module path (torch-free).

Order of precedence for a layer: the first `layers` rule whose pattern (fnmatch on the module path,
as `hat check` prints it) matches; else the march's int8 for the first and the last layer
(`keep_first_last`, the usual practice) and for shortcut convolutions (`real_skip`: paths that
match `skip_patterns`); else the recipe's `scheme` at `weight_bits` / `activation_bits`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from hatcli.quant.low_bit.schemes import MARCH


@dataclass(frozen=True)
class LayerBits:
    """What one layer trains with: scheme, weight bits, input-activation bits, weight groups."""

    scheme: str
    weight_bits: int
    activation_bits: int
    weight_groups: int = 0

    def describe(self) -> str:
        """`lsq W2A2` (with `/gG` when the weight has G scale groups)."""
        groups = f"/g{self.weight_groups}" if self.weight_groups else ""
        return f"{self.scheme} W{self.weight_bits}A{self.activation_bits}{groups}"


@dataclass(frozen=True)
class LayerRule:
    """A per-layer override: unset fields keep the recipe-wide value."""

    pattern: str
    scheme: str | None = None
    weight_bits: int | None = None
    activation_bits: int | None = None


@dataclass(frozen=True)
class QuantPlan:
    """The recipe's low-bit choices; `layer(...)` resolves one layer (None: the march's rules)."""

    scheme: str = MARCH
    weight_bits: int = 8
    activation_bits: int = 8
    weight_groups: int = 0
    keep_first_last: bool = True
    real_skip: bool = False
    skip_patterns: tuple[str, ...] = ("*downsample*", "*shortcut*")
    rules: tuple[LayerRule, ...] = field(default_factory=tuple)

    @property
    def low_bit(self) -> bool:
        """Whether any layer can get a scheme other than the march's."""
        return self.scheme != MARCH or any(r.scheme not in (None, MARCH) for r in self.rules)

    def layer(self, path: str, first: bool, last: bool) -> LayerBits | None:
        """The scheme of the layer at module path `path` (`first` / `last`: no weighted layer
        before / after it), or None for the march's own int8 / int16 rules."""
        for rule in self.rules:
            if fnmatch.fnmatch(path, rule.pattern):
                scheme = rule.scheme or self.scheme
                if scheme == MARCH:
                    return None
                return LayerBits(scheme, rule.weight_bits or self.weight_bits,
                                 rule.activation_bits or self.activation_bits, self.weight_groups)
        if self.scheme == MARCH:
            return None
        if self.keep_first_last and (first or last):
            return None
        if self.real_skip and any(fnmatch.fnmatch(path, p) for p in self.skip_patterns):
            return None
        return LayerBits(self.scheme, self.weight_bits, self.activation_bits, self.weight_groups)
