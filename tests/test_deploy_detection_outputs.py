"""A detector's manifest says what every output is and how to decode it, well enough that a
consumer without hat gets hat's detections.

`output_meaning` in the export and compiled-artifact manifests comes from the family's
`describe_outputs`: per output its shape, axes, values, stride and the family's post-processing
with the recipe's settings. The proof is a numpy decoder written here from that description
alone, run on the compiled artifact's raw outputs: it must give the boxes, scores and labels
that the family's own `predict` gives for the same outputs. One module-wide artifact is built
from `recipes/shapes_fcos.toml` with a tiny network (2 float epochs on 20 images at a high learning
rate, so that its scores are spread apart; 1 calibration batch; no QAT).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from hatcli.recipe import load_recipe

RECIPE = Path(__file__).parents[1] / "recipes" / "shapes_fcos.toml"
DECODER = {"score_threshold": 0.02, "nms_pre": 300, "nms_iou": 0.3, "max_per_img": 40}
"""Decoder settings other than the family's defaults: the manifest must carry the recipe's."""

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`recipes/shapes_fcos.toml` shrunk to seconds: packed, trained, calibrated, exported, compiled."""
    from hatcli.data.shapes import pack_shapes
    from hatcli.deploy.recipe_build import compile_recipe
    from hatcli.family import PackRequest
    from hatcli.stages import default_compile_dir, default_export_dir
    from hatcli.workflows.exporting import export_stage
    from hatcli.workflows.training import calibrate, train_float

    root = tmp_path_factory.mktemp("fcos_outputs")
    pack_shapes(PackRequest(kind="shapes", target_data_dir=root / "data", task="detection", num_images=24,
                            image_size=96, seed=2))
    tiny = {"model.width_mult": 0.25, "model.depth_mult": 0.34, "model.channels": 16, "model.neck_layers": 1,
            "model.head_convs": 1, "float.epochs": 2, "float.optimizer.lr": 0.02, "float.optimizer.warmup_epochs": 0,
            "calibration.num_batches": 1, "qat.enabled": "false", "data.batch_size": 4,
            **{f"model.{k}": v for k, v in DECODER.items()}}
    overrides = [f"work_dir={json.dumps(str(root / 'runs'))}", f"data.root={json.dumps(str(root / 'data'))}",
                 *(f"{k}={v}" for k, v in tiny.items())]
    lr = load_recipe(RECIPE, overrides)
    train_float(lr)
    calibrate(lr)
    export_dir = default_export_dir(lr)
    export_stage(lr, export_dir)
    march, opt = lr.recipe.quant.march, lr.recipe.deploy.opt
    artifact = compile_recipe(lr, march, opt, default_compile_dir(lr, march, opt))
    return {"lr": lr, "export": export_dir, "artifact": Path(artifact),
            "images": sorted((root / "data" / "raw" / "val2017").glob("*.jpg"))[:3]}


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def _session(folder: Path) -> Any:
    import onnxruntime as ort

    model = _manifest(folder).get("model", "model.onnx")  # an export's ONNX model has no `model` key
    return ort.InferenceSession(str(folder / model), providers=["CPUExecutionProvider"])


def _raw_outputs(detector: dict[str, Any], image: Path) -> dict[str, np.ndarray]:
    """The compiled artifact's raw outputs for one val image, fed as hat feeds it."""
    from torchvision.io import decode_image

    from hatcli.inputs import detection_model_input

    x, _ = detection_model_input(detector["lr"], decode_image(str(image)))
    session = _session(detector["artifact"])
    values = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return {o.name: v for o, v in zip(session.get_outputs(), values)}


# -- a decoder that knows nothing but the manifest's description ---------------------------------

def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v.astype(np.float64)))


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x0, y0 = np.maximum(box[0], others[:, 0]), np.maximum(box[1], others[:, 1])
    x1, y1 = np.minimum(box[2], others[:, 2]), np.minimum(box[3], others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    with np.errstate(invalid="ignore"):  # two empty boxes: 0 / 0, which is not above any threshold
        return inter / (area(box) + area(others) - inter)


def decode_from_manifest(meaning: list[dict[str, Any]], outputs: dict[str, np.ndarray],
                         n: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes, scores, labels of image `n`, following `output_meaning` and its `postprocess` only."""
    post = meaning[0]["postprocess"]
    maps = {(e["what"], e["level"]): (e["stride"], outputs[e["name"]][n]) for e in meaning}
    scores, boxes = [], []
    for level in sorted({e["level"] for e in meaning}):
        stride, cls = maps[("class_logits", level)]
        _, ltrb = maps[("box_distances", level)]
        _, ctr = maps[("centerness_logits", level)]
        num_classes, h, w = cls.shape
        i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # row-major points
        x, y = (j.ravel() + 0.5) * stride, (i.ravel() + 0.5) * stride
        score = _sigmoid(cls.reshape(num_classes, -1).T) * _sigmoid(ctr.reshape(-1))[:, None]
        scores.append(np.sqrt(score) if post["score_sqrt"] else score)
        d = np.maximum(ltrb.reshape(4, -1).T.astype(np.float64), 0) * stride
        boxes.append(np.stack([x - d[:, 0], y - d[:, 1], x + d[:, 2], y + d[:, 3]], axis=1))
    score, box = np.concatenate(scores), np.concatenate(boxes)
    num_classes = score.shape[1]
    best = np.argsort(-score.ravel(), kind="stable")[: post["nms_pre"]]
    point, label, s = best // num_classes, best % num_classes, score.ravel()[best]
    clip_h, clip_w = post["clip_size"]
    b = np.clip(box[point], 0, [clip_w, clip_h, clip_w, clip_h])
    above = s > post["score_threshold"]
    b, s, label = b[above], s[above], label[above]
    kept: list[int] = []
    for k in np.argsort(-s, kind="stable"):
        same = [q for q in kept if label[q] == label[k]]
        if not same or not np.any(_iou(b[k], b[same]) > post["nms_iou"]):
            kept.append(int(k))
    kept = kept[: post["max_per_img"]]
    return b[kept], s[kept], label[kept]


def _assert_no_near_ties(meaning: list[dict[str, Any]], outputs: dict[str, np.ndarray]) -> None:
    """The best `nms_pre` + 1 scores lie further apart than float32 rounding moves them: otherwise
    two correct decoders may order them differently (and NMS keep another box), and the
    comparison would prove nothing either way."""
    post = meaning[0]["postprocess"]
    cls = np.concatenate([outputs[e["name"]][0].reshape(e["shape"][1], -1).T
                          for e in meaning if e["what"] == "class_logits"])
    ctr = np.concatenate([outputs[e["name"]][0].reshape(-1) for e in meaning if e["what"] == "centerness_logits"])
    best = np.sort(np.sqrt(_sigmoid(cls) * _sigmoid(ctr)[:, None]).ravel())[::-1][: post["nms_pre"] + 1]
    gaps = -np.diff(best)
    assert np.all(gaps > 4 * np.spacing(best[1:].astype(np.float32))), \
        "the fixture's scores are tied within float32 rounding: train its network a little more"


def _assert_same_detections(ours: tuple[np.ndarray, ...], family: Any) -> None:
    """Equal as sets of (label, score, box) within float tolerance (near-equal scores may swap order)."""
    boxes, scores, labels = ours
    assert len(scores) == len(family)
    unmatched = list(range(len(scores)))
    for fb, fs, fl in zip(family.boxes.numpy(), family.scores.numpy(), family.labels.numpy()):
        match = next((k for k in unmatched if labels[k] == fl and abs(scores[k] - fs) < 1e-5
                      and np.allclose(boxes[k], fb, atol=1e-3)), None)
        assert match is not None, f"the family's detection {fl} {fs} {fb} is not among the manifest decoder's"
        unmatched.remove(match)


# -- (a) every output described, with the exported shapes ----------------------------------------

def test_export_and_artifact_manifests_describe_every_detector_output_with_its_onnx_shape(detector) -> None:
    lr = detector["lr"]
    h, w = lr.recipe.data.input_size
    for folder in (detector["export"], detector["artifact"]):
        manifest = _manifest(folder)
        session = _session(folder)
        meaning = manifest["output_meaning"]
        assert [e["name"] for e in meaning] == [o.name for o in session.get_outputs()] == lr.family.output_names
        x = np.zeros([1, *session.get_inputs()[0].shape[1:]], np.float32)
        actual = session.run(None, {session.get_inputs()[0].name: x})
        for entry, onnx_out, value in zip(meaning, session.get_outputs(), actual):
            assert entry["shape"][0] == "N"
            assert entry["shape"][1:] == list(onnx_out.shape[1:]) == list(value.shape[1:]), entry["name"]
            channels = {"class_logits": len(manifest["classes"]), "box_distances": 4, "centerness_logits": 1}
            assert entry["shape"][1] == channels[entry["what"]]
            assert entry["shape"][2:] == [-(-h // entry["stride"]), -(-w // entry["stride"])]
            assert len(entry["axes"]) == 4 and entry["layout"] == "NCHW"
        post = meaning[0]["postprocess"]
        assert all(e["postprocess"] == post for e in meaning)
        assert {k: post[k] for k in DECODER} == DECODER
        assert post["score_sqrt"] is True and post["clip_size"] == [h, w]
        assert "network input" in post["boxes"] and "preprocess" in post["boxes"]


# -- (b) decoding from the description alone gives the family's detections -----------------------

def _with(meaning: list[dict[str, Any]], **post: Any) -> list[dict[str, Any]]:
    """`meaning` with other post-processing settings."""
    return [dict(e, postprocess={**e["postprocess"], **post}) for e in meaning]


def test_decoding_artifact_outputs_from_the_manifest_alone_gives_the_family_detections(detector) -> None:
    lr = detector["lr"]
    meaning = _manifest(detector["artifact"])["output_meaning"]
    post = meaning[0]["postprocess"]
    pairs = sum(np.prod(e["shape"][1:]) for e in meaning if e["what"] == "class_logits")
    assert pairs > post["nms_pre"]  # the pre-NMS cut matters
    for image in detector["images"]:
        outputs = _raw_outputs(detector, image)
        (expected,) = lr.family.predict([torch.from_numpy(outputs[n]) for n in lr.family.output_names],
                                        config=lr.model)
        _assert_no_near_ties(meaning, outputs)
        _assert_same_detections(decode_from_manifest(meaning, outputs), expected)
        # every step bites on these outputs: NMS drops boxes and `max_per_img` cuts what is left
        after_nms = len(decode_from_manifest(_with(meaning, max_per_img=pairs), outputs)[1])
        assert post["max_per_img"] == len(expected) < after_nms < post["nms_pre"]


@pytest.mark.parametrize("score_sqrt", [True, False])
@pytest.mark.parametrize("input_size", [(128, 128), (100, 130)])
def test_the_fcos_description_decodes_any_maps_as_the_family_does(score_sqrt: bool, input_size) -> None:
    """Random maps of the described shapes (no ties), any input size (even one the strides do not divide)."""
    from hat_fcos_efficientnet.family import FcosEfficientNetConfig, FcosEfficientNetFamily

    family = FcosEfficientNetFamily()
    config = FcosEfficientNetConfig(name=family.name, score_sqrt=score_sqrt, nms_pre=500, max_per_img=30,
                                    score_threshold=0.3)
    meaning = family.describe_outputs(config, input_size, 3)
    generator = torch.Generator().manual_seed(0)
    maps = {e["name"]: torch.randn([2, *e["shape"][1:]], generator=generator) * 3 for e in meaning}
    detections = family.predict([maps[n] for n in family.output_names], config=config)
    for n, expected in enumerate(detections):
        assert 0 < len(expected) <= 30
        _assert_same_detections(decode_from_manifest(meaning, {k: v.numpy() for k, v in maps.items()}, n), expected)


# -- every family, and a family that says nothing or something wrong -----------------------------

def _families() -> list[Any]:
    from hatcli.plugins import families

    return [families().get(name) for name in families().names()]


@pytest.mark.parametrize("family", _families(), ids=lambda f: f.name)
def test_every_registered_family_describes_its_deploy_model_outputs_in_order(family) -> None:
    config = family.tiny_config()
    described = family.describe_outputs(config, family.min_input_size, 3)
    assert [e["name"] for e in described] == list(family.output_names)
    assert all(e.get("what") for e in described)
    model = family.build_deploy_model(family.build_float_model(config, 3)).eval()
    with torch.no_grad():
        outputs = model(*family.example_inputs(family.min_input_size, batch=2))
    outputs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    for entry, value in zip(described, outputs):
        if "shape" in entry:
            assert entry["shape"] == ["N", *value.shape[1:]], entry["name"]


def _detector_without_description() -> Any:
    from hatcli.tasks.detection import DetectionFamily

    class Heads(DetectionFamily):
        name: ClassVar[str] = "heads"
        output_names: ClassVar[list[str]] = ["scores", "boxes"]
        build_float_model = loss = predict = None  # type: ignore[assignment]

    Heads.__abstractmethods__ = frozenset()
    return Heads()


def _recipe_of(family: Any) -> Any:
    from hatcli.family import FamilyConfig

    return SimpleNamespace(family=family, model=FamilyConfig(name=family.name),
                           recipe=SimpleNamespace(data=SimpleNamespace(input_size=[64, 64])))


EXPORTED = [{"name": "scores", "shape": ["N", 3, 8, 8], "dtype": "float32"},
            {"name": "boxes", "shape": ["N", 4, 8, 8], "dtype": "float32"}]


def test_a_detection_family_without_a_description_gets_the_generic_one_with_exported_shapes() -> None:
    from hatcli.deploy.consumer import output_meaning

    meaning = output_meaning(_recipe_of(_detector_without_description()), EXPORTED, ["a", "b", "c"])
    assert [(e["name"], e["shape"], e["what"]) for e in meaning] == [
        ("scores", ["N", 3, 8, 8], "raw head map"), ("boxes", ["N", 4, 8, 8], "raw head map")]
    assert "`heads` family decodes" in meaning[0]["decode"]


@pytest.mark.parametrize("wrong, says", [
    ([{"name": "boxes", "what": "x"}, {"name": "scores", "what": "x"}], "describes the outputs ['boxes', 'scores']"),
    ([{"name": "scores", "what": "x", "shape": ["N", 3, 4, 4]}, {"name": "boxes", "what": "x"}],
     "output `scores` has shape ['N', 3, 8, 8]"),
])
def test_a_description_that_contradicts_the_exported_model_is_refused(monkeypatch, wrong, says) -> None:
    from hatcli.deploy.consumer import output_meaning
    from hatcli.errors import PluginError

    family = _detector_without_description()
    monkeypatch.setattr(family, "describe_outputs", lambda config, input_size, num_classes: wrong)
    with pytest.raises(PluginError, match="model family `heads`") as error:
        output_meaning(_recipe_of(family), EXPORTED, ["a", "b", "c"])
    assert says in str(error.value)
