"""`hat eval RECIPE --stage S`: metrics of one stage on the packed val set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hatcli.commands._options import (
    JsonOpt,
    RecipeArg,
    RuntimeOpt,
    SetOpt,
    check_runtime_stage,
    load,
    print_json,
    print_metrics,
)
from hatcli.errors import UsageError

EXAMPLES = """
Examples:

  hat eval recipes/quickstart.toml --stage float

  hat eval recipes/quickstart.toml --stage int_infer --json

  hat eval recipes/quickstart.toml --stage deploy --artifact runs/quickstart/compile/nash_e-O3

  hat eval recipes/quickstart.toml --stage deploy --compare qat,int_infer

  hat eval recipes/quickstart.toml --stage deploy --runtime openvino --compare int_infer
"""


def evaluate(
    recipe: RecipeArg,
    stage: Annotated[str, typer.Option(help="float, calibration, qat, int_infer or deploy.")] = "float",
    artifact: Annotated[Path | None, typer.Option(help="Compiled artifact folder (deploy stage).")] = None,
    compare: Annotated[str | None, typer.Option(
        help="Other stages to run on the same images, comma-separated (e.g. qat,int_infer): "
             "reports top-1 agreement (detection: images with the same detections; segmentation: "
             "pixels with the same class and the mIoU difference) and the largest output difference, "
             "in output steps.")] = None,
    runtime: RuntimeOpt = None,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a stage: top-1/top-5 (classification), COCO mAP (detection) or mIoU with per-class
    IoU (segmentation) in percent; with --compare, how far stages agree."""
    from hatcli.stages import EVAL_STAGES
    from hatcli.workflows.stage_models import evaluate_stage

    lr = load(recipe, overrides)
    if compare is None:
        check_runtime_stage(runtime, [stage])
        result = evaluate_stage(lr, stage, artifact, runtime)
        if json_out:
            print_json(result)
            return
        print_metrics(_title(stage, runtime), result["metrics"])
        if "per_class" in result:
            _print_per_class(result["per_class"])
        return
    from hatcli.workflows.compare import compare_stages

    others = [s.strip() for s in compare.split(",") if s.strip()]
    unknown = [s for s in [stage, *others] if s not in EVAL_STAGES]
    if unknown or not others:
        raise UsageError(f"--compare takes stages from {', '.join(EVAL_STAGES)}, comma-separated; got `{compare}`")
    check_runtime_stage(runtime, [stage, *others])
    report = compare_stages(lr, [stage, *others], artifact, runtime)
    if json_out:
        print_json(report)
        return
    for name, metrics in report["stages"].items():
        print_metrics(_title(name, runtime), metrics)
    _print_agreement(report)


def _title(stage: str, runtime: str | None) -> str:
    """`deploy (openvino)` for the deploy stage on a chosen runtime, else the stage."""
    return f"{stage} ({runtime})" if stage == "deploy" and runtime else stage


def _print_per_class(table: dict) -> None:
    """Every class's figure (a segmentation family's IoU, ...) as aligned `name  value` lines."""
    from hatcli.commands._options import aligned_lines
    from hatcli.progress import stdout

    rows = [[name, "-" if value is None else f"{value:.2f}"] for name, value in table["values"].items()]
    for line in aligned_lines(["class", f"{table['metric']} %"], rows):
        stdout.print(line, markup=False, highlight=False)


AGREEMENT_TITLES = {"same_detections": "same detections", "pixel_agreement": "same class per pixel",
                    "top1_agreement": "top-1 agreement"}


def _print_agreement(report: dict) -> None:
    """The pairwise agreement table."""
    from rich.table import Table

    from hatcli.progress import stdout

    steps = report["output_step"] is not None
    pairs = report["agreement"]
    key, title = next(((k, t) for k, t in AGREEMENT_TITLES.items() if any(k in pair for pair in pairs)),
                      ("top1_agreement", "top-1 agreement"))
    unit = "pixels of" if key == "pixel_agreement" else "of"
    miou = any("mIoU_diff" in pair for pair in pairs)
    table = Table("a", "b", title, *(["mIoU a - b"] if miou else []), "max |diff|",
                  *(["max diff (output steps)"] if steps else []))
    for pair in pairs:
        row = [pair["a"], pair["b"], f"{pair[key]:.3f}% {unit} {pair['images']} images" if miou
               else f"{pair[key]:.2f}% of {pair['images']}"]
        if miou:
            row.append(f"{pair['mIoU_diff']:+.2f}")
        row.append(f"{pair['max_abs_diff']:.3g}")
        if steps:
            row.append(f"{pair['max_diff_steps']:.2f}")
        table.add_row(*row)
    stdout.print(table)


def register(app: typer.Typer) -> None:
    """Add `hat eval` to the root app."""
    app.command("eval", epilog=EXAMPLES)(evaluate)
