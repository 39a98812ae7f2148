"""`hat infer RECIPE --input IMG --out PNG`: an image with the model's predictions drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hatcli.commands._options import JsonOpt, RecipeArg, RuntimeOpt, SetOpt, check_runtime_stage, load, print_json
from hatcli.errors import UsageError
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat infer recipes/quickstart.toml --input photo.jpg --out pred.png

  hat infer recipes/quickstart.toml --input photo.jpg --out pred.png --stage deploy

  hat infer recipes/quickstart.toml --input photo.jpg --stage deploy --runtime openvino

  hat infer recipes/shapes_fcos.toml --input street.jpg --out boxes.png --min-score 0.4 --json

  hat infer recipes/shapes_unet.toml --input street.jpg --out mask.png
"""


def infer(
    recipe: RecipeArg,
    input: Annotated[Path, typer.Option("--input", "-i", help="Image file (JPEG/PNG).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the picture (PNG).")] = Path("prediction.png"),
    stage: Annotated[str, typer.Option(help="float, calibration, qat, int_infer or deploy.")] = "int_infer",
    topk: Annotated[int | None, typer.Option(help="Classification: how many classes to show (default 5). "
                                                  "Detection: at most this many boxes (default 100).")] = None,
    min_score: Annotated[float, typer.Option(help="Detection: draw and list boxes scoring at least this.")] = 0.3,
    runtime: RuntimeOpt = None,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run one image through a stage's model and draw the predictions on it: the top-k classes
    (classification), boxes with class names and scores (detection), or a coloured mask with a
    legend of the classes found and their share of the picture (segmentation)."""
    from PIL import UnidentifiedImageError

    from hatcli.atomic import atomic_write_bytes
    from hatcli.workflows.predictions import predict_picture, read_picture
    from hatcli.workflows.stage_models import stage_model

    lr = load(recipe, overrides)
    check_runtime_stage(runtime, [stage])
    if topk is not None and topk < 1:
        raise UsageError(f"--topk must be at least 1 (got {topk})")
    if not 0 <= min_score <= 1:
        raise UsageError(f"--min-score must be between 0 and 1 (got {min_score})")
    if not input.is_file():
        raise UsageError(f"--input: no such image: {input}")
    try:
        picture = read_picture(input.read_bytes())
    except (UnidentifiedImageError, RuntimeError, OSError) as exc:
        raise UsageError(f"--input: {input} is not a readable image ({exc})") from None
    model, classes = stage_model(lr, stage, runtime=runtime)
    detection = lr.family.task == "detection"
    rows, drawn = predict_picture(lr, model, classes, picture, topk, min_score)
    import io

    buffer = io.BytesIO()
    drawn.save(buffer, format="PNG")
    atomic_write_bytes(out, buffer.getvalue())
    if json_out:
        print_json({"input": str(input), "out": str(out), "stage": stage, "predictions": rows,
                    **({"runtime": runtime} if stage == "deploy" else {})})
        return
    for row in rows:
        if "share" in row:  # segmentation: a class present in the picture
            stdout.print(f"{row['label']:>16}  {row['share'] * 100:6.2f}% of the pixels, "
                         f"mean confidence {row['score'] * 100:5.1f}%")
            continue
        box = "  " + " ".join(f"{v:7.1f}" for v in row["box"]) if detection else ""
        stdout.print(f"{row['label']:>16}  {row['score'] * 100:6.2f}%{box}")
    if detection and not rows:
        stdout.print(f"no detection scored {min_score:.2f} or more")
    stdout.print(f"[green]wrote[/] {out}")


def register(app: typer.Typer) -> None:
    """Add `hat infer` to the root app."""
    app.command("infer", epilog=EXAMPLES)(infer)
