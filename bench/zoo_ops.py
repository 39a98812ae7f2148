"""Do the architectures users bring go through hat's flow, and what stays float?

    OMP_NUM_THREADS=1 .venv/bin/python bench/zoo_ops.py [--archs NAME ...] [--marches M ...]
        [--opts 0 3] [--out results.json]

For each architecture (torchvision `mobilenet_v2`, `resnet18`, `resnet50`, `efficientnet_b0`,
`swin_t`, `mobilenet_v3_small`, `mobilenet_v3_large`, `shufflenet_v2_x0_5`, `regnet_x_400mf`, timm
`repvgg_a0`; random weights, BatchNorm statistics from one random batch, 10 classes, a small
input) and each march, the flow `hat export` / `hat check` / `hat compile` take, through the
importable functions and without training: `prepare_quantized`, calibration on 2 random batches,
`convert_to_integer`, `integer_program`, `export_program` + `export_onnx`, `check_model`,
`compile_model` at each `--opts` level, and the artifact run against `int_infer` on 8 random images.

Recorded per architecture x march: whether each step worked (else its error), the ops the
quantizer left unannotated, the ops the integer program still computes in float (grouped: not
quantized at all / quantized around but without an integer rule / data movement of integers),
the CPU fallbacks `hat check` names (op and reason), and per level whether the artifact returns
exactly what `int_infer` returns (share of values that differ, largest difference, in output
steps where the output is a dequantized accumulator). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _quantize import PlainFamily, realistic_statistics  # noqa: E402

ARCHS: dict[str, tuple[str, str, tuple[int, int]]] = {
    "mobilenet_v2": ("torchvision", "mobilenet_v2", (64, 64)),
    "resnet18": ("torchvision", "resnet18", (64, 64)),
    "resnet50": ("torchvision", "resnet50", (64, 64)),
    "efficientnet_b0": ("torchvision", "efficientnet_b0", (64, 64)),
    "swin_t": ("torchvision", "swin_t", (64, 64)),
    "mobilenet_v3_small": ("torchvision", "mobilenet_v3_small", (64, 64)),
    "mobilenet_v3_large": ("torchvision", "mobilenet_v3_large", (64, 64)),
    "shufflenet_v2_x0_5": ("torchvision", "shufflenet_v2_x0_5", (64, 64)),
    "regnet_x_400mf": ("torchvision", "regnet_x_400mf", (64, 64)),
    "repvgg_a0": ("timm", "repvgg_a0", (64, 64)),
}
"""name -> (library, builder, input size)."""
MARCHES = ("nash_e", "bayes_e", "bernoulli2", "host")
DATA_MOVEMENT = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "flatten", "clone", "contiguous", "squeeze",
    "unsqueeze", "slice", "max_pool2d", "max_pool2d_with_indices", "cat", "roll", "constant_pad_nd", "pad",
    "split", "split_with_sizes", "chunk", "getitem", "expand", "select", "upsample_nearest2d", "dropout",
    "pixel_shuffle", "pixel_unshuffle", "unbind", "alias", "_to_copy", "dropout_",
}
"""aten ops that move or select values: a quantized input passes through them unchanged."""
QDQ = ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel")


def build(name: str) -> tuple[torch.nn.Module, tuple[int, int]]:
    """The architecture `name` with random weights, 10 classes, realistic BatchNorm statistics."""
    library, builder, size = ARCHS[name]
    torch.manual_seed(0)
    if library == "torchvision":
        import torchvision

        model = getattr(torchvision.models, builder)(weights=None, num_classes=10)
    else:
        import timm

        model = timm.create_model(builder, pretrained=False, num_classes=10)
    return realistic_statistics(model, size), size


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", str(target))
    if hasattr(target, "_schema"):
        name = target._schema.name.split("::")[-1]
    return name.split(".")[0]


def float_ops(integer: torch.fx.GraphModule) -> dict[str, dict[str, int]]:
    """The ops the integer program still computes in float, by kind:
    `not_quantized` (no quantize after it nor dequantize before it), `no_integer_rule` (between a
    dequantize and a quantize, computed in float: the reference form), `data_movement` (values moved,
    exact), `after_accumulator` (a float op applied to a dequantized accumulator)."""
    kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for node in integer.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name.startswith("int_") or name in QDQ or name in ("quantize_input", "sym_size", "getitem"):
            continue
        if "sym_" in name or not hasattr(node.target, "_schema"):
            continue
        inputs = node.all_input_nodes
        dq_in = any(_op_name(a.target) == "dequantize_per_tensor" for a in inputs if a.op == "call_function")
        q_out = any(_op_name(u.target) == "quantize_per_tensor" for u in node.users)
        acc_in = any(_op_name(a.target) == "int_weighted" for a in inputs if a.op == "call_function")
        if name in DATA_MOVEMENT:
            kind = "data_movement" if (dq_in or q_out) else "data_movement_float"
        elif dq_in and q_out:
            kind = "no_integer_rule"
        elif acc_in:
            kind = "after_accumulator"
        elif dq_in or q_out:
            kind = "half_quantized"
        else:
            kind = "not_quantized"
        kinds[kind][name] += 1
    return {k: dict(v) for k, v in sorted(kinds.items())}


def _output_steps(integer: torch.fx.GraphModule) -> list[torch.Tensor | None]:
    """Per output, the step of its grid where it is a dequantized accumulator (s_x s_w per channel)."""
    output = next(n for n in integer.graph.nodes if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    steps = []
    for value in values:
        step = None
        if isinstance(value, torch.fx.Node) and _op_name(value.target) == "int_weighted" and value.args[10] is None:
            w_scale = getattr(integer, value.args[7].target)
            step = (torch.tensor(value.args[2], dtype=torch.float32) * w_scale.to(torch.float32))
        elif isinstance(value, torch.fx.Node) and _op_name(value.target) == "dequantize_per_tensor":
            step = torch.tensor(float(value.args[1]))
        steps.append(step)
    return steps


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def run_one(name: str, march_name: str, opts: tuple[int, ...], folder: Path) -> dict[str, Any]:
    """Take one architecture through the flow for one march; every step's outcome."""
    from hatcli.deploy.check import FALLBACK, check_model
    from hatcli.deploy.compile import compile_model
    from hatcli.deploy.export import export_onnx
    from hatcli.deploy.runtime import load_artifact
    from hatcli.quant.flow import convert_to_integer, export_program, prepare_quantized, set_mode
    from hatcli.quant.integer import integer_program
    from hatcli.quant.march import load_march

    result: dict[str, Any] = {"arch": name, "march": march_name}
    tic = time.perf_counter()
    step = "build"
    try:
        model, size = build(name)
        result["input_size"] = list(size)
        profile = load_march(march_name)
        step = "prepare"
        prepared, quantizer = prepare_quantized(PlainFamily(model), model, size, profile, [])
        result["unquantized"] = dict(collections.Counter(
            u.split("(")[1].split(")")[0].replace("aten.", "") for u in quantizer.unquantized))
        step = "calibrate"
        set_mode(prepared, "calibrate")
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(2):
                prepared(torch.randn(4, 3, *size, generator=gen))
        step = "convert"
        set_mode(prepared, "eval")
        reference = convert_to_integer(prepared)
        integer = integer_program(reference, profile.quant.accumulator_bits)
        result["integer_ops"] = dict(collections.Counter(op.split()[0] for op in integer.integer_ops))
        result["float_ops"] = float_ops(integer)
        step = "export"
        example = (torch.randn(2, 3, *size),)
        onnx_path = folder / f"{name}-{march_name}.onnx"
        export_onnx(export_program(reference, example), example, onnx_path, ["logits"])
        result["export"] = "ok"
        step = "check"
        report = check_model(onnx_path, profile, input_shape=[1, 3, *size])
        reasons = collections.Counter(f"{r.op_type}: {r.reason}" for r in report.rows if r.status == FALLBACK)
        result["check"] = {"layers": len(report.rows), "fallbacks": report.fallbacks, "reasons": dict(reasons)}
        notes = collections.Counter(f"{r.op_type}: {r.reason}" for r in report.rows
                                    if r.status != FALLBACK and r.reason and "output" not in r.reason)
        if notes:
            result["check"]["bpu_notes"] = dict(notes)
        images = torch.randn(8, 3, *size, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ours = integer(images)
        ours = tuple(ours) if isinstance(ours, (tuple, list)) else (ours,)
        steps = _output_steps(integer)
        result["compile"], result["exact"] = {}, {}
        for opt in opts:
            step = f"compile -O{opt}"
            out = compile_model(onnx_path, profile, opt, folder / f"{name}-{march_name}-O{opt}",
                                {"shape": ["N", 3, *size]}, measure=False)
            result["compile"][str(opt)] = "ok"
            step = f"run -O{opt}"
            theirs = [torch.from_numpy(t) for t in load_artifact(out).run(images.numpy())]
            verdicts = []
            for a, b, unit in zip(ours, theirs, steps):
                if a.shape != b.shape:
                    verdicts.append({"equal": False, "shape": [list(a.shape), list(b.shape)]})
                    continue
                gap = (a.to(torch.float64) - b.to(torch.float64)).abs()
                verdict = {"equal": bool(torch.equal(a, b)), "differ": round(float((gap > 0).float().mean()), 5),
                           "max_abs": float(gap.max())}
                if unit is not None:
                    verdict["max_steps"] = round(float((gap / unit.to(torch.float64)).max()), 3)
                verdicts.append(verdict)
            result["exact"][str(opt)] = verdicts[0] if len(verdicts) == 1 else verdicts
        step = "done"
    except Exception as exc:  # noqa: BLE001 - the bench records every failure and goes on
        result["failed"] = step
        result["error"] = _first_line(exc)
        if os.environ.get("ZOO_TRACE"):
            traceback.print_exc()
    result["seconds"] = round(time.perf_counter() - tic, 1)
    return result


def summary_row(r: dict[str, Any]) -> str:
    """One line of the table: arch, march, then each step."""
    prepare = "FAIL" if r.get("failed") in ("build", "prepare", "calibrate", "convert") else "ok"
    export = r.get("export", "FAIL" if prepare == "ok" else "-")
    fallbacks = r.get("check", {}).get("fallbacks", "-")
    compiled = "ok" if r.get("compile") and all(v == "ok" for v in r["compile"].values()) else (
        "FAIL" if export == "ok" else "-")
    exact = r.get("exact", {})
    verdicts = [v if isinstance(v, dict) else v[0] for v in exact.values()]
    same = ("yes" if verdicts and all(v.get("equal") for v in verdicts) else
            ("no (max %s steps)" % max(v.get("max_steps", v.get("max_abs", 0)) for v in verdicts) if verdicts else "-"))
    return f"{r['arch']:20s} {r['march']:10s} {prepare:5s} {export:5s} {str(fallbacks):4s} {compiled:5s} {same}"


def main(argv: list[str] | None = None) -> int:
    """Run the architectures x marches asked for and print the results (last line: JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--marches", nargs="*", default=list(MARCHES))
    parser.add_argument("--opts", nargs="*", type=int, default=[0, 3])
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    warnings.simplefilter("ignore")
    results = []
    with tempfile.TemporaryDirectory() as where:
        for name in args.archs:
            for march in args.marches:
                result = run_one(name, march, tuple(args.opts), Path(where))
                results.append(result)
                print(summary_row(result), f"({result['seconds']} s)", result.get("error", ""),
                      file=sys.stderr, flush=True)
                if args.out:
                    args.out.write_text(json.dumps({"results": results}, indent=1))
    print(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
