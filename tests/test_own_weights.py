"""Your own weights: a network trained outside hat enters as the float stage.

`hat train R --stage calibration --from FILE` imports a plain PyTorch state dict (or a checkpoint
holding one, or a .safetensors file) as the float stage; `[model] weights` is where float training
starts (`float.epochs = 0`: the file, evaluated). What did not fit is reported; what cannot fit is
an error that touches nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch

from hatcli import stages
from hatcli.engine.checkpoint import load_checkpoint
from hatcli.engine.weights import map_weights, read_weights
from hatcli.errors import RecipeError, UsageError
from hatcli.recipe import load_recipe
from hatcli.workflows import pipeline, training

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")]

CLASSES = 6  # the tiny shapes dataset's


def _model(lr, num_classes: int = CLASSES, seed: int = 7, **settings) -> torch.nn.Module:
    """The recipe's float network as a user's own script would build it, with its own init."""
    torch.manual_seed(seed)
    config = lr.model.model_copy(update=settings) if settings else lr.model
    return lr.family.build_float_model(config, num_classes)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def lr(tiny_recipe: Path):
    return load_recipe(tiny_recipe)


@pytest.fixture
def own(tmp_path: Path, lr) -> tuple[Path, dict[str, torch.Tensor]]:
    """A state dict saved with plain torch, and its tensors."""
    state = _model(lr).state_dict()
    path = tmp_path / "my_float.pth"
    torch.save(state, path)
    return path, state


# -- the CLI -------------------------------------------------------------------------------------


def test_calibration_from_a_plain_state_dict_imports_it_as_the_float_stage(hat, tiny_recipe, lr, own):
    path, state = own
    result = hat("train", tiny_recipe, "--stage", "calibration", "--from", path, "--set", "qat.enabled=false")
    assert result.code == 0, result.err
    assert f"weights from {path}" in result.err and "164 of the model's 164 tensors loaded" in result.err
    float_dir = lr.run_dir / "float"
    assert _equal(load_checkpoint(float_dir / "checkpoint-best.pt")["model"], state)
    record = json.loads((float_dir / "stage.json").read_text())
    source = record["weights_from"]
    assert source["path"] == str(path.resolve()) and source["via"] == "--from" and source["format"] == "state dict"
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["report"]["loaded"] == source["report"]["total"] == len(state)
    assert record["finished"] and set(record["metrics"]) == {"top1", "top5"}
    assert (lr.run_dir / "calibration" / "checkpoint.pt").exists()
    # every later stage goes on from it with no special case: the integer program, the float eval
    assert hat("eval", tiny_recipe, "--stage", "int_infer", "--set", "qat.enabled=false", "--json").code == 0
    evaluated = hat("eval", tiny_recipe, "--stage", "float", "--json")
    assert evaluated.code == 0 and evaluated.json()["metrics"] == record["metrics"]
    # the run report says where the float stage came from instead of missing curves
    assert hat("report", tiny_recipe, "--images", "0").code == 0
    page = (lr.run_dir / "report.html").read_text()
    assert f"its weights were imported from {path.resolve()}" in page and "via --from" in page


@pytest.mark.parametrize("fmt", ["safetensors", "wrapped"])
def test_safetensors_and_a_training_scripts_checkpoint_import_the_same(tmp_path, lr, fmt):
    state = _model(lr).state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:  # DataParallel keys, under "state_dict", beside plain values
        path = tmp_path / "ckpt.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90, "best_acc": 71.2}, path)
    record = training.import_float(lr, path)
    assert _equal(load_checkpoint(stages.checkpoint_path(lr, "float"))["model"], state)
    report = record["weights_from"]["report"]
    assert report["loaded"] == len(state) and not report["missing"] and not report["unexpected"]
    assert report["stripped_prefix"] == ("" if fmt == "safetensors" else "module.")


def test_a_head_for_another_class_count_is_replaced_and_reported(hat, tiny_recipe, tmp_path, lr):
    state = _model(lr, num_classes=10).state_dict()
    path = tmp_path / "ten_classes.pth"
    torch.save(state, path)
    result = hat("train", tiny_recipe, "--stage", "float", "--set", f"model.weights={path}", "--set", "float.epochs=0")
    assert result.code == 0, result.err
    width = state["classifier.weight"].shape[1]
    assert (f"classifier.weight: checkpoint [10, {width}], model [6, {width}]: head replaced (6 classes in the data"
            in result.err)
    assert "classifier.bias: checkpoint [10], model [6]: head replaced" in result.err
    assert "untrained" in result.err  # nothing trains the new head here: said so
    record = json.loads((lr.run_dir / "float" / "stage.json").read_text())
    assert [h["key"] for h in record["weights_from"]["report"]["head"]] == ["classifier.weight", "classifier.bias"]
    kept = load_checkpoint(lr.run_dir / "float" / "checkpoint-best.pt")["model"]
    assert kept["classifier.weight"].shape == (CLASSES, width)
    assert all(torch.equal(kept[k], v) for k, v in state.items() if not k.startswith("classifier."))


def test_a_wrong_shape_is_exit_2_naming_file_key_and_shapes_and_touches_nothing(hat, tiny_recipe, tmp_path, lr, own):
    assert hat("train", tiny_recipe, "--stage", "float", "--set", f"model.weights={own[0]}",
               "--set", "float.epochs=0").code == 0
    before = _snapshot(lr.run_dir)
    wide = tmp_path / "wide.pth"
    torch.save(_model(lr, alpha=0.5).state_dict(), wide)
    result = hat("train", tiny_recipe, "--stage", "calibration", "--from", wide)
    assert result.code == 2
    line = result.err.strip().splitlines()[-1]
    assert str(wide) in line and "`features.0.0.weight` is [16, 3, 3, 3] in the file but [8, 3, 3, 3]" in line
    assert _snapshot(lr.run_dir) == before


@pytest.mark.parametrize("pickled", ["model", "namespace"])
def test_a_file_that_needs_unpickling_is_refused_saying_how_to_save_weights(hat, tiny_recipe, tmp_path, lr, pickled):
    path = tmp_path / "whole.pth"
    model = _model(lr)
    torch.save(model if pickled == "model" else {"state_dict": model.state_dict(), "args": argparse.Namespace(lr=1)},
               path)
    result = hat("train", tiny_recipe, "--stage", "calibration", "--from", path)
    assert result.code == 2
    assert "model.state_dict()" in result.err and str(path) in result.err
    assert ("MobileNetV1" if pickled == "model" else "argparse.Namespace") in result.err
    assert not lr.run_dir.exists()


def test_qat_from_a_plain_state_dict_says_where_it_goes(hat, tiny_recipe, own):
    result = hat("train", tiny_recipe, "--stage", "qat", "--from", own[0])
    assert result.code == 2 and "--stage calibration --from" in result.err


# -- [model] weights --------------------------------------------------------------------------------


def test_float_training_starts_from_model_weights(tiny_recipe, lr, own):
    path, state = own
    start = load_recipe(tiny_recipe, [f"model.weights={path}", "float.epochs=1", "float.optimizer.lr=1e-9"])
    record = training.train_float(start)
    assert record["weights_from"]["via"] == "model.weights" and record["epochs"] == 1
    trained = load_checkpoint(start.run_dir / "float" / "checkpoint-best.pt")["model"]
    scratch = _model(lr, seed=0).state_dict()
    params = [name for name, _ in _model(lr).named_parameters()]
    # at lr 1e-9 an epoch leaves the file's weights where they were (BatchNorm statistics do move)
    assert all(torch.allclose(trained[k], state[k], atol=1e-6) for k in params)
    assert not all(torch.allclose(trained[k], scratch[k], atol=1e-6) for k in params)


def test_float_epochs_0_keeps_the_file_as_the_float_stage(tiny_recipe, own):
    path, state = own
    lr = load_recipe(tiny_recipe, [f"model.weights={path}", "float.epochs=0"])
    record = training.train_float(lr)
    assert record["epochs"] == 0 and record["finished"] and record["weights_from"]["via"] == "model.weights"
    assert _equal(load_checkpoint(stages.checkpoint_path(lr, "float"))["model"], state)
    assert stages.is_up_to_date(lr, "float")


def test_float_epochs_0_needs_weights(tiny_recipe):
    with pytest.raises(RecipeError, match=r"float\.epochs = 0.*\[model\] weights"):
        load_recipe(tiny_recipe, ["float.epochs=0"])


def test_weights_path_is_relative_to_the_recipe_file_and_its_content_is_in_the_fingerprint(tmp_path, tiny_recipe,
                                                                                            monkeypatch, own):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "w.pth").write_bytes(own[0].read_bytes())
    recipe = folder / "mine.toml"
    recipe.write_text(tiny_recipe.read_text().replace('name = "mobilenet_v1"', 'name = "mobilenet_v1"\nweights = "w.pth"'))
    monkeypatch.chdir(tmp_path)
    lr = load_recipe(recipe)
    assert lr.model.weights == str(folder / "w.pth") and lr.resolved["model"]["weights"] == lr.model.weights
    before = stages.stage_fingerprint(lr, "float")
    torch.save(_model(lr, seed=8).state_dict(), folder / "w.pth")
    assert stages.stage_fingerprint(load_recipe(recipe), "float") != before
    # a recipe without the key keeps the fingerprint it had before the key existed
    plain = load_recipe(tiny_recipe)
    assert "weights" not in plain.resolved["model"]
    assert stages.stage_fingerprint(plain, "float") == stages.float_fingerprint(plain)


# -- hat run after an import ----------------------------------------------------------------------


def test_hat_run_keeps_an_imported_float_stage_and_never_trains_over_it(tiny_recipe, lr, own, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("hat run trained float over imported weights")

    monkeypatch.setattr(training, "train_float", no_training)
    training.import_float(lr, own[0])
    assert stages.is_up_to_date(lr, "float")
    row = pipeline._run_recorded_stage(lr, "float", force=False)
    assert row.reused
    assert pipeline._run_recorded_stage(lr, "float", force=True).seconds > 0  # --force imports it again
    # another float training setting does not touch an import; another seed (the head init) re-imports
    assert stages.is_up_to_date(load_recipe(tiny_recipe, ["float.epochs=5"]), "float")
    seeded = load_recipe(tiny_recipe, ["seed=1"])
    assert not stages.is_up_to_date(seeded, "float")
    assert not pipeline._run_recorded_stage(seeded, "float", force=False).reused
    assert stages.imported_float(seeded)["sha256"] == hashlib.sha256(own[0].read_bytes()).hexdigest()
    # another file imported: everything built on the first import is out of date
    calibration_before = stages.stage_fingerprint(lr, "calibration")
    other = tmp_path / "other.pth"
    torch.save(_model(lr, seed=9).state_dict(), other)
    training.import_float(lr, other)
    assert stages.stage_fingerprint(lr, "calibration") != calibration_before
    # the same path with new content: the import is out of date
    torch.save(_model(lr, seed=10).state_dict(), other)
    assert not stages.is_up_to_date(lr, "float")


@pytest.mark.slow
def test_hat_run_after_a_from_import_goes_on_to_the_artifact(hat, tiny_recipe, lr, own):
    assert hat("train", tiny_recipe, "--stage", "calibration", "--from", own[0]).code == 0
    result = hat("run", tiny_recipe)
    assert result.code == 0, result.err
    rows = {row["stage"]: row for row in json.loads((lr.run_dir / "summary.json").read_text())}
    assert rows["float"]["reused"] and rows["calibration"]["reused"] and not rows["qat"]["reused"]
    assert rows["deploy"]["values"]["top1"] == rows["int_infer"]["values"]["top1"]


# -- the mapping rules ----------------------------------------------------------------------------


def _weights_file(tmp_path: Path, state: dict[str, torch.Tensor]):
    path = tmp_path / "w.pth"
    torch.save(state, path)
    return read_weights(path)


def test_missing_tensors_warn_when_training_follows_and_are_an_error_when_not(tmp_path, lr):
    state = {k: v for k, v in _model(lr).state_dict().items() if not k.startswith("classifier.")}
    weights = _weights_file(tmp_path, state)
    report = map_weights(_model(lr, seed=1), weights, CLASSES, trains_after=True)
    assert report.missing == ["classifier.weight", "classifier.bias"] and report.loaded == len(state)
    assert "kept at their initialisation: classifier.weight, classifier.bias" in " ".join(report.notes())
    with pytest.raises(UsageError, match="lacks 2 of the model's tensors"):
        map_weights(_model(lr, seed=1), weights, CLASSES, trains_after=False)


def test_missing_num_batches_tracked_never_matters_and_unexpected_keys_are_listed(tmp_path, lr):
    state = {k: v for k, v in _model(lr).state_dict().items() if not k.endswith("num_batches_tracked")}
    state["aux_head.weight"] = torch.zeros(3)
    report = map_weights(_model(lr, seed=1), _weights_file(tmp_path, state), CLASSES, trains_after=False)
    assert report.missing == [] and report.unexpected == ["aux_head.weight"]


def test_a_file_of_another_network_is_an_error_not_an_empty_load(tmp_path, lr):
    with pytest.raises(UsageError, match="none of its 2 tensors fits the model"):
        map_weights(_model(lr), _weights_file(tmp_path, {"a.weight": torch.zeros(1), "b.bias": torch.zeros(1)}),
                    CLASSES, trains_after=True)


def test_torchvision_weights_load_onto_the_resnet_family_as_they_are(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from hatcli.plugins import families

    family = families().get("resnet")
    config = family.config_class(name="resnet", depth=18)
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18().eval()
    weights = _weights_file(tmp_path, theirs.state_dict())
    ours = family.build_float_model(config, 1000).eval()
    assert map_weights(ours, weights, 1000, trains_after=False).loaded == len(theirs.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(images), theirs(images), atol=1e-5)
    report = map_weights(family.build_float_model(config, CLASSES), weights, CLASSES, trains_after=True)
    assert [h["key"] for h in report.head] == ["fc.weight", "fc.bias"] and report.head[0]["checkpoint"] == [1000, 512]
