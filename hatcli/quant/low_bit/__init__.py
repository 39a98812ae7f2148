"""Low-bit quantization-aware training: the schemes of the research QAT toolkits (LSQ, PACT,
DoReFa, XNOR-Net / XNOR-Net++, LQ-Net) at 1..8 bits, beside the march's int8/int16 rules.

A scheme decides two fake quants per convolution or linear layer: one for the weight and one on
the layer's *input* edge (the activation the layer reads). The activation the producer wrote keeps
the march's own int8 (or int16) grid, so residual paths and every other consumer stay at 8 bits,
and the low-bit grid is a requantization in front of the layer, as in the toolkits, where only the
inputs of quantized convolutions are quantized.

- `grids`: the integer ranges of a b-bit grid (torch-free);
- `ste`: straight-through estimators (rounding, sign, clipped sign);
- `fake_quant`: the base class every scheme's fake quant derives from, and what hat needs of it;
- `lsq`, `pact`, `dorefa`, `xnor`, `lqnet`: the algorithms;
- `schemes`: the scheme objects the built-in plugin registers (`register_quant_schemes`);
- `plan`: which scheme and bit widths each layer gets (`[quant]` of a recipe, torch-free);
- `conversion`: what happens before `convert_pt2e` (weights baked onto their grid, sign made an
  explicit op, non-uniform schemes refused) and before export (narrow grids clamped).
"""
