"""Low-bit QAT on CIFAR-10 ResNet-20: every scheme x bit width fine-tuned from one float model,
beside the published figures.

    .venv/bin/python bench/lowbit_accuracy.py [--float-epochs 30] [--qat-epochs 6] [--qat-lr 0.001]
        [--calibration-batches 8] [--runs lsq_w4a4,pact_w2a2,...] [--train-limit N] [--val-limit N]
        [--work-dir DIR]

Data: CIFAR-10 as JPEGs (../shared/data/cifar10-jpg.tar.gz, 50,000 train / 10,000 test images),
unpacked under `--work-dir` and packed with `hat pack imagenet` (the test split validates).
Without the tarball the benchmark says so on stderr and exits with code 2.

Flow, through the CLI exactly as a user types it (`recipes/cifar10_resnet20.toml` with `--set`
overrides so every file lands under `--work-dir`):

1. one float model: `hat train R --stage float` (`--float-epochs`), its best top-1 is `float_top1`;
2. for every run (`--runs`; default: LSQ, PACT and DoReFa at W4A4, W3A3 and W2A2, XNOR at W1A1,
   LQ-Net at W2A2) in a folder of its own that starts from a hard-linked copy of the float stage:
   `hat train R --stage calibration`, `--stage qat` (`--qat-epochs`, SGD at `--qat-lr`, cosine)
   with `quant.scheme`, `quant.weight_bits` and `quant.activation_bits` set (first and last
   layer at the march's int8, hat's default); then for uniform schemes `hat eval --stage
   int_infer`, `hat export`, `hat compile` (nash_e, opt 3) and `hat eval --stage deploy`.
   LQ-Net stops after QAT (its levels are not integer-deployable).

Every run's numbers are written to `<work-dir>/results.json` as soon as it ends, and finished
stages are reused (`hat`'s own stage records), so an interrupted benchmark resumes where it
stopped: run the same command again.

Targets, on the gap to our own float model: best 4-bit scheme <= 0.5 points; best 2-bit scheme
<= 1.9 points (below PACT's published 2-bit gap of 1.9 = 91.6 - 89.7); every uniform scheme's
deploy top-1 == its int_infer top-1. Progress goes to stderr; the last line on stdout is one JSON
object: `float_top1`, one entry per run (`lsq_w2a2`, ...) with `qat_top1`, `int_infer_top1`,
`deploy_top1` (null where a stage does not apply), `targets_met`, the budget and the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _flow import ROOT, StageFailed, hat, log, pack, subset, unpack  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "hat-bench-lowbit-accuracy"
RECIPE = ROOT / "recipes" / "cifar10_resnet20.toml"
RUNS = ["lsq_w4a4", "lsq_w3a3", "lsq_w2a2", "pact_w4a4", "pact_w3a3", "pact_w2a2",
        "dorefa_w4a4", "dorefa_w3a3", "dorefa_w2a2", "xnor_w1a1", "lqnet_w2a2"]
NOT_INTEGER = {"lqnet"}
PUBLISHED = {  # CIFAR-10 ResNet-20 top-1, PACT paper (Choi et al. 2018, Table / Fig. of ResNet20)
    "full_precision": 91.6,
    "pact_w4a4": 91.3, "pact_w3a3": 91.1, "pact_w2a2": 89.7,
    "dorefa_w4a4": 90.5, "dorefa_w3a3": 89.9, "dorefa_w2a2": 88.2,
}
TARGETS = {"best_4bit_gap": 0.5, "best_2bit_gap": 1.9}


def parse_run(key: str) -> tuple[str, int, int]:
    """`lsq_w2a2` -> ("lsq", 2, 2)."""
    scheme, bits = key.rsplit("_", 1)
    weight, activation = bits.lstrip("w").split("a")
    return scheme, int(weight), int(activation)


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--float-epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=6)
    parser.add_argument("--qat-lr", type=float, default=0.001)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated scheme_wXaY keys")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--val-limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for key in args.runs:
        try:
            parse_run(key)
        except ValueError:
            parser.error(f"--runs: `{key}` is not SCHEME_wXaY (e.g. lsq_w2a2)")
    return args


def _sets(overrides: list[str]) -> list[str]:
    return [x for item in overrides for x in ("--set", item)]


def _train(recipe: Path, overrides: list[str], stage: str, what: str, seconds: dict[str, float]) -> float:
    """Train `stage` (reused when up to date); its best top-1."""
    from hatcli.recipe import load_recipe
    from hatcli.stages import is_up_to_date, read_stage_record

    lr = load_recipe(recipe, overrides)
    if is_up_to_date(lr, stage):
        record = read_stage_record(lr, stage)
        log(f"{what}: up to date, reusing (top-1 {record['metrics']['top1']:.2f})")
    else:
        tic = time.perf_counter()
        record = hat(["train", str(recipe), "--stage", stage, *_sets(overrides)], what)
        seconds[what] = round(time.perf_counter() - tic, 1)
    return float(record["metrics"]["top1"])


def _link_float(float_work: Path, run_work: Path, task: str) -> None:
    """Give a run the float stage by hard links (a copy where links are refused)."""
    source, target = float_work / task / "float", run_work / task / "float"
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name("float.partial")
    if partial.exists():
        shutil.rmtree(partial)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, partial, copy_function=link, ignore=shutil.ignore_patterns("*.lock"))
    partial.rename(target)


def run_one(key: str, recipe: Path, base: list[str], float_work: Path, work: Path, args: argparse.Namespace,
            seconds: dict[str, float]) -> dict[str, Any]:
    """Calibrate, fine-tune, convert, export, compile and deploy one scheme x bit width."""
    scheme, weight_bits, activation_bits = parse_run(key)
    run_work = work / "runs" / key
    _link_float(float_work, run_work, "cifar10_resnet20")
    overrides = base + [f"work_dir={run_work}", f"quant.scheme={scheme}", f"quant.weight_bits={weight_bits}",
                        f"quant.activation_bits={activation_bits}", f"qat.epochs={args.qat_epochs}",
                        f"calibration.num_batches={args.calibration_batches}",
                        f"qat.optimizer.lr={args.qat_lr}", "qat.optimizer.schedule=cosine",
                        "qat.optimizer.momentum=0.9"]
    out: dict[str, Any] = {"qat_top1": None, "int_infer_top1": None, "deploy_top1": None}
    out["calibration_top1"] = _train(recipe, overrides, "calibration", f"{key} calibration", seconds)
    out["qat_top1"] = _train(recipe, overrides, "qat", f"{key} qat", seconds)
    if scheme in NOT_INTEGER:
        out["note"] = "levels not uniform: fake quantization only, stops after qat"
        return out
    sets = _sets(overrides)
    for step, cli in (("int_infer", ["eval", str(recipe), "--stage", "int_infer", *sets]),
                      ("export", ["export", str(recipe), *sets]),
                      ("compile", ["compile", str(recipe), *sets]),
                      ("deploy", ["eval", str(recipe), "--stage", "deploy", *sets])):
        tic = time.perf_counter()
        result = hat(cli, f"{key} {step}")
        seconds[f"{key} {step}"] = round(time.perf_counter() - tic, 1)
        if step in ("int_infer", "deploy"):
            out[f"{step}_top1"] = float(result["metrics"]["top1"])
    return out


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Gaps to our float model, and whether each target holds (None: not measured)."""
    float_top1 = result.get("float_top1")
    runs = {k: v for k, v in result["runs"].items() if isinstance(v, dict)}

    def best_gap(bits: int) -> float | None:
        gaps = [float_top1 - v["int_infer_top1"] for k, v in runs.items()
                if parse_run(k)[1:] == (bits, bits) and v.get("int_infer_top1") is not None]
        return round(min(gaps), 2) if gaps and float_top1 is not None else None

    gap4, gap2 = best_gap(4), best_gap(2)
    uniform = [v for k, v in runs.items() if parse_run(k)[0] not in NOT_INTEGER and v.get("deploy_top1") is not None]
    return {
        "best_4bit_gap": gap4, "best_2bit_gap": gap2,
        "best_4bit_gap_le_0.5": None if gap4 is None else gap4 <= TARGETS["best_4bit_gap"],
        "best_2bit_gap_le_1.9": None if gap2 is None else gap2 <= TARGETS["best_2bit_gap"],
        "deploy_equals_int_infer": None if not uniform else all(
            v["deploy_top1"] == v["int_infer_top1"] for v in uniform),
    }


def summarize(result: dict[str, Any]) -> None:
    """The table on stderr: ours beside the published figures."""
    float_top1 = result.get("float_top1")
    rows = [f"{'run':<12} {'qat':>7} {'int_infer':>9} {'deploy':>7} {'gap':>6}   published (gap)"]
    published_fp = PUBLISHED["full_precision"]
    rows.append(f"{'float':<12} {float_top1 if float_top1 is not None else '-':>7} {'':>9} {'':>7} {'':>6}   "
                f"{published_fp}")
    for key, run in result["runs"].items():
        if not isinstance(run, dict):
            rows.append(f"{key:<12} {run}")
            continue
        cells = [run.get(k) for k in ("qat_top1", "int_infer_top1", "deploy_top1")]
        reference = run.get("int_infer_top1") or run.get("qat_top1")
        gap = f"{float_top1 - reference:.2f}" if float_top1 is not None and reference is not None else "-"
        paper = PUBLISHED.get(key)
        paper_text = f"{paper} ({published_fp - paper:.1f})" if paper is not None else "-"
        rows.append(f"{key:<12} " + " ".join(f"{c if c is not None else '-':>{w}}" for c, w in zip(cells, (7, 9, 7)))
                    + f" {gap:>6}   {paper_text}")
    for row in rows:
        log(row)


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
    state_path = work / "results.json"
    saved = json.loads(state_path.read_text()) if state_path.exists() else {}
    budget = {"float_epochs": args.float_epochs, "qat_epochs": args.qat_epochs, "qat_lr": args.qat_lr,
              "calibration_batches": args.calibration_batches,
              "train_limit": args.train_limit, "val_limit": args.val_limit, "seed": args.seed}
    if saved.get("budget") != budget:
        saved = {}  # another budget: earlier results do not compare
    result: dict[str, Any] = {"float_top1": saved.get("float_top1"), "runs": dict(saved.get("runs", {})),
                              "budget": budget, "published": PUBLISHED}
    seconds: dict[str, float] = {}

    def save() -> None:
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, state_path)

    try:
        tic = time.perf_counter()
        src = unpack(args.data, work)
        data_dir = work / "data" / f"train{args.train_limit or 'all'}_val{args.val_limit or 'all'}"
        result["train_images"] = pack(subset(src, "train", args.train_limit, work), "train", data_dir, True)
        result["val_images"] = pack(subset(src, "test", args.val_limit, work), "test", data_dir, True)
        seconds["data"] = round(time.perf_counter() - tic, 1)
        # validate the float model every 10 epochs and at the end (hat always validates the last
        # epoch); QAT runs validate every epoch
        base = [f"data.root={data_dir}", f"float.epochs={args.float_epochs}", f"seed={args.seed}",
                f"float.val_every={min(10, args.float_epochs)}"]
        float_work = work / "runs" / "float"
        result["float_top1"] = _train(args.recipe, base + [f"work_dir={float_work}"], "float", "float", seconds)
        save()
        for key in args.runs:
            if isinstance(result["runs"].get(key), dict) and "error" not in result["runs"][key]:
                log(f"{key}: done earlier, reusing")
                continue
            try:
                result["runs"][key] = run_one(key, args.recipe, base, float_work, work, args, seconds)
            except StageFailed as exc:
                result["runs"][key] = {"error": str(exc)}
            save()
    except StageFailed as exc:
        result["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - report any failure in the JSON line, with its type
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["targets_met"] = targets(result)
    result["seconds"] = seconds
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    summarize(result)
    out = {"float_top1": result["float_top1"], **result["runs"], "targets_met": result["targets_met"],
           "budget": budget, "published": PUBLISHED, "seconds": seconds, "wall_s": result["wall_s"]}
    if "error" in result:
        out["error"] = result["error"]
        log(f"FAILED: {result['error']}")
    print(json.dumps(out))
    return 1 if "error" in result or any("error" in r for r in result["runs"].values() if isinstance(r, dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
