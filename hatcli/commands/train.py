"""`hat train RECIPE --stage float|calibration|qat`, in one process or several (`--nproc-per-node`)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from hatcli.commands._options import JsonOpt, RecipeArg, SetOpt, load, print_json, print_metrics
from hatcli.errors import HatError, Interrupted, UsageError

if TYPE_CHECKING:
    from hatcli.recipe import LoadedRecipe

EXAMPLES = """
Examples:

  hat train recipes/quickstart.toml --stage float

  hat train recipes/quickstart.toml --stage calibration

  hat train recipes/quickstart.toml --stage calibration --from my_float.pth

  hat train recipes/quickstart.toml --stage qat --set qat.epochs=2

  hat train recipes/quickstart.toml --stage calibration --auto-int16 --max-drop 0.3

  hat train recipes/quickstart.toml --stage float --nproc-per-node 2

  hat train recipes/quickstart.toml --stage float --nproc-per-node 8 --nnodes 2 --node-rank 0 --rdzv-endpoint host0:29500 --rdzv-id job1
"""

LAUNCH_HELP = "Distributed (see docs/distributed.md)"
MIXED_HELP = "Mixed precision (see docs/recipes.md#mixed-precision)"


def _worker_argv(recipe: Path, stage: str, resume: bool, from_path: Path | None, overrides: list[str] | None,
                 json_out: bool) -> list[str]:
    """The `hat` arguments each worker runs: this command without the launcher options."""
    argv = ["train", str(recipe), "--stage", stage]
    if resume:
        argv.append("--resume")
    if from_path is not None:
        argv += ["--from", str(from_path)]
    for item in overrides or []:
        argv += ["--set", item]
    if json_out:
        argv.append("--json")
    return argv


def train(
    recipe: RecipeArg,
    stage: Annotated[str, typer.Option(help="float, calibration or qat.")] = "float",
    resume: Annotated[bool, typer.Option(help="Continue from the stage's last checkpoint.")] = False,
    from_path: Annotated[Path | None, typer.Option("--from", help="Start from this file instead of the previous "
                                                   "stage's checkpoint. With --stage calibration: a hat float "
                                                   "checkpoint, or your own weights (a PyTorch state dict .pt/.pth "
                                                   "or .safetensors), imported as the float stage.")] = None,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
    nproc_per_node: Annotated[int, typer.Option("--nproc-per-node", min=1, rich_help_panel=LAUNCH_HELP,
                                                help="Processes on this machine (one per GPU; gloo on CPU). "
                                                     "data.batch_size is per process.")] = 1,
    nnodes: Annotated[str, typer.Option("--nnodes", rich_help_panel=LAUNCH_HELP,
                                        help="Machines taking part (or MIN:MAX).")] = "1",
    node_rank: Annotated[int, typer.Option("--node-rank", min=0, rich_help_panel=LAUNCH_HELP,
                                           help="This machine's index, 0 .. nnodes-1.")] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option("--rdzv-endpoint", rich_help_panel=LAUNCH_HELP,
                                                      help="HOST:PORT where the machines meet (the same on every machine).")] = None,
    rdzv_id: Annotated[str | None, typer.Option("--rdzv-id", rich_help_panel=LAUNCH_HELP,
                                                help="Job id, the same on every machine.")] = None,
    auto_int16: Annotated[bool, typer.Option("--auto-int16", rich_help_panel=MIXED_HELP,
                                             help="With --stage calibration: promote the most sensitive layers to "
                                                  "int16 until the PTQ drop fits --max-drop, and write a recipe "
                                                  "for that set.")] = False,
    max_drop: Annotated[float | None, typer.Option("--max-drop", min=0.0, rich_help_panel=MIXED_HELP,
                                                   help="Largest accepted float - PTQ drop of the primary metric, "
                                                        "in points (default 0.5).")] = None,
    write_recipe: Annotated[Path | None, typer.Option("--write-recipe", rich_help_panel=MIXED_HELP,
                                                      help="Where to write the recipe (default "
                                                           "<recipe stem>.int16.toml next to it).")] = None,
    sensitivity_batches: Annotated[int | None, typer.Option("--sensitivity-batches", min=1,
                                                            rich_help_panel=MIXED_HELP,
                                                            help="Val batches for the sensitivity ranking "
                                                                 "(default all).")] = None,
) -> None:
    """Train one stage; each stage starts from the previous stage's best checkpoint."""
    if stage not in ("float", "calibration", "qat"):
        raise UsageError(f"unknown stage `{stage}`; choose float, calibration or qat")
    if stage == "float" and from_path is not None:
        raise UsageError("--from applies to calibration and qat: start float training from your weights with "
                         "`[model] weights = \"FILE\"` (or --set model.weights=FILE), or import them as the float "
                         "stage with `--stage calibration --from FILE`")
    lr = load(recipe, overrides)  # a bad recipe fails here, once, before any process is started
    if auto_int16 or max_drop is not None or write_recipe is not None or sensitivity_batches is not None:
        from hatcli.commands._auto_int16 import run_auto_int16

        run_auto_int16(recipe, lr, stage, auto_int16, max_drop, write_recipe, sensitivity_batches, from_path,
                       overrides, json_out, nproc_per_node, nnodes)
        return
    try:
        if (nproc_per_node > 1 or nnodes != "1") and "LOCAL_RANK" not in os.environ:
            from hatcli.engine.distributed import run_launcher

            outcome = run_launcher(nproc_per_node, _worker_argv(recipe, stage, resume, from_path, overrides, json_out),
                                   nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)
            if outcome.returncode != 0:
                raise HatError(outcome.message())
            return
        _train_here(lr, stage, resume, from_path, json_out)
    except KeyboardInterrupt as exc:
        if stage == "calibration":
            raise  # nothing to continue: calibration starts again (the CLI says so)
        interrupted = exc if isinstance(exc, Interrupted) else Interrupted(f"{stage}: interrupted")
        interrupted.hint = f"continue with `{_resume_command(recipe, stage, overrides)}`"
        raise interrupted from None


def _resume_command(recipe: Path, stage: str, overrides: list[str] | None) -> str:
    """The `hat train` command that continues this stage (with the same --set, so the settings match)."""
    sets = [part for item in overrides or [] for part in ("--set", item)]
    return shlex.join(["hat", "train", str(recipe), "--stage", stage, *sets, "--resume"])


def _train_here(lr: LoadedRecipe, stage: str, resume: bool, from_path: Path | None, json_out: bool) -> None:
    """Train `stage` in this process (one rank of a distributed run, or the only one)."""
    from hatcli import stages
    from hatcli.engine import distributed
    from hatcli.workflows import training

    info = distributed.init_from_env(getattr(lr.recipe, "device", "auto"))
    if stage == "float":
        record = training.train_float(lr, resume=resume)
    elif stage == "calibration":
        record = training.calibrate(lr, from_path=from_path)
    else:
        record = training.train_qat(lr, resume=resume, from_path=from_path)
    if info.is_main:  # one report, from rank 0
        if json_out:
            print_json(record)
        else:
            print_metrics(f"{stage} ({record['seconds']:.0f}s) -> {stages.stage_dir(lr, stage)}", record["metrics"])
    distributed.barrier()  # nobody leaves while rank 0 may still be writing
    distributed.destroy()


def register(app: typer.Typer) -> None:
    """Add `hat train` to the root app."""
    app.command("train", epilog=EXAMPLES)(train)
