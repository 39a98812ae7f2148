"""PT2E quantization specs for a scheme's fake quants (what `MarchQuantizer` annotates with)."""

from __future__ import annotations

from collections.abc import Callable

from torchao.quantization.pt2e.quantizer import QuantizationSpec

from hatcli.quant.low_bit.fake_quant import GridFakeQuantize


class FakeQuantBuilder:
    """A fake-quant constructor as PT2E calls one: `with_args(**spec fields)()`.

    The spec's fields were read off the module itself (`grid_spec`), so `with_args` has nothing to
    add; every call builds a fresh module tagged with the scheme's name.
    """

    __name__ = "GridFakeQuantize"  # prepare_pt2e reads the constructor's class name

    def __init__(self, build: Callable[[], GridFakeQuantize], scheme: str) -> None:
        self.build, self.scheme = build, scheme

    def with_args(self, **_spec_fields: object) -> "FakeQuantBuilder":
        """The same builder (the spec's dtype, range and qscheme are the module's own)."""
        return self

    def __call__(self) -> GridFakeQuantize:
        module = self.build()
        if not isinstance(module, GridFakeQuantize):
            raise TypeError(f"scheme `{self.scheme}` built a {type(module).__name__}, not a "
                            f"hatcli.quant.low_bit.fake_quant.GridFakeQuantize")
        module.scheme = self.scheme
        return module


def grid_spec(build: Callable[[], GridFakeQuantize], scheme: str) -> QuantizationSpec:
    """The QuantizationSpec of the fake quants `build()` makes (dtype, grid and axis read off one)."""
    builder = FakeQuantBuilder(build, scheme)
    probe = builder()
    return QuantizationSpec(dtype=probe.dtype, quant_min=probe.quant_min, quant_max=probe.quant_max,
                            qscheme=probe.qscheme, ch_axis=0 if probe.per_channel else None,
                            observer_or_fake_quant_ctr=builder)
