"""Top-1 of every stage of hat's quantization flow on CIFAR-10, beside torchao's stock QAT flow.

    .venv/bin/python bench/quant_accuracy.py [--float-epochs 8] [--qat-epochs 1] [--alpha 0.5]
        [--train-limit N] [--val-limit N] [--work-dir DIR] [--reuse]

Data: CIFAR-10 as JPEGs (../shared/data/cifar10-jpg.tar.gz, 50,000 train and 10,000 test
images, 32x32, 10 classes). The tarball is unpacked under `--work-dir` and packed with the
product: `hat pack imagenet --split train` and `--split test` (the test split is the validation
set, `data.val = "test_lmdb"`). `--train-limit` / `--val-limit` keep the first N/10 images of
every class (sorted file names) for short runs. Without the tarball the benchmark says so on
stderr and exits with code 2.

Our flow: `recipes/cifar10_mobilenet.toml` (MobileNetV1, CIFAR stem, batch 64, SGD, cosine),
run stage by stage through the CLI in subprocesses, exactly as a user would type it, with
`--set` overrides for `data.root`, `work_dir`, `float.epochs`, `qat.epochs` and `model.alpha`
so that every file lands under `--work-dir`:

    hat train R --stage float | calibration | qat --json   -> float, calibration (PTQ), qat top-1
    hat eval R --stage int_infer --json                     -> the integer program's top-1
    hat export R ; hat compile R ; hat eval R --stage deploy --json
                                                            -> the compiled ONNX artifact on ONNX Runtime

Stock flow (in this process): torchao's `X86InductorQuantizer` with
`get_default_x86_inductor_quantization_config(is_qat=True)` (uint8 affine activations with
moving-average observers, int8 per-channel weights, conv+BN simulated by torchao's QAT fusion).
It starts from the SAME float checkpoint our flow trained: the float model is exported in train
mode (`torch.export.export`, free batch dimension), `prepare_qat_pt2e`'d, observes the same
`calibration.num_batches` training batches our calibration stage sees (eval mode, fake quant
off), is fine-tuned with hat's own training loop (`hatcli.engine.trainer.fit`: the recipe's
`[qat]` epochs, optimizer, LR schedule, label smoothing, batch size, data and augmentation), its
observers on while training and off while validating, and its best checkpoint is converted with
`convert_pt2e` and evaluated on the same validation set -> `stock_int_top1`.

Step time: the float model (`float` checkpoint, train mode) and our prepared QAT graph (`qat`
checkpoint, `set_mode(prepared, "train")`) each train on the same real batch (forward, the
family's loss, backward, optimizer step with the stage's own optimizer settings). After warm-up
steps they take turns, `--steps` steps each, for `--rounds` rounds, so machine noise hits both
alike; `qat_vs_float_step_time` = median QAT step / median float step. The stock prepared graph
is timed in the same rounds (`stock_qat_vs_float_step_time`, for information). `cpu_use` is the
process CPU time over the timed steps divided by their wall time and the thread count: about 1
on an idle machine; below 0.85 the run is flagged `machine_busy`.

Targets: float - int_infer <= 0.3 points; int_infer >= stock_int_top1;
qat_vs_float_step_time <= 2.0. Progress goes to stderr; the last line on stdout is one JSON
object with `float_top1`, `calibration_top1`, `qat_top1`, `int_infer_top1`, `deploy_top1`,
`stock_int_top1` (top-1 in percent), `qat_vs_float_step_time`, and the extra keys described in
`main`. With the defaults (alpha 0.5, 8 float epochs, 1 QAT epoch, all 60,000 images) the run
takes about 35 minutes on 2 CPU cores. A stage that fails ends the run: its error is printed on
stderr, the JSON line carries `error` and the numbers measured so far, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _flow import ROOT, StageFailed, hat, log, pack, subset, unpack  # noqa: E402
from hatcli.deploy.timing import BUSY_CPU_USE, time_in_turns  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "hat-bench-quant-accuracy"
RECIPE = ROOT / "recipes" / "cifar10_mobilenet.toml"
TARGETS = {"float_minus_int_infer": 0.3, "qat_vs_float_step_time": 2.0}
RESULT_KEYS = ("float_top1", "calibration_top1", "qat_top1", "int_infer_top1", "deploy_top1",
               "stock_int_top1", "qat_vs_float_step_time")


# -- our flow, through the CLI -----------------------------------------------------------------


def run_our_flow(recipe: Path, overrides: list[str], reuse: bool, seconds: dict[str, float]) -> dict[str, float]:
    """Run float, calibration, qat, int_infer, export, compile and deploy through the CLI; return top-1s."""
    from hatcli.stages import is_up_to_date, read_stage_record
    from hatcli.recipe import load_recipe

    sets = [x for item in overrides for x in ("--set", item)]
    top1: dict[str, float] = {}
    for stage in ("float", "calibration", "qat"):
        lr = load_recipe(recipe, overrides)
        if reuse and is_up_to_date(lr, stage):
            record = read_stage_record(lr, stage)
            log(f"{stage}: up to date, reusing (top-1 {record['metrics']['top1']:.2f})")
        else:
            tic = time.perf_counter()
            record = hat(["train", str(recipe), "--stage", stage, *sets], stage)
            seconds[stage] = round(time.perf_counter() - tic, 1)
        top1[stage] = float(record["metrics"]["top1"])
        log(f"{stage}: top-1 {top1[stage]:.2f}")
    for step, args in (("int_infer", ["eval", str(recipe), "--stage", "int_infer", *sets]),
                       ("export", ["export", str(recipe), *sets]),
                       ("compile", ["compile", str(recipe), *sets]),
                       ("deploy", ["eval", str(recipe), "--stage", "deploy", *sets])):
        tic = time.perf_counter()
        result = hat(args, step)
        seconds[step] = round(time.perf_counter() - tic, 1)
        if step in ("int_infer", "deploy"):
            top1[step] = float(result["metrics"]["top1"])
            log(f"{step}: top-1 {top1[step]:.2f}")
    return top1


# -- torchao's stock flow, in process ----------------------------------------------------------


def stock_prepare(lr: Any) -> Any:
    """The float checkpoint of our flow, exported in train mode and prepared by `prepare_qat_pt2e`
    with torchao's X86InductorQuantizer and its default QAT config."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from hatcli.workflows.stage_models import load_float_model
    from hatcli.quant.flow import batch_dynamic_shapes

    model, _ = load_float_model(lr)
    deploy = lr.family.build_deploy_model(model).train()
    example = lr.family.example_inputs(tuple(lr.recipe.data.input_size), batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(deploy, example, dynamic_shapes=batch_dynamic_shapes(example)).module()
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    return prepare_qat_pt2e(graph, quantizer)


def stock_set_mode(prepared: Any, mode: str) -> None:
    """Stock mode switch: train mode with observers on, or eval mode with observers off (fake quant on)."""
    from torchao.quantization.pt2e import (
        FakeQuantizeBase,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )

    if mode == "train":
        move_exported_model_to_train(prepared)
    else:
        move_exported_model_to_eval(prepared)
    for module in prepared.modules():
        if isinstance(module, FakeQuantizeBase):
            module.enable_fake_quant()
            module.enable_observer() if mode == "train" else module.disable_observer()


def run_stock_flow(lr: Any, out_dir: Path, seconds: dict[str, float]) -> dict[str, float]:
    """Calibrate, QAT-train (hat's loop, the recipe's [qat] settings), convert and evaluate the stock
    flow; return its calibration, qat (fake quant) and integer top-1."""
    import torch
    from torchao.quantization.pt2e import FakeQuantizeBase, move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from hatcli.engine.checkpoint import load_checkpoint
    from hatcli.engine.loaders import build_loader
    from hatcli.engine.trainer import TrainSpec, evaluate, fit

    tic = time.perf_counter()
    torch.manual_seed(lr.recipe.seed)
    prepared = stock_prepare(lr)
    # the same batches as our calibration stage: the seeded, shuffled training loader's first N
    move_exported_model_to_eval(prepared)
    for module in prepared.modules():
        if isinstance(module, FakeQuantizeBase):
            module.disable_fake_quant()
            module.enable_observer()
    loader = build_loader(lr, "train", shuffle=True)
    num = min(lr.recipe.calibration.num_batches, len(loader))
    with torch.no_grad():
        for images, _ in itertools.islice(loader, num):
            prepared(images)
    stock_set_mode(prepared, "eval")
    out = {"stock_calibration_top1": evaluate(prepared, build_loader(lr, "val"), lr.family,
                                              description="stock calibration val")["top1"]}
    seconds["stock_calibration"] = round(time.perf_counter() - tic, 1)
    log(f"stock calibration: top-1 {out['stock_calibration_top1']:.2f}")

    tic = time.perf_counter()
    cfg = lr.recipe.qat
    spec = TrainSpec(epochs=cfg.epochs, optimizer=cfg.optimizer, label_smoothing=cfg.label_smoothing,
                     val_every=cfg.val_every, out_dir=out_dir, stage="stock_qat", ema=cfg.ema,
                     grad_clip=cfg.grad_clip)
    torch.manual_seed(lr.recipe.seed)
    summary = fit(prepared, lr.family, build_loader(lr, "train"), build_loader(lr, "val"), spec,
                  set_mode=stock_set_mode)
    best = load_checkpoint(Path(summary["checkpoint_best"]))
    prepared.load_state_dict(best["model"])
    out["stock_qat_top1"] = float(best["metrics"]["top1"])
    seconds["stock_qat"] = round(time.perf_counter() - tic, 1)
    log(f"stock qat: top-1 {out['stock_qat_top1']:.2f} (fake quant)")

    tic = time.perf_counter()
    stock_set_mode(prepared, "eval")
    with torch.no_grad():
        converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    out["stock_int_top1"] = evaluate(converted, build_loader(lr, "val"), lr.family,
                                     description="stock int eval")["top1"]
    seconds["stock_int"] = round(time.perf_counter() - tic, 1)
    log(f"stock integer model: top-1 {out['stock_int_top1']:.2f}")
    return out


# -- step time ---------------------------------------------------------------------------------


def train_step(model: Any, optimizer: Any, family: Any, images: Any, labels: Any, smoothing: float) -> float:
    """One optimizer step (forward, loss, backward, step) on one batch; return the loss."""
    loss = family.loss(model(images), labels, label_smoothing=smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def step_times(lr: Any, rounds: int, steps: int, warmup: int) -> dict[str, Any]:
    """Median training-step time of the float model, our QAT graph and the stock QAT graph, timed in
    turns on the same batch; return the medians, ratios and CPU use."""
    import torch

    from hatcli.engine.loaders import build_loader
    from hatcli.engine.schedule import build_optimizer
    from hatcli.workflows.stage_models import load_float_model, load_prepared
    from hatcli.quant.flow import set_mode

    images, labels = next(iter(build_loader(lr, "train")))
    float_model, _ = load_float_model(lr)
    float_model.train()
    ours, _ = load_prepared(lr, "qat")
    set_mode(ours, "train")
    stock = stock_prepare(lr)
    stock_set_mode(stock, "train")
    sides = {
        "float": (float_model, build_optimizer(float_model, lr.recipe.float_.optimizer), lr.recipe.float_.label_smoothing),
        "qat": (ours, build_optimizer(ours, lr.recipe.qat.optimizer), lr.recipe.qat.label_smoothing),
        "stock_qat": (stock, build_optimizer(stock, lr.recipe.qat.optimizer), lr.recipe.qat.label_smoothing),
    }
    threads = torch.get_num_threads()
    steppers = {name: (lambda m=model, o=opt, s=smoothing: train_step(m, o, lr.family, images, labels, s))
                for name, (model, opt, smoothing) in sides.items()}
    times, cpu_use = time_in_turns(steppers, rounds, steps, warmup, threads)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "qat_vs_float_step_time": round(median["qat"] / median["float"], 4),
        "stock_qat_vs_float_step_time": round(median["stock_qat"] / median["float"], 4),
        "step_ms": {name: round(value * 1e3, 2) for name, value in median.items()},
        "step_batch": [int(images.shape[0]), *map(int, images.shape[1:])],
        "timed_steps_per_side": rounds * steps,
        "threads": threads,
        "cpu_use": {name: round(value, 3) for name, value in cpu_use.items()},
        "machine_busy": min(cpu_use.values()) < BUSY_CPU_USE,
    }


# -- main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cifar10-jpg.tar.gz")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                        help="unpacked data, packed databases and runs (default: %(default)s)")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="recipe of our flow (default: %(default)s)")
    parser.add_argument("--float-epochs", type=int, default=8, help="float training epochs")
    parser.add_argument("--qat-epochs", type=int, default=1, help="QAT epochs (ours and stock)")
    parser.add_argument("--alpha", type=float, default=0.5, help="MobileNetV1 width multiplier")
    parser.add_argument("--train-limit", type=int, default=None, help="training images (default: all 50,000)")
    parser.add_argument("--val-limit", type=int, default=None, help="validation images (default: all 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="recipe seed")
    parser.add_argument("--rounds", type=int, default=10, help="step-time rounds")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse packed data and training stages that are up to date in --work-dir")
    return parser.parse_args()


def summarize(result: dict[str, Any]) -> None:
    """Print the table and the targets on stderr."""
    rows = [("float", "float_top1"), ("calibration (PTQ)", "calibration_top1"), ("qat (fake quant)", "qat_top1"),
            ("int_infer (integer program)", "int_infer_top1"), ("deploy (ONNX Runtime)", "deploy_top1"),
            ("stock X86Inductor calibration", "stock_calibration_top1"),
            ("stock X86Inductor qat (fake quant)", "stock_qat_top1"),
            ("stock X86Inductor integer model", "stock_int_top1")]
    for label, key in rows:
        value = result.get(key)
        print(f"  {label:<36} {'-' if value is None else f'{value:6.2f}'}", file=sys.stderr)
    for name, met in result.get("targets_met", {}).items():
        print(f"  target {name}: {'met' if met else 'NOT met'}", file=sys.stderr)


def main() -> int:
    """Run the benchmark; return the process exit code."""
    args = parse_args()
    if not args.data.is_file():
        print(f"error: {args.data} not found: this benchmark needs CIFAR-10 as JPEGs "
              f"(../shared/data/cifar10-jpg.tar.gz); pass --data", file=sys.stderr)
        return 2
    wall = time.perf_counter()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    seconds: dict[str, float] = {}
    try:
        tic = time.perf_counter()
        src = unpack(args.data, work)
        data_dir = work / "data" / f"train{args.train_limit or 'all'}_val{args.val_limit or 'all'}"
        train_n = pack(subset(src, "train", args.train_limit, work), "train", data_dir, args.reuse)
        val_n = pack(subset(src, "test", args.val_limit, work), "test", data_dir, args.reuse)
        seconds["data"] = round(time.perf_counter() - tic, 1)
        overrides = [f"data.root={data_dir}", f"work_dir={work / 'runs'}", f"float.epochs={args.float_epochs}",
                     f"qat.epochs={args.qat_epochs}", f"model.alpha={args.alpha}", f"seed={args.seed}"]
        result.update(train_images=train_n, val_images=val_n, alpha=args.alpha, float_epochs=args.float_epochs,
                      qat_epochs=args.qat_epochs, seed=args.seed)
        log(f"our flow: {args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe}, "
            f"alpha {args.alpha}, {args.float_epochs} float + {args.qat_epochs} QAT epochs, "
            f"{train_n} train / {val_n} val images")
        ours = run_our_flow(args.recipe, overrides, args.reuse, seconds)
        result.update({f"{stage}_top1": value for stage, value in ours.items()})

        from hatcli.recipe import load_recipe

        lr = load_recipe(args.recipe, overrides)
        log("stock flow: torchao X86InductorQuantizer QAT from the same float checkpoint")
        result.update(run_stock_flow(lr, work / "runs" / "stock_x86_inductor", seconds))

        log(f"step time: float vs our QAT graph vs stock QAT graph, {args.rounds} rounds x {args.steps} steps")
        tic = time.perf_counter()
        result.update(step_times(lr, args.rounds, args.steps, warmup=3))
        seconds["step_time"] = round(time.perf_counter() - tic, 1)
        if result["machine_busy"]:
            log("warning: the threads did not have the cores to themselves during the step timing; "
                "the step-time ratio is not representative")
    except StageFailed as exc:
        result["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - report any failure in the JSON line, with its type
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"

    if result.get("float_top1") is not None and result.get("int_infer_top1") is not None:
        result["float_minus_int_infer"] = round(result["float_top1"] - result["int_infer_top1"], 2)
    if result.get("int_infer_top1") is not None and result.get("stock_int_top1") is not None:
        result["int_infer_minus_stock_int"] = round(result["int_infer_top1"] - result["stock_int_top1"], 2)
    met = {}
    if "float_minus_int_infer" in result:
        met["float_minus_int_infer_le_0.3"] = result["float_minus_int_infer"] <= TARGETS["float_minus_int_infer"]
    if "int_infer_minus_stock_int" in result:
        met["int_infer_ge_stock_int"] = result["int_infer_minus_stock_int"] >= 0
    if result.get("qat_vs_float_step_time") is not None:
        met["qat_vs_float_step_time_le_2.0"] = result["qat_vs_float_step_time"] <= TARGETS["qat_vs_float_step_time"]
    result["targets_met"] = met
    result["seconds"] = seconds
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    if "error" in result:
        log(f"FAILED: {result['error']}")
    summarize(result)
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
