"""How good is `hat perf`'s latency model? Estimated against measured latency on this host.

    .venv/bin/python bench/perf_model.py [--threads T] [--rounds 5] [--runs 10] [--recalibrate]

Models (random weights, BatchNorm statistics from one random batch; latency does not depend on
the values): hat's three families from their
plugins - MobileNetV1 (alpha 1.0, 224x224), MixVarGENet (224x224) and FCOS-EfficientNet-B0
(512x512) - and torchvision's resnet18, mobilenet_v2 and efficientnet_b0 (224x224), batch 1.
Each is quantized by hat's flow for the `host` march (MarchQuantizer, calibrated on random
batches, ONNX QDQ) and compiled by `hat compile`'s function at `--opt 3`.

- estimated: `estimate_latency` on the QDQ model with the `host` profile calibrated on this
  machine (`calibrate_host`, the micro-benchmarks of hatcli/deploy/host_profile.py; cached in
  ~/.cache/hatcli, `--recalibrate` measures again);
- measured: the compiled artifact on ONNX Runtime with its own session options, `--threads`
  intra-op threads; after warm-up the models take turns, `--runs` runs each per round for
  `--rounds` rounds (the machine is noisy), each turn starting with `--block-warmup` untimed
  runs (the model then runs warm, as it does deployed alone). `measured_ms` is the median of
  the model's fastest turn (another process can only slow a turn down; the host calibration
  keeps its fastest turns the same way), `measured_median_ms` the median over all its runs.

error = estimated / measured - 1. Target: median |error| <= 0.25. A family whose plugin is not
installed is left out with a note on stderr. The last line is one JSON object with
`median_abs_error` (a fraction), `models` (a list of `{name, estimated_ms, measured_ms, error,
fallback_layers}`), `threads`, `target_met`, `speed_drift` and `machine_busy`.

The machine's speed can change between the calibration (cached, or run at the start) and the
measurement, from outside the VM where CPU use does not show it: the dense conv benchmark of
the calibration is run again before and after the models' turns, and a rate more than 15 % off
the calibrated one (`speed_drift`) marks the run `machine_busy`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _quantize import compiled, quantized_onnx, realistic_statistics  # noqa: E402
from hatcli.deploy.timing import BUSY_CPU_USE, time_in_turns  # noqa: E402

TARGET = 0.25
DRIFT_LIMIT = 0.15
"""A dense-conv rate this much off the calibrated one, around the measurement, flags the run."""
FAMILIES = (("mobilenet_v1", {"alpha": 1.0}, 1000, 224), ("mixvargenet", {}, 1000, 224),
            ("fcos_efficientnet_b0", {}, 80, 512))
TORCHVISION = ("resnet18", "mobilenet_v2", "efficientnet_b0")


def build_models() -> list[tuple[str, torch.nn.Module, Any, int]]:
    """(name, float model, family or None, input side) for every model that can be built here."""
    import torchvision

    from hatcli.plugins import families

    registry = families()
    models: list[tuple[str, torch.nn.Module, Any, int]] = []
    for name, options, classes, side in FAMILIES:
        if name not in registry:
            print(f"note: family `{name}` is not installed; left out", file=sys.stderr)
            continue
        family = registry.get(name)
        torch.manual_seed(0)
        config = family.config_class(name=name, **options)
        model = realistic_statistics(family.build_float_model(config, classes), (side, side))
        models.append((name, model, family, side))
    for name in TORCHVISION:
        torch.manual_seed(0)
        models.append((name, realistic_statistics(getattr(torchvision.models, name)(), (224, 224)), None, 224))
    return models


def main() -> int:
    """Quantize, compile, estimate and measure every model; print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--block-warmup", type=int, default=3,
                        help="untimed runs at the start of every turn, so each model is timed warm, "
                             "as it runs when deployed alone")
    parser.add_argument("--recalibrate", action="store_true", help="measure the host profile again")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hatcli.deploy.host_profile import calibrate_host, dense_gops
    from hatcli.deploy.perf import estimate_latency, random_feed
    from hatcli.deploy.runtime import load_artifact

    print("calibrating the host profile ...", file=sys.stderr)
    host = calibrate_host(threads=args.threads, force=args.recalibrate)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, model, family, side in build_models():
            print(f"quantizing and compiling {name} ...", file=sys.stderr)
            size = (side, side)
            qdq = quantized_onnx(model, size, "host", Path(tmp) / f"{name}.onnx", family=family)
            compiled(qdq, "host", Path(tmp) / name, size)
            estimate = estimate_latency(qdq, host, batch=1, input_shape=[1, 3, side, side])
            artifact = load_artifact(Path(tmp) / name, threads=args.threads)
            sessions[name] = (artifact, random_feed(artifact.session.ort, 1, [1, 3, side, side]))
            rows.append({"name": name, "input": [1, 3, side, side], "estimated_ms": estimate.latency_ms,
                         "fallback_layers": sum(1 for layer in estimate.layers if layer.fallback)})
        rates = [dense_gops(args.threads)]  # the machine's speed before and after the models' turns
        runners = {name: (lambda s=artifact.session.ort, f=feed: s.run(None, f)) for name, (artifact, feed) in sessions.items()}
        # block warm-up: the previous model's turn left its own weights in the cache
        seconds, side_cpu_use = time_in_turns(runners, args.rounds, args.runs, args.warmup, args.threads,
                                              turn_warmup=args.block_warmup)
        times = {name: [t * 1e3 for t in values] for name, values in seconds.items()}
        rates.append(dense_gops(args.threads))
    calibrated = host.int8_tops * 1e3
    drift = max(abs(rate / calibrated - 1) for rate in rates)
    for row in rows:
        turns = [statistics.median(times[row["name"]][i:i + args.runs])
                 for i in range(0, len(times[row["name"]]), args.runs)]
        row["measured_ms"] = round(min(turns), 3)
        row["measured_median_ms"] = round(statistics.median(times[row["name"]]), 3)
        row["estimated_ms"] = round(row["estimated_ms"], 3)
        row["error"] = round(row["estimated_ms"] / row["measured_ms"] - 1, 4)
    median_abs = float(np.median([abs(row["error"]) for row in rows])) if rows else float("nan")
    timed = {name: sum(values) for name, values in seconds.items()}
    cpu_use = sum(side_cpu_use[name] * timed[name] for name in timed) / (sum(timed.values()) or 1.0)
    print(f"{'model':<22}{'estimated':>12}{'measured':>12}{'error':>9}{'fallback':>10}", file=sys.stderr)
    for row in rows:
        print(f"{row['name']:<22}{row['estimated_ms']:>10.2f}ms{row['measured_ms']:>10.2f}ms"
              f"{100 * row['error']:>+8.1f}%{row['fallback_layers']:>10}", file=sys.stderr)
    print(f"median |error| {100 * median_abs:.1f}% (target <= {100 * TARGET:.0f}%)", file=sys.stderr)
    print(f"dense int8 conv rate: calibrated {calibrated:.0f} GOPS, around the measurement "
          + " / ".join(f"{rate:.0f}" for rate in rates) + " GOPS", file=sys.stderr)
    if drift > DRIFT_LIMIT:
        print(f"warning: this machine's speed moved by {100 * drift:.0f}% from its calibration; the errors "
              "above measure that as much as the model (run again, with --recalibrate)", file=sys.stderr)
    result = {
        "median_abs_error": round(median_abs, 4),
        "models": rows,
        "threads": args.threads,
        "host_profile": {"int8_tops": host.int8_tops, "utilisation": host.cost.utilisation,
                         "depthwise_utilisation": host.cost.depthwise_utilisation,
                         "ddr_gbytes_per_s": host.cost.ddr_gbytes_per_s,
                         "per_layer_overhead_us": host.cost.per_layer_overhead_us},
        "target_met": median_abs <= TARGET,
        "cpu_use": round(cpu_use, 3),
        "dense_gops": {"calibrated": round(calibrated, 1), "around_measurement": [round(r, 1) for r in rates]},
        "speed_drift": round(drift, 3),
        "machine_busy": cpu_use < BUSY_CPU_USE or drift > DRIFT_LIMIT,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
