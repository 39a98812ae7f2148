"""The scheme objects: what `[quant] scheme = NAME` builds for one layer.

A scheme object (returned by its `QuantSchemeSpec.factory`) has two methods, each returning a
`hatcli.quant.low_bit.fake_quant.GridFakeQuantize` module:

- `weight_quantizer(bits, groups)`: the weight's fake quant (per output channel: `groups` 0; one
  scale per tensor: 1; G groups of channels: G);
- `activation_quantizer(bits, signed)`: the fake quant of the layer's input (`signed` is False when
  the producer's output is non-negative: after a ReLU, on the march's unsigned grid).

`BUILTIN_SCHEMES` lists the specs the built-in plugin registers. The `march` scheme is hat's
default: the march's own int8 / int16 rules (`hatcli.quant.quantizer`), no low-bit quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from hatcli.family import QuantSchemeSpec

MARCH = "march"
"""The default scheme's name: the march's int8 / int16 rules."""


class Scheme:
    """Base of a scheme object: subclasses implement the two quantizer builders."""

    name = ""

    def weight_quantizer(self, bits: int, groups: int):  # noqa: ANN201 - a GridFakeQuantize
        """The fake quant of a convolution / linear weight at `bits` bits."""
        raise NotImplementedError

    def activation_quantizer(self, bits: int, signed: bool):  # noqa: ANN201 - a GridFakeQuantize
        """The fake quant of a layer's input at `bits` bits."""
        raise NotImplementedError


@dataclass
class LsqScheme(Scheme):
    """LSQ for weights and activations (`hatcli.quant.low_bit.lsq`)."""

    name: str = "lsq"

    def weight_quantizer(self, bits: int, groups: int):  # noqa: ANN201
        from hatcli.quant.low_bit.lsq import LsqWeightFakeQuantize
        return LsqWeightFakeQuantize(bits, groups)

    def activation_quantizer(self, bits: int, signed: bool):  # noqa: ANN201
        from hatcli.quant.low_bit.lsq import LsqActivationFakeQuantize
        return LsqActivationFakeQuantize(bits, signed)


@dataclass
class DorefaScheme(Scheme):
    """DoReFa weights; activations clipped at the calibrated range (DoReFa) or a learned one (PACT)."""

    name: str = "dorefa"
    learned_clip: bool = False

    def weight_quantizer(self, bits: int, groups: int):  # noqa: ANN201
        from hatcli.quant.low_bit.dorefa import DorefaWeightFakeQuantize
        return DorefaWeightFakeQuantize(bits, groups)

    def activation_quantizer(self, bits: int, signed: bool):  # noqa: ANN201
        if self.learned_clip:
            from hatcli.quant.low_bit.pact import PactFakeQuantize
            return PactFakeQuantize(bits, signed)
        from hatcli.quant.low_bit.dorefa import DorefaActivationFakeQuantize
        return DorefaActivationFakeQuantize(bits, signed)


@dataclass
class XnorScheme(Scheme):
    """Binary weights (mean-|w| or learned scale) and sign activations (`hatcli.quant.low_bit.xnor`)."""

    name: str = "xnor"
    learned_scale: bool = False

    def weight_quantizer(self, bits: int, groups: int):  # noqa: ANN201
        from hatcli.quant.low_bit.xnor import XnorWeightFakeQuantize
        return XnorWeightFakeQuantize(bits, groups, learned=self.learned_scale)

    def activation_quantizer(self, bits: int, signed: bool):  # noqa: ANN201
        from hatcli.quant.low_bit.xnor import SignFakeQuantize
        return SignFakeQuantize(bits, signed)


@dataclass
class LqScheme(Scheme):
    """LQ-Net's learned levels (`hatcli.quant.low_bit.lqnet`); fake quantization only."""

    name: str = "lqnet"

    def weight_quantizer(self, bits: int, groups: int):  # noqa: ANN201
        from hatcli.quant.low_bit.lqnet import LqFakeQuantize
        return LqFakeQuantize(bits, signed=True, per_channel=True)

    def activation_quantizer(self, bits: int, signed: bool):  # noqa: ANN201
        from hatcli.quant.low_bit.lqnet import LqFakeQuantize
        return LqFakeQuantize(bits, signed=signed)


LQNET_NOT_INTEGER = ("LQ-Net's levels are learned sums of a basis, not a uniform grid: no integer "
                     "kernel computes them, so it trains and evaluates in fake quantization only")


BUILTIN_SCHEMES = [
    QuantSchemeSpec(MARCH, "the march's int8 / int16 rules (HAT's default)", factory=lambda: None,
                    weight_bits=(8, 8), activation_bits=(8, 8)),
    QuantSchemeSpec("lsq", "LSQ: learned step sizes for weights and activations (Esser et al. 2020)",
                    factory=LsqScheme, weight_bits=(2, 8), activation_bits=(2, 8)),
    QuantSchemeSpec("pact", "PACT: learned activation clipping, DoReFa weights (Choi et al. 2018)",
                    factory=lambda: DorefaScheme(name="pact", learned_clip=True),
                    weight_bits=(1, 7), activation_bits=(1, 8)),
    QuantSchemeSpec("dorefa", "DoReFa-Net: tanh-normalised weights, clipped activations (Zhou et al. 2016)",
                    factory=DorefaScheme, weight_bits=(1, 7), activation_bits=(1, 8)),
    QuantSchemeSpec("xnor", "XNOR-Net: binary weights with a mean-|w| channel scale, sign activations",
                    factory=XnorScheme, weight_bits=(1, 1), activation_bits=(1, 1)),
    QuantSchemeSpec("xnorpp", "XNOR-Net++: binary weights with a learned channel scale, sign activations",
                    factory=lambda: XnorScheme(name="xnorpp", learned_scale=True),
                    weight_bits=(1, 1), activation_bits=(1, 1)),
    QuantSchemeSpec("lqnet", "LQ-Net: learned non-uniform levels (fake quantization only)",
                    factory=LqScheme, weight_bits=(1, 4), activation_bits=(1, 4), integer=False,
                    why_not_integer=LQNET_NOT_INTEGER),
]
"""What `hatcli.builtin` registers through `register_quant_schemes`."""
