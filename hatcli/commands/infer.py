"""`hat infer RECIPE --input IMG --out PNG`: an image with the model's predictions drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hatcli.commands._options import JsonOpt, RecipeArg, SetOpt, load, print_json
from hatcli.errors import UsageError
from hatcli.progress import stdout

EXAMPLES = """
Examples:

  hat infer recipes/quickstart.toml --input photo.jpg --out pred.png

  hat infer recipes/quickstart.toml --input photo.jpg --out pred.png --stage deploy
"""


def infer(
    recipe: RecipeArg,
    input: Annotated[Path, typer.Option("--input", "-i", help="Image file (JPEG/PNG).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the picture (PNG).")] = Path("prediction.png"),
    stage: Annotated[str, typer.Option(help="float, calibration, qat, int_infer or deploy.")] = "int_infer",
    topk: Annotated[int, typer.Option(help="How many classes to show.")] = 5,
    overrides: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run one image through a stage's model and draw the predictions on it."""
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.io import ImageReadMode, decode_image

    from hatcli.atomic import atomic_write_bytes
    from hatcli.engine.loaders import model_input
    from hatcli.engine.stages import stage_model

    lr = load(recipe, overrides)
    if not input.is_file():
        raise UsageError(f"--input: no such image: {input}")
    try:
        picture = Image.open(input)
        picture.load()
        tensor = decode_image(torch.frombuffer(bytearray(input.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (UnidentifiedImageError, RuntimeError, OSError) as exc:
        raise UsageError(f"--input: {input} is not a readable image ({exc})") from None
    inputs = model_input(lr, tensor)
    model, classes = stage_model(lr, stage)
    with torch.no_grad():
        outputs = model(inputs)
    prediction = lr.family.predict(outputs, topk=topk)[0]
    drawn = lr.family.draw_predictions(picture, prediction, classes)
    import io

    buffer = io.BytesIO()
    drawn.save(buffer, format="PNG")
    atomic_write_bytes(out, buffer.getvalue())
    labels = [classes[i] if i < len(classes) else str(i) for i in prediction.labels]
    if json_out:
        print_json({"input": str(input), "out": str(out), "stage": stage,
                    "predictions": [{"label": l, "score": s} for l, s in zip(labels, prediction.scores)]})
        return
    for label, score in zip(labels, prediction.scores):
        stdout.print(f"{label:>16}  {score * 100:6.2f}%")
    stdout.print(f"[green]wrote[/] {out}")


def register(app: typer.Typer) -> None:
    """Add `hat infer` to the root app."""
    app.command("infer", epilog=EXAMPLES)(infer)
