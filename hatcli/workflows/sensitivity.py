"""Per-layer quantization sensitivity: what quantizing *one* layer alone costs.

Built on the calibration checkpoint (the prepared graph with its recorded ranges). The reference
is that graph with every fake quant off (float outputs, BatchNorm folded). Then, for each
quantized layer (`hatcli.quant.sensitivity.find_layers`), only its own fake quants are switched
on and the val set is run again; the layer's cost is the drop of the primary metric (top-1 for
classification) and the SQNR of the first output tensor against the reference, in dB:
``10 log10(sum ref^2 / sum (ref - q)^2)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from hatcli.engine.loaders import build_loader
from hatcli.engine.trainer import PRIMARY_METRIC
from hatcli.errors import ArtifactError, HatError
from hatcli.metrics.classification import TopKAccuracy
from hatcli.progress import track
from hatcli.quant.flow import set_mode
from hatcli.quant.sensitivity import (
    QuantLayer,
    enable_only,
    enabled_fake_quants,
    fake_quant_modules,
    find_layers,
    sqnr_db,
)
from hatcli.recipe import LoadedRecipe
from hatcli.stages import read_stage_record, stage_dir, stage_fingerprint
from hatcli.workflows.stage_models import load_prepared
from hatcli.workflows.training import training_device

MAX_CACHED_BATCHES = 64
"""Val batches kept in memory between passes; beyond this the loader is read again each pass."""


@dataclass
class LayerSensitivity:
    """What quantizing one layer alone costs."""

    layer: str
    op: str
    dtype: str
    drop: float
    """Reference metric minus the metric with only this layer quantized (positive: worse)."""
    sqnr_db: float
    """SQNR of the first output tensor against the reference (inf when identical)."""
    metric: float
    """The metric with only this layer quantized."""
    int16_key: str | None = None
    enabled: int = 0
    """Fake-quant modules that were on while this layer was measured."""


@dataclass
class SensitivityReport:
    """Layers ranked by drop (largest first), then by SQNR (lowest first)."""

    recipe: str
    metric: str
    reference: float
    """The metric of the calibrated graph with every fake quant off (float)."""
    batches: int
    images: int
    layers: list[LayerSensitivity]

    def to_dict(self) -> dict[str, Any]:
        """The `--json` shape: recipe, metric, reference and the ranked layers."""
        layers = []
        for row in self.layers:
            item = asdict(row)
            item["drop"] = round(row.drop, 4)
            item["metric"] = round(row.metric, 4)
            item["sqnr_db"] = round(row.sqnr_db, 3) if math.isfinite(row.sqnr_db) else None
            layers.append(item)
        return {"recipe": self.recipe, "metric": self.metric, "reference": self.reference,
                "batches": self.batches, "images": self.images, "layers": layers}


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)) and output:
        return _first_tensor(output[0])
    raise HatError(f"the model's output holds no tensor ({type(output).__name__})")


class _Batches:
    """Up to `limit` val batches, kept in memory when there are few, else read again each pass."""

    def __init__(self, loader: Any, limit: int | None) -> None:
        self.loader = loader
        self.count = len(loader) if limit is None else min(limit, len(loader))
        self.cached = list(itertools.islice(loader, self.count)) if self.count <= MAX_CACHED_BATCHES else None

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self.cached) if self.cached is not None else itertools.islice(self.loader, self.count)


def _new_metric(family: Any) -> tuple[str, Any]:
    if family.task != "classification":
        raise HatError(f"sensitivity needs an evaluation of {family.task} models, not available in this version")
    return PRIMARY_METRIC[family.task], TopKAccuracy()


def _run_pass(prepared: GraphModule, batches: _Batches, family: Any,
              reference: list[torch.Tensor] | None) -> tuple[float, float, list[torch.Tensor]]:
    """One pass over the batches: (metric, SQNR dB vs `reference`, first outputs)."""
    key, metric = _new_metric(family)
    signal = noise = 0.0
    outputs: list[torch.Tensor] = []
    with torch.no_grad():
        for i, (images, labels) in enumerate(batches):
            out = prepared(images)
            metric.update(out, labels)
            first = _first_tensor(out).detach().float().cpu()
            if reference is None:
                outputs.append(first)
            else:
                ref = reference[i].double()
                signal += float((ref * ref).sum())
                noise += float(((ref - first.double()) ** 2).sum())
    return metric.compute()[key], sqnr_db(signal, noise), outputs


def rank(rows: list[LayerSensitivity]) -> list[LayerSensitivity]:
    """Largest drop first; among equal drops, lowest SQNR first."""
    return sorted(rows, key=lambda r: (-round(r.drop, 9), r.sqnr_db))


def measure_layers(prepared: GraphModule, layers: list[QuantLayer], loader: Any, family: Any,
                   batches: int | None = None, recipe: str = "") -> SensitivityReport:
    """Measure each layer of a calibrated prepared graph alone against the all-float reference."""
    metric_key, _ = _new_metric(family)
    data = _Batches(loader, batches)
    set_mode(prepared, "eval")
    enable_only(prepared, [])
    reference, _, ref_outputs = _run_pass(prepared, data, family, None)
    for module in fake_quant_modules(prepared).values():
        module.disable_observer()  # the weights' ranges were just taken; nothing changes them now
    rows = []
    for layer in track(layers, len(layers), "sensitivity"):
        enable_only(prepared, layer.modules)
        enabled = len(enabled_fake_quants(prepared))
        value, sqnr, _ = _run_pass(prepared, data, family, ref_outputs)
        rows.append(LayerSensitivity(layer=layer.name, op=layer.op, dtype=layer.dtype, drop=reference - value,
                                     sqnr_db=sqnr, metric=value, int16_key=layer.int16_key, enabled=enabled))
    enable_only(prepared, None)
    images = sum(int(t.shape[0]) for t in ref_outputs)
    return SensitivityReport(recipe=recipe, metric=metric_key, reference=reference, batches=data.count,
                             images=images, layers=rank(rows))


def calibration_checkpoint(lr: LoadedRecipe) -> Path:
    """The calibration checkpoint of `lr`, or an ArtifactError saying how to make it (or remake it)."""
    path = stage_dir(lr, "calibration") / "checkpoint.pt"
    if not path.exists():
        raise ArtifactError(f"no calibration checkpoint at {path}; run `hat train {lr.path} --stage calibration` "
                            f"first")
    record = read_stage_record(lr, "calibration")
    if record is not None and record.get("fingerprint") != stage_fingerprint(lr, "calibration"):
        raise ArtifactError(f"the calibration in {path.parent} was made from another recipe or float model "
                            f"(e.g. other `quant.int16`); run `hat train {lr.path} --stage calibration` again")
    return path


def layer_sensitivity(lr: LoadedRecipe, batches: int | None = None) -> SensitivityReport:
    """Rank the quantized layers of `lr`'s calibrated graph by what quantizing each alone costs.

    `batches` caps the val batches used (default: all). Raises ArtifactError when the calibration
    checkpoint is missing or stale.
    """
    path = calibration_checkpoint(lr)
    device = training_device(lr)
    prepared, _ = load_prepared(lr, "calibration", path)
    prepared = prepared.to(device)
    loader = build_loader(lr, "val", device=device)
    return measure_layers(prepared, find_layers(prepared), loader, lr.family, batches, recipe=str(lr.path))
