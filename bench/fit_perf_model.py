"""Fit the bayes (Journey 5) cost model to the three published HAT latencies.

    .venv/bin/python bench/fit_perf_model.py

Builds MobileNetV1 (the HAT/paper layout), torchvision ResNet18 and EfficientNet-B0, exports
each to ONNX at 1x3x224x224, reads it as layers (hatcli.deploy.onnx_graph, activations and
weights costed as int8) and grid-searches `utilisation`, `depthwise_utilisation` and
`per_layer_overhead_us` (DDR bandwidth fixed at the profile's 60 GB/s) to minimise the sum of
squared log errors against data/hat_modelzoo_latency.md. Prints the fit and the per-model error;
docs/perf_model.md records the result. Takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from hatcli.deploy.onnx_graph import read_graph
from hatcli.quant.march import load_march

PUBLISHED_MS = {"mobilenet_v1": 0.77, "resnet18": 1.53, "efficientnet_b0": 0.91}


def mobilenet_v1() -> nn.Module:
    """MobileNetV1 1.0 / 224: 0.57 G MACs, 4.2 M parameters."""
    def cbr(cin: int, cout: int, stride: int, groups: int = 1, k: int = 3) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU()]

    cfg = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
    cfg += [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
    layers = cbr(3, 32, 2)
    for cin, cout, stride in cfg:
        layers += cbr(cin, cin, stride, groups=cin) + cbr(cin, cout, 1, k=1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 1000))


BUILDERS = {"mobilenet_v1": mobilenet_v1, "resnet18": torchvision.models.resnet18,
            "efficientnet_b0": torchvision.models.efficientnet_b0}


def export(name: str, out: Path) -> Path:
    """Export model `name` (eval mode, random weights) to ONNX at 1x3x224x224."""
    model = BUILDERS[name]().eval()
    x = torch.randn(1, 3, 224, 224)
    path = out / f"{name}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.export.export(model, (x,)), (x,), str(path), dynamo=True)
    return path


def layer_arrays(path: Path, tops: float, gbps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-view layer: dense-rate compute ms at utilisation 1, depthwise flag, memory ms."""
    layers = [layer for layer in read_graph(path).layers if not layer.is_view]
    compute = np.array([2 * layer.macs / (tops * 1e12) * 1e3 for layer in layers])
    dw = np.array([layer.is_depthwise for layer in layers])
    mem = np.array([(sum(layer.activation_bytes("int8")) + layer.weight_bytes("int8"))
                    / (gbps * 1e9) * 1e3 for layer in layers])
    return compute, dw, mem


def latency(arrays: tuple[np.ndarray, np.ndarray, np.ndarray], u: float, ud: float, o_us: float) -> float:
    """Estimated ms for utilisation u, depthwise utilisation ud, per-layer overhead o_us."""
    compute, dw, mem = arrays
    return float(np.maximum(compute / np.where(dw, ud, u), mem).sum() + len(compute) * o_us / 1e3)


def fit(data: dict[str, tuple], overheads: np.ndarray) -> tuple[float, float, float, float]:
    """Grid search; returns (loss, u, ud, o_us)."""
    best = (float("inf"), 0.0, 0.0, 0.0)
    for o in overheads:
        for u in np.geomspace(0.002, 0.5, 160):
            for ud in np.geomspace(1e-4, 0.1, 160):
                loss = sum(np.log(latency(data[k], u, ud, o) / v) ** 2 for k, v in PUBLISHED_MS.items())
                if loss < best[0]:
                    best = (loss, u, ud, o)
    return best


def main() -> int:
    """Export, fit, print."""
    march = load_march("bayes")
    with tempfile.TemporaryDirectory() as tmp:
        data = {name: layer_arrays(export(name, Path(tmp)), march.int8_tops, march.cost.ddr_gbytes_per_s)
                for name in PUBLISHED_MS}
    for name, arrays in data.items():
        print(f"{name:16s} layers {len(arrays[0]):4d}  dense-rate compute {arrays[0][~arrays[1]].sum():.4f} ms"
              f"  depthwise {arrays[0][arrays[1]].sum():.5f} ms  memory {arrays[2].sum():.3f} ms")
    loss, u, ud, o = fit(data, np.arange(0.0, 6.01, 0.25))
    print(f"\nfree fit: utilisation {u:.4f}  depthwise_utilisation {ud:.5f}  overhead {o:.2f} us  "
          f"(sum sq log err {loss:.4f})")
    for name, v in PUBLISHED_MS.items():
        est = latency(data[name], u, ud, o)
        print(f"  {name:16s} published {v:.2f} ms  estimate {est:.3f} ms  error {100 * (est / v - 1):+.1f}%")
    for o_fixed in (1.0, 2.0, 4.0):
        loss, u2, ud2, _ = fit(data, np.array([o_fixed]))
        errs = ", ".join(f"{k} {100 * (latency(data[k], u2, ud2, o_fixed) / v - 1):+.1f}%"
                         for k, v in PUBLISHED_MS.items())
        print(f"overhead fixed {o_fixed:.0f} us: utilisation {u2:.4f} depthwise {ud2:.5f}  ({errs})")
    prof = march.cost
    errs = ", ".join(f"{k} {latency(data[k], prof.utilisation, prof.depthwise_utilisation, prof.per_layer_overhead_us):.3f} ms"
                     for k in PUBLISHED_MS)
    print(f"\nshipped bayes.toml ({prof.utilisation}, {prof.depthwise_utilisation}, "
          f"{prof.per_layer_overhead_us} us): {errs}")
    shipped = {k: latency(data[k], prof.utilisation, prof.depthwise_utilisation, prof.per_layer_overhead_us)
               for k in PUBLISHED_MS}
    print(json.dumps({"models": [{"name": k, "published_ms": v, "estimated_ms": round(shipped[k], 4),
                                  "error": round(shipped[k] / v - 1, 4)} for k, v in PUBLISHED_MS.items()],
                      "median_abs_error": round(float(np.median([abs(shipped[k] / v - 1)
                                                                 for k, v in PUBLISHED_MS.items()])), 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
