"""The low-bit layers of an exported model, and how a march runs each one.

The export records the layers a low-bit scheme trained (`hatcli.quant.low_bit_records.LowBitLayer`:
module path, scheme, weight / activation bits, weight groups, the ranges of their codes) in the
ONNX model's metadata under `METADATA_KEY` and in the manifest (`low_bit_layers`), so `hat check`
reads them back from the ONNX file alone (`hat check --model`).

What a march does with them: every march hat models (the BPU marches and `host`) computes
convolutions and matmuls with 8-bit operands. A uniform grid of at most 8 bits is a subset of the
int8 (or uint8) grid, so such a layer runs on the int8 kernels and computes exactly the trained
codes; no march is modelled with sub-8-bit kernels, so it runs at int8 speed (no low-bit speed-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx

from hatcli.deploy.metadata import read_records, write_records
from hatcli.quant.low_bit_records import LowBitLayer
from hatcli.quant.march import MarchProfile

METADATA_KEY = "hat.low_bit_layers"
INT8_RANGES = ((-128, 127), (0, 255))
"""The grids of the int8 datapath: signed int8, unsigned uint8 (after a ReLU)."""


def write_low_bit_records(path: str, records: list[LowBitLayer]) -> None:
    """Store the low-bit layer records in the ONNX model at `path` (nothing when empty)."""
    write_records(path, METADATA_KEY, records)


def read_low_bit_records(model: onnx.ModelProto) -> list[LowBitLayer]:
    """The low-bit layers the export recorded in `model` ([]: none, or exported without them)."""
    return [LowBitLayer.from_dict(entry) for entry in read_records(model, METADATA_KEY) or []]


def _on_int8(codes: tuple[int, int] | None) -> bool:
    return codes is None or any(lo <= codes[0] and codes[1] <= hi for lo, hi in INT8_RANGES)


def _codes(layer: LowBitLayer) -> str:
    parts = []
    if layer.activation_codes is not None:
        parts.append(f"input codes in [{layer.activation_codes[0]}, {layer.activation_codes[1]}]")
    if layer.weight_codes is not None:
        parts.append(f"weight codes in [{layer.weight_codes[0]}, {layer.weight_codes[1]}]")
    return f" ({', '.join(parts)})" if parts else ""


@dataclass
class LowBitVerdict:
    """How a march runs one low-bit layer."""

    layer: LowBitLayer
    march: str
    runs_on: str
    """"int8 datapath", or "CPU fallback" when `hat check` found the layer's op falling back."""
    exact: bool
    """Whether the march's kernels compute the trained codes exactly."""
    speedup: bool
    """Whether the march runs the layer faster than at 8 bits (no march hat models does)."""
    note: str

    def describe(self) -> str:
        """`lsq W2A2 — runs on the int8 datapath (...); exact, no low-bit speed-up on nash_e (...)`."""
        return f"{self.layer.describe()} — {self.note}"

    def to_dict(self) -> dict[str, Any]:
        """The layer's record and the verdict, JSON-ready."""
        return {**self.layer.to_dict(), "trained": self.layer.describe(), "march": self.march,
                "runs_on": self.runs_on, "exact": self.exact, "speedup": self.speedup, "note": self.note}


def low_bit_verdict(layer: LowBitLayer, march: MarchProfile, fallback_reason: str | None = None) -> LowBitVerdict:
    """How `march` runs `layer`; `fallback_reason` is `hat check`'s reason when the layer's op
    falls back to the CPU."""
    where = f"{march.name} ({march.chip})" if march.chip else march.name
    if fallback_reason:
        return LowBitVerdict(layer, march.name, "CPU fallback", False, False,
                             f"does not run on the int8 datapath of {where}: {fallback_reason}")
    if not (layer.weight_bits <= 8 and layer.activation_bits <= 8
            and _on_int8(layer.weight_codes) and _on_int8(layer.activation_codes)):
        return LowBitVerdict(layer, march.name, "CPU fallback", False, False,
                             f"codes{_codes(layer)} do not fit the 8-bit grids of {where}")
    return LowBitVerdict(layer, march.name, "int8 datapath", True, False,
                         f"runs on the int8 datapath{_codes(layer)}; exact, no low-bit speed-up on {where}")
