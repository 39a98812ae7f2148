"""The run report's sections that are not read from one stage's files: validation images with
the last stage's predictions drawn, the findings of `hat debug`, and the versions and git commit
the page was made with (see `hatcli.workflows.report`)."""

from __future__ import annotations

import base64
import importlib
import io
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from hatcli import __version__
from hatcli.data.lmdb_format import open_packed
from hatcli.inputs import data_path
from hatcli.recipe import LoadedRecipe
from hatcli.stages import TRAIN_STAGES, default_compile_dir, default_export_dir, stage_dir
from hatcli.workflows.predictions import predict_picture, read_picture
from hatcli.workflows.stage_models import stage_model

PREDICTION_IMAGES = 6
"""Validation images drawn by default: enough to see what the model does, cheap to run."""
MAX_PICTURE_WIDTH = 480
"""Drawn pictures wider than this are scaled down before they are embedded."""
MAX_DEBUG_WIDTH = 1000
"""The same for the drawings of `hat debug` (one picture per stage side by side)."""
JPEG_QUALITY = 82
PACKAGES = ("torch", "torchvision", "torchao", "onnx", "onnxruntime")


def final_stage(lr: LoadedRecipe) -> str | None:
    """The last stage of the run with a model to predict with: `deploy` (the compiled artifact
    of the recipe's march and opt), else the last training stage with a checkpoint; None when none."""
    if (default_compile_dir(lr, lr.recipe.quant.march, lr.recipe.deploy.opt) / "manifest.json").is_file():
        return "deploy"
    trained = [s for s in TRAIN_STAGES if any(stage_dir(lr, s).glob("checkpoint*.pt"))]
    return trained[-1] if trained else None


def _data_uri(picture: Any, max_width: int = MAX_PICTURE_WIDTH) -> str:
    """A drawn PIL picture as a compressed JPEG `data:` URI, at most `max_width` pixels wide."""
    if picture.width > max_width:
        picture = picture.resize((max_width, round(picture.height * max_width / picture.width)))
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def predictions_section(lr: LoadedRecipe, count: int = PREDICTION_IMAGES) -> dict[str, Any]:
    """`count` validation images, evenly spaced through the packed val set, with the predictions
    of `final_stage` drawn by the family (what `hat infer` draws) and, for classification, the
    true class; a sentence instead when there is no model, no data, or drawing failed."""
    section: dict[str, Any] = {"stage": None, "pictures": [], "missing": None}
    val = data_path(lr, "val")
    stage = final_stage(lr)
    if count <= 0:
        section["missing"] = "no pictures drawn (`--images 0`)."
    elif stage is None:
        section["missing"] = f"no trained model yet: `hat train {lr.path} --stage float` trains one."
    elif not (val / "data.mdb").is_file():
        section["missing"] = (f"no packed validation data at {val} (`hat pack`, or `hat run {lr.path}` with a "
                              "[data.pack] table, packs it): nothing to draw.")
    if section["missing"]:
        return section
    section["stage"] = stage
    try:
        reader = open_packed(val)
        model, classes = stage_model(lr, stage)
        step = max(1, len(reader) // count)
        for index in list(range(0, len(reader), step))[:count]:
            record = reader[index]
            rows, drawn = predict_picture(lr, model, classes, read_picture(record["image"]), topk=3)
            truth = classes[record["label"]] if "label" in record and record["label"] < len(classes) else None
            top = f"{rows[0]['label']} {100 * rows[0]['score']:.1f} %" if rows else "nothing found"
            section["pictures"].append({"uri": _data_uri(drawn), "index": index, "truth": truth, "top": top,
                                        "right": truth is not None and bool(rows) and rows[0]["label"] == truth})
    except Exception as exc:  # noqa: BLE001 - the rest of the page does not depend on the pictures
        section["missing"] = f"could not draw predictions with the {stage} model: {type(exc).__name__}: {exc}"
        section["pictures"] = []
    return section


def read_json(path: Path) -> tuple[Any, str | None]:
    """(the JSON value of `path`, None), or (None, why it could not be read)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path} could not be read ({exc})"


def _cell(value: Any) -> str:
    """A debug value as table text: strings as they are, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def dict_table(items: list[dict[str, Any]]) -> dict[str, list]:
    """A list of dicts as `{"columns": every key in first-seen order, "rows": cell texts}`."""
    columns = list(dict.fromkeys(k for row in items for k in row))
    return {"columns": columns, "rows": [[_cell(row.get(c, "")) for c in columns] for row in items]}


DEBUG_TITLES = {
    "causes": "Layers whose own quantization costs the outputs most (each taken alone from the quantized model)",
    "advice": "What to do",
    "stages": "Each stage against float, on the same images",
    "worst_inputs": "The images the pair disagrees on most, with every stage's prediction",
    "first_divergence": "The first layer where the pair parts",
    "summary": "What was compared",
    "layers": "Every layer, in execution order",
    "ranges": "Calibrated ranges against the values seen",
    "weights": "Weights: dead channels, scale spread, moved by QAT",
    "quantization": "Quantization as applied, and the recipe rule behind each layer",
    "consistency": "Stages that must compute the same",
}
"""Headings of the sections `hat debug` writes; a section not named here is shown under its key."""
DEBUG_OPEN = ("causes", "advice", "stages", "worst_inputs")
"""Sections shown open; the others are folded (one click to open) so the answer stays on screen."""


def _debug_entry(folder: Path, key: str, value: Any) -> dict[str, Any]:
    """One section of debug.json as a table (a list of dicts; a dict as key/value rows) or text."""
    item: dict[str, Any] = {"key": key, "title": DEBUG_TITLES.get(key, key), "open": key in DEBUG_OPEN
                            or key not in DEBUG_TITLES, "columns": [], "rows": [], "text": "", "pictures": []}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        item.update(dict_table(value))
        item["pictures"] = debug_pictures(folder, value)
    elif isinstance(value, dict):
        item.update(columns=["key", "value"], rows=[[str(k), _cell(v)] for k, v in value.items()])
    else:
        item["text"] = _cell(value)
    return item


def debug_section(lr: LoadedRecipe) -> dict[str, Any]:
    """The findings of `hat debug` (`runs/<task>/debug/debug.json`): its verdict (the layer that
    loses the most, what to do) on top, the per-layer SQNR chart, then every other top-level key -
    a list of dicts as a table, a dict as key/value rows, anything else as text; the sections a
    user reads first open, the detail folded."""
    from markupsafe import Markup

    from hatcli.workflows.report_charts import layer_chart

    path = lr.run_dir / "debug" / "debug.json"
    section: dict[str, Any] = {"path": str(path), "entries": [], "missing": None, "verdict": None, "chart": ""}
    if not path.is_file():
        section["missing"] = f"no debug findings yet: run `hat debug {lr.path}`."
        return section
    data, problem = read_json(path)
    if problem:
        section["missing"] = f"{problem}; run `hat debug {lr.path}` again."
        return section
    data = data if isinstance(data, dict) else {"findings": data}
    verdict = data.get("verdict")
    if isinstance(verdict, dict) and all(isinstance(verdict.get(k), str) for k in ("layer", "finding", "do", "how")):
        section["verdict"] = verdict
    summary = data.get("summary") if isinstance(data.get("summary"), dict) else {}
    layers = data.get("layers")
    if isinstance(layers, list) and all(isinstance(row, dict) for row in layers):
        marks = {name: text for name, text in ((summary.get("first_divergence"), "first divergence"),
                                               (section["verdict"] and section["verdict"]["layer"], "loses the most"))
                 if isinstance(name, str) and name not in ("none", "-")}
        threshold = summary.get("sqnr_threshold_db")
        section["chart"] = Markup(layer_chart(layers, threshold if isinstance(threshold, (int, float)) else None,
                                              marks, f"debug layers: {summary.get('pair', 'the pair')}"))
    for key, value in data.items():
        if key != "verdict" or section["verdict"] is None:
            section["entries"].append(_debug_entry(path.parent, str(key), value))
    section["entries"].sort(key=lambda item: not item["open"])  # stable: open sections first, in file order
    return section


def debug_pictures(folder: Path, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The drawings a debug table names in its `image` column (plain file names of pictures in
    the debug folder, e.g. the worst inputs), embedded; names that are no such file are skipped."""
    from PIL import Image, UnidentifiedImageError

    pictures = []
    for row in rows:
        name = row.get("image")
        if not isinstance(name, str) or Path(name).name != name or not (folder / name).is_file():
            continue
        try:
            with Image.open(folder / name) as picture:
                uri = _data_uri(picture, MAX_DEBUG_WIDTH)
        except (OSError, UnidentifiedImageError):
            continue
        pictures.append({"uri": uri, "caption": " ".join(f"{k} {_cell(v)}" for k, v in row.items() if k != "image")})
    return pictures


def git_commit(cwd: Path | None = None) -> str:
    """The commit checked out in `cwd` (default: the current folder), with "(uncommitted changes)"
    when tracked files differ from it; "unknown" without git or outside a repository."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")


def _installed(name: str) -> str:
    """The version a package reports itself (torch's has its build, `2.14.1+cu130`, as its
    manifests record it), else its distribution's, else "not installed"."""
    try:
        return str(importlib.import_module(name).__version__)
    except (ImportError, AttributeError):
        pass
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment_section(lr: LoadedRecipe) -> dict[str, Any]:
    """Versions here (hat, torch, torchvision, torchao, onnx, onnxruntime, python) beside those the
    run's export and compiled artifact recorded, and the git commit of the current folder."""
    export, _ = read_json(default_export_dir(lr) / "manifest.json")
    compiled, _ = read_json(default_compile_dir(lr, lr.recipe.quant.march, lr.recipe.deploy.opt) / "manifest.json")
    export = export if isinstance(export, dict) else {}
    versions = compiled.get("versions", {}) if isinstance(compiled, dict) else {}
    recorded = {"hat": export.get("hatcli_version") or versions.get("hatcli"), "torch": export.get("torch_version"),
                "onnx": versions.get("onnx"), "onnxruntime": versions.get("onnxruntime"),
                "python": versions.get("python")}
    here = {"hat": __version__, **{name: _installed(name) for name in PACKAGES}, "python": platform.python_version()}
    rows = [{"name": name, "here": version, "run": recorded.get(name) or "-"} for name, version in here.items()]
    return {"versions": rows, "commit": git_commit(), "missing": None}
