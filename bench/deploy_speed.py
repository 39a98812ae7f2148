"""Deploy speed on this CPU: hat's compiled int8 artifact against the same float model in fp32.

    .venv/bin/python bench/deploy_speed.py [--threads T] [--rounds 7] [--runs 20] [--alpha 1.0]

Model: MobileNetV1 (the `mobilenet_v1` plugin, alpha 1.0, 1000 classes, random weights, BatchNorm
statistics from one random batch so activations keep their scale) at 1x3x224x224, batch 1. Three sides run the same float weights:

- int8: the network quantized by hat's flow for `host` (MarchQuantizer, calibrated on random
  batches, converted, exported to ONNX QDQ) and compiled by `hat compile`'s function at
  `--opt 3`; run by ONNX Runtime with the artifact's own session options (`load_artifact`);
- torch fp32: the float model in eager mode (`torch.no_grad`, eval);
- ORT fp32: the float model exported to ONNX (dynamo exporter), ONNX Runtime at ORT_ENABLE_ALL;
- with OpenVINO installed (and the hat-openvino plugin), what a user would pick instead of hat's
  artifact on an x86 CPU: OpenVINO int8 (the artifact's own QDQ model, `--runtime openvino`),
  OpenVINO fp32 (the float ONNX, f32 inference precision) and OpenVINO default (the float ONNX at
  the CPU plugin's default precision: bf16 on CPUs with bf16 support, such as AMX Xeons).

Torch and ONNX Runtime get the same thread count (`--threads`, default: torch's). The machine
is noisy, so after warm-up runs the three take turns: `--runs` timed runs each, for `--rounds`
rounds; each side's median over all its runs is used. Speed-ups are median fp32 / median int8
(> 1: the int8 artifact is faster). Targets: `int8_vs_torch_fp32` >= 4, `int8_vs_ort_fp32` >= 1.3,
`int8_vs_openvino_int8` >= 1.0 and `int8_vs_openvino_fp32` >= 1.5 (null without OpenVINO).
The outputs are compared too (top-1 of int8 against fp32 on the timing input), as a check that the
int8 side computes the same network.

`cpu_use` (process CPU time over wall time and threads, over the timed runs) is about 1 on an
idle machine; below 0.85 the run is flagged `machine_busy`. The last line is one JSON object
with `int8_vs_torch_fp32`, `int8_vs_ort_fp32`, `int8_vs_openvino_int8`, `int8_vs_openvino_fp32`,
`int8_vs_openvino_default`, the medians in ms, `cpu`, `threads`, `targets_met` and `machine_busy`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _quantize import compiled, float_onnx, quantized_onnx, realistic_statistics  # noqa: E402
from hatcli.deploy.timing import BUSY_CPU_USE, time_in_turns  # noqa: E402

INPUT = (224, 224)
TARGETS = {"int8_vs_torch_fp32": 4.0, "int8_vs_ort_fp32": 1.3, "int8_vs_openvino_int8": 1.0,
           "int8_vs_openvino_fp32": 1.5}


def build_model(alpha: float) -> torch.nn.Module:
    """MobileNetV1 from the plugin, ImageNet layout, 1000 classes, seeded random weights and
    BatchNorm statistics that keep the activations at unit scale."""
    from hat_mobilenet.family import MobileNetV1Config, MobileNetV1Family

    torch.manual_seed(0)
    family = MobileNetV1Family()
    model = family.build_float_model(MobileNetV1Config(name="mobilenet_v1", alpha=alpha), 1000)
    return realistic_statistics(model, INPUT)


def openvino_sides(artifact: Path, fp32_onnx: Path, feed: np.ndarray, threads: int) -> dict:
    """OpenVINO int8 (the artifact's QDQ model), fp32 and default-precision sides; none without OpenVINO."""
    try:
        import openvino  # noqa: F401
        from hat_openvino.runtime import OpenVinoSession
    except ImportError:
        print("OpenVINO or hat-openvino is not installed: no OpenVINO sides (pip install openvino)", file=sys.stderr)
        return {}
    import openvino as ov

    default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")  # bf16 where the CPU has it
    sessions = {"openvino_int8": OpenVinoSession(artifact / "model_qdq.onnx", threads),
                "openvino_fp32": OpenVinoSession(fp32_onnx, threads),
                "openvino_default": OpenVinoSession(fp32_onnx, threads, precision=default)}
    return {name: (lambda s=s: s.run({s.inputs[0].name: feed})) for name, s in sessions.items()}


def main() -> int:
    """Build the three sides, time them in turns, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per side per round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hatcli.deploy.cpu import cpu_name
    from hatcli.deploy.runtime import create_session, load_artifact

    model = build_model(args.alpha)
    x = torch.randn(1, 3, *INPUT, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        print("quantizing and compiling the int8 artifact ...", file=sys.stderr)
        calib = [torch.randn(4, 3, *INPUT, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        qdq = quantized_onnx(model, INPUT, "host", tmp_path / "int8.onnx", calibration=calib)
        compiled(qdq, "host", tmp_path / "artifact", INPUT)
        int8 = load_artifact(tmp_path / "artifact", threads=args.threads)
        fp32 = create_session(float_onnx(model, INPUT, tmp_path / "fp32.onnx"), 3, threads=args.threads)
        feed = x.numpy()
        sides = {
            "int8": lambda: int8.run(feed),
            "torch_fp32": lambda: model(x),
            "ort_fp32": lambda: fp32.run(None, {fp32.get_inputs()[0].name: feed}),
            **openvino_sides(tmp_path / "artifact", tmp_path / "fp32.onnx", feed, args.threads),
        }
        with torch.no_grad():
            reference = model(x).numpy()
            agree = int(np.argmax(int8.run(feed)[0]) == np.argmax(reference))
            ort_diff = float(np.abs(fp32.run(None, {fp32.get_inputs()[0].name: feed})[0] - reference).max())
            seconds, cpu_use = time_in_turns(sides, args.rounds, args.runs, args.warmup, args.threads)
    times = {name: [t * 1e3 for t in values] for name, values in seconds.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    def ratio(side: str) -> float | None:
        return round(median[side] / median["int8"], 3) if side in median else None

    result = {
        "int8_vs_torch_fp32": ratio("torch_fp32"),
        "int8_vs_ort_fp32": ratio("ort_fp32"),
        "int8_vs_openvino_int8": ratio("openvino_int8"),
        "int8_vs_openvino_fp32": ratio("openvino_fp32"),
        "int8_vs_openvino_default": ratio("openvino_default"),
        "median_ms": {name: round(value, 3) for name, value in median.items()},
        "p90_ms": {name: round(float(np.percentile(values, 90)), 3) for name, values in times.items()},
        "model": f"mobilenet_v1 alpha {args.alpha}, 1x3x224x224, batch 1",
        "cpu": cpu_name(), "threads": args.threads, "rounds": args.rounds, "runs_per_round": args.runs,
        "int8_top1_equals_fp32": bool(agree), "ort_fp32_max_abs_diff_vs_torch": ort_diff,
        "cpu_use": {name: round(value, 3) for name, value in cpu_use.items()},
        "machine_busy": min(cpu_use.values()) < BUSY_CPU_USE,
    }
    result["targets_met"] = {f"{key}_ge_{value}": result[key] >= value for key, value in TARGETS.items()
                             if result[key] is not None}
    for name in sides:
        print(f"  {name:<11} median {median[name]:8.3f} ms", file=sys.stderr)
    if result["machine_busy"]:
        print("warning: another process used the CPU during the timing; the ratios are not representative",
              file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
