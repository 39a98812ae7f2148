"""The training engine: exact resume, callbacks, EMA, and failures that keep what was written.

A stage can be stopped anywhere - Ctrl-C, or `kill -9` after a mid-epoch checkpoint - and
`--resume` ends with bitwise the same weights as a run that was never stopped (the recipes here
set `deterministic = true`; on CPU the kernels are deterministic anyway).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hatcli import stages
from hatcli.workflows import training
from hatcli.engine.callbacks import Callback
from hatcli.engine.checkpoint import load_checkpoint
from hatcli.errors import HatError, Interrupted
from hatcli.recipe import load_recipe
from replay import StopAt

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def _recipe(tmp_path: Path, tiny_recipe: Path, extra: str = "", name: str = "r.toml") -> Path:
    """The tiny recipe with deterministic kernels and `extra` TOML appended, writing under tmp_path/name."""
    text = tiny_recipe.read_text().replace('seed = 0', 'seed = 0\ndeterministic = true')
    text = text.replace(str(tmp_path / "runs"), str(tmp_path / name.replace(".toml", "")))
    path = tmp_path / name
    path.write_text(text + "\n" + textwrap.dedent(extra))
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ctrl_c_mid_epoch_then_resume_gives_bitwise_the_same_weights(tmp_path: Path, tiny_recipe: Path) -> None:
    whole = load_recipe(_recipe(tmp_path, tiny_recipe, name="whole.toml"))
    training.train_float(whole)
    cut = load_recipe(_recipe(tmp_path, tiny_recipe, name="cut.toml"))
    with pytest.raises(Interrupted, match="interrupted at step 11"):
        training.train_float(cut, callbacks=[StopAt(11)])  # epoch 2 of 2, 3 steps in
    assert load_checkpoint(cut.run_dir / "float" / "checkpoint-last.pt")["batch_in_epoch"] == 3
    record = training.train_float(cut, resume=True)
    for name in ("checkpoint-last.pt", "checkpoint-best.pt"):
        _assert_bitwise_equal(_weights(whole.run_dir / "float" / name), _weights(cut.run_dir / "float" / name))
    assert record["metrics"] == stages.read_stage_record(whole, "float")["metrics"]
    lines = [json.loads(x) for x in (cut.run_dir / "float" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]


KILL_AT = """
import os, signal, sys
from hatcli.workflows import training
from hatcli.engine.callbacks import Callback
from hatcli.recipe import load_recipe

class Kill(Callback):
    def on_step_end(self, trainer, loss):
        if trainer.step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

training.train_float(load_recipe(sys.argv[1]), callbacks=[Kill()])
"""


def test_kill_9_mid_epoch_then_resume_gives_bitwise_the_same_weights(tmp_path: Path, tiny_recipe: Path, hat) -> None:
    whole = load_recipe(_recipe(tmp_path, tiny_recipe, name="whole.toml"))
    training.train_float(whole)
    cut_path = _recipe(tmp_path, tiny_recipe, name="cut.toml")
    cut_path.write_text(cut_path.read_text().replace("[float]\n", "[float]\ncheckpoint_every_steps = 3\n", 1))
    run = subprocess.run([sys.executable, "-c", KILL_AT, str(cut_path), "13"], capture_output=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    cut = load_recipe(cut_path)
    state = load_checkpoint(cut.run_dir / "float" / "checkpoint-last.pt")
    assert (state["step"], state["batch_in_epoch"]) == (12, 4)  # the last save before the kill
    result = hat("train", cut_path, "--stage", "float", "--resume", "--json")
    assert result.code == 0, result.err
    _assert_bitwise_equal(_weights(whole.run_dir / "float" / "checkpoint-last.pt"),
                          _weights(cut.run_dir / "float" / "checkpoint-last.pt"))


def test_qat_resumes_exactly_too(tmp_path: Path, tiny_recipe: Path) -> None:
    extra = "[qat]\nepochs = 2\n"
    path = _recipe(tmp_path, tiny_recipe, name="q.toml")
    path.write_text(path.read_text().replace("[qat]\nepochs = 1\n", extra))
    lr = load_recipe(path)
    training.train_float(lr)
    training.calibrate(lr)
    training.train_qat(lr)
    whole = _weights(lr.run_dir / "qat" / "checkpoint-last.pt")
    with pytest.raises(Interrupted):
        training.train_qat(lr, callbacks=[StopAt(10)])
    training.train_qat(lr, resume=True)
    _assert_bitwise_equal(whole, _weights(lr.run_dir / "qat" / "checkpoint-last.pt"))


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path: Path, tiny_recipe: Path, hat) -> None:
    path = _recipe(tmp_path, tiny_recipe)
    with pytest.raises(Interrupted):
        training.train_float(load_recipe(path), callbacks=[StopAt(3)])
    result = hat("train", path, "--stage", "float", "--resume", "--set", "float.optimizer.lr=0.01")
    assert result.code == 1 and "other recipe settings" in result.err


class CountSteps(Callback):
    """A plugin-style callback: counts steps and adds the count to each epoch's record."""

    def __init__(self, label: str = "steps_seen") -> None:
        self.label = label
        self.steps = 0

    def on_step_end(self, trainer, loss: float) -> None:
        self.steps += 1

    def on_epoch_end(self, trainer, record: dict) -> None:
        record[self.label] = self.steps


def test_a_plugin_callback_named_in_the_recipe_runs(tmp_path: Path, tiny_recipe: Path, fresh_plugins) -> None:
    from hatcli.family import CallbackSpec
    from hatcli.plugins import callbacks

    callbacks().register("count_steps", CallbackSpec("count_steps", "counts steps", CountSteps), owner="test")
    path = _recipe(tmp_path, tiny_recipe)
    path.write_text(path.read_text().replace("[float]\n", '[float]\ncallbacks = [{name = "count_steps", label = "n"}]\n', 1))
    lr = load_recipe(path)
    training.train_float(lr)
    lines = [json.loads(x) for x in (lr.run_dir / "float" / "metrics.jsonl").read_text().splitlines()]
    assert [r["n"] for r in lines] == [8, 16]
    assert all("lr" in r and "top1" in r and "images_per_s" in r for r in lines)


def test_an_unknown_callback_is_a_recipe_error(tmp_path: Path, tiny_recipe: Path, hat) -> None:
    path = _recipe(tmp_path, tiny_recipe)
    path.write_text(path.read_text().replace("[float]\n", '[float]\ncallbacks = [{name = "nope"}]\n', 1))
    result = hat("train", path, "--stage", "float")
    assert result.code == 2 and "float.callbacks[0].name: unknown callback `nope`" in result.err


def test_ema_weights_are_what_the_best_checkpoint_keeps(tmp_path: Path, tiny_recipe: Path) -> None:
    path = _recipe(tmp_path, tiny_recipe, "[float.ema]\ndecay = 0.9\ntau = 0\n")
    path.write_text(path.read_text().replace("epochs = 2", "epochs = 1", 1))
    lr = load_recipe(path)
    training.train_float(lr)
    last = load_checkpoint(lr.run_dir / "float" / "checkpoint-last.pt")
    best = _weights(lr.run_dir / "float" / "checkpoint-best.pt")  # one epoch: saved at the same moment
    assert last["ema"]["updates"] == 8
    ema_weights = last["ema"]["model"]
    key = next(k for k in ema_weights if k.endswith("weight"))
    assert not torch.equal(last["model"][key], ema_weights[key])  # the average differs from the last step
    _assert_bitwise_equal(best, ema_weights)


def test_an_unwritable_work_dir_is_named(tmp_path: Path, tiny_recipe: Path, hat) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = hat("train", tiny_recipe, "--stage", "float", "--set", f'work_dir="{blocker}/runs"')
    assert result.code == 1 and "cannot write to" in result.err and "work_dir" in result.err


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path: Path, tiny_recipe: Path, monkeypatch) -> None:
    import hatcli.engine.checkpoint as checkpoint

    lr = load_recipe(_recipe(tmp_path, tiny_recipe))
    with pytest.raises(Interrupted):
        training.train_float(lr, callbacks=[StopAt(9)])
    last = lr.run_dir / "float" / "checkpoint-last.pt"
    good = last.read_bytes()
    writes = {"n": 0}
    real = checkpoint.atomic_write_bytes

    def full_disk(path: Path, data: bytes) -> None:
        writes["n"] += 1
        if path.name == "checkpoint-last.pt":
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", full_disk)
    with pytest.raises(HatError, match="could not write .*checkpoint-last.pt .*No space left.*intact"):
        training.train_float(lr, resume=True)
    assert last.read_bytes() == good


def test_a_diverging_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path: Path, tiny_recipe: Path, hat) -> None:
    result = hat("train", tiny_recipe, "--stage", "float", "--set", "float.optimizer.lr=1e12",
                 "--set", "float.epochs=3")
    assert result.code == 1
    assert re.search(r"loss is (nan|inf|-inf) at step \d+", result.err) and "lower the learning rate" in result.err


def test_tensorboard_events_when_tensorboard_is_installed(tmp_path: Path, tiny_recipe: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is optional: `pip install tensorboard` to log events")
    lr = load_recipe(_recipe(tmp_path, tiny_recipe))
    training.train_float(lr)
    assert list((lr.run_dir / "float" / "tensorboard").glob("events.out.tfevents.*"))


def test_the_builtin_early_stopping_callback_ends_a_stage_that_stopped_improving(tmp_path: Path, tiny_recipe: Path) -> None:
    path = _recipe(tmp_path, tiny_recipe)
    text = path.read_text().replace("epochs = 2", "epochs = 4", 1)
    path.write_text(text.replace("[float]\n", '[float]\ncallbacks = [{name = "early_stopping", patience = 1, min_delta = 100}]\n', 1))
    lr = load_recipe(path)
    training.train_float(lr)
    lines = [json.loads(x) for x in (lr.run_dir / "float" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]  # no gain of 100 points after epoch 1: stop after epoch 2


class _Payload:
    """Any class: unpickling it would run code, so weights_only loading must refuse it."""


def test_a_checkpoint_carrying_pickled_code_is_refused(tmp_path: Path) -> None:
    from hatcli.errors import ArtifactError

    path = tmp_path / "checkpoint-last.pt"
    torch.save({"model": {}, "extra": _Payload()}, path)
    with pytest.raises(ArtifactError, match="refusing to load .*pickled code"):
        load_checkpoint(path)
