"""Ctrl-C, unfinished stages and two writers: nothing is built silently on half a stage.

- A Ctrl-C during training saves `checkpoint-last.pt` and then propagates as a KeyboardInterrupt
  (hat used as a library stops like any Python code); only the CLI turns it into one line that
  says how to continue *with the command that ran* and exit code 130.
- `hat run` interrupted in a training stage continues it from its last checkpoint when the same
  command runs again, and ends with the weights of a run that was never stopped.
- A stage records whether it finished (epochs done of planned); a stage or command that uses an
  unfinished stage warns, naming it, how far it got and how to finish it.
- A stage folder has one writer: a second `hat train` / `hat run` of it exits 1 naming the folder
  and the process that holds it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hatcli import stages
from hatcli.workflows import training
from hatcli.engine.checkpoint import load_checkpoint
from hatcli.errors import HatWarning, Interrupted
from hatcli.locking import lock_file_for
from hatcli.recipe import load_recipe
from test_training import StopAt  # Ctrl-C once a step is reached (never, for step 0)

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


@pytest.fixture
def stop_at(fresh_plugins):
    """Register `StopAt` as the plugin callback `stop_at`, so a recipe run through the CLI can use it."""
    from hatcli.family import CallbackSpec
    from hatcli.plugins import callbacks

    callbacks().register("stop_at", CallbackSpec("stop_at", "Ctrl-C at a step", StopAt), owner="test")


def _recipe(tmp_path: Path, tiny_recipe: Path, name: str, float_extra: str = "", epochs: int = 2) -> Path:
    """The tiny recipe, deterministic, writing under tmp_path/<name>, with `float_extra` in [float]."""
    text = tiny_recipe.read_text().replace("seed = 0", "seed = 0\ndeterministic = true")
    text = text.replace(str(tmp_path / "runs"), str(tmp_path / name))
    text = text.replace("[float]\nepochs = 2\n", f"[float]\nepochs = {epochs}\n{float_extra}\n")
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _epochs(path: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


# -- Ctrl-C -----------------------------------------------------------------------------------


def test_an_interrupted_training_saves_then_raises_keyboard_interrupt(tmp_path, tiny_recipe):
    lr = load_recipe(_recipe(tmp_path, tiny_recipe, "lib"))
    with pytest.raises(KeyboardInterrupt) as info:
        training.train_float(lr, callbacks=[StopAt(11)])
    assert not isinstance(info.value, Exception)  # an `except Exception` in user code does not swallow it
    assert "interrupted at step 11" in str(info.value)
    saved = load_checkpoint(lr.run_dir / "float" / "checkpoint-last.pt")
    assert (saved["step"], saved["batch_in_epoch"]) == (11, 3)


def test_ctrl_c_in_hat_train_exits_130_with_the_command_that_continues(hat, tmp_path, tiny_recipe, stop_at):
    path = _recipe(tmp_path, tiny_recipe, "cli", 'callbacks = [{name = "stop_at", step = 11}]')
    result = hat("train", path, "--stage", "float", "--set", "float.label_smoothing=0.1")
    assert result.code == 130
    command = f"hat train {path} --stage float --set float.label_smoothing=0.1 --resume"
    assert re.search(r"interrupted.*: float: interrupted at step 11 .*saved .*checkpoint-last\.pt", result.err)
    assert f"continue with `{command}`" in result.err.replace("\n", "")
    assert result.err.count("\n") <= 4  # the message, not a traceback
    resumed = hat(*command.split()[1:])
    assert resumed.code == 0, resumed.err
    assert _epochs(tmp_path / "cli" / "tiny" / "float" / "metrics.jsonl") == [1, 2]


def test_ctrl_c_in_hat_run_continues_when_the_same_command_runs_again(hat, tmp_path, tiny_recipe, stop_at):
    whole = load_recipe(_recipe(tmp_path, tiny_recipe, "whole", 'callbacks = [{name = "stop_at", step = 0}]', 3))
    training.train_float(whole)
    path = _recipe(tmp_path, tiny_recipe, "run", 'callbacks = [{name = "stop_at", step = 20}]', 3)  # epoch 3
    first = hat("run", path)
    assert first.code == 130
    assert "run the same command to continue" in first.err and "--resume" not in first.err
    folder = tmp_path / "run" / "tiny" / "float"
    assert json.loads((folder / "stage.json").read_text())["finished"] is False

    again = hat("run", path, "--json")
    assert again.code == 0, again.err
    assert "float: resuming the unfinished run" in again.err
    assert [line.split()[2] for line in again.err.splitlines() if line.startswith("float epoch ")] == ["3/3"]
    assert _epochs(folder / "metrics.jsonl") == [1, 2, 3]
    for name in ("checkpoint-last.pt", "checkpoint-best.pt"):
        a, b = load_checkpoint(whole.run_dir / "float" / name)["model"], load_checkpoint(folder / name)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    record = json.loads((folder / "stage.json").read_text())
    assert (record["finished"], record["epochs"], record["epochs_planned"]) == (True, 3, 3)


# -- unfinished stages ---------------------------------------------------------------------------


def test_stages_built_on_an_unfinished_stage_say_so_and_how_to_finish_it(hat, tmp_path, tiny_recipe):
    path = _recipe(tmp_path, tiny_recipe, "half")
    lr = load_recipe(path)
    with pytest.raises(Interrupted):
        training.train_float(lr, callbacks=[StopAt(11)])  # epoch 1 of 2 done, 3 steps into the second
    record = stages.read_stage_record(lr, "float")
    assert (record["finished"], record["epochs"], record["epochs_planned"]) == (False, 1, 2)
    assert not stages.is_up_to_date(lr, "float")

    finish = f"`hat train {path} --stage float --resume`"
    calibration = hat("train", path, "--stage", "calibration")
    assert calibration.code == 0, calibration.err
    assert "warning: calibration uses an unfinished stage: the float stage is unfinished (epoch 1/2)" in calibration.err
    assert finish in calibration.err.replace("\n", "")
    assert stages.read_stage_record(lr, "calibration")["built_on_unfinished"]
    assert not stages.is_up_to_date(lr, "calibration")  # `hat run` builds it again once float is finished

    with pytest.warns(HatWarning, match=r"the calibration stage was built on an unfinished stage.*float.*1/2"):
        training.train_qat(lr)
    evaluated = hat("eval", path, "--stage", "float")
    assert evaluated.code == 0 and "the float stage is unfinished (epoch 1/2)" in evaluated.err
    exported = hat("export", path)
    assert exported.code == 0 and "warning: the integer model uses an unfinished stage" in exported.err
    compiled = hat("compile", path, "--march", "nash_e")
    assert compiled.code == 0 and "warning: the compiled artifact uses an unfinished stage" in compiled.err

    assert hat("train", path, "--stage", "float", "--resume").code == 0
    assert stages.read_stage_record(lr, "float")["finished"] is True
    after = hat("eval", path, "--stage", "calibration")
    assert after.code == 0 and "float stage is unfinished" not in after.err
    assert re.search(r"the calibration stage was built on an unfinished stage .*build it again with "
                     rf"`hat train {re.escape(str(path))} --stage calibration`", after.err.replace("\n", ""))
    assert "warning" not in hat("eval", path, "--stage", "float").err


# -- one writer per stage folder -------------------------------------------------------------------


def test_a_second_writer_of_a_stage_folder_exits_1_naming_it_and_the_holder(hat, tmp_path, tiny_recipe):
    path = _recipe(tmp_path, tiny_recipe, "locked")
    folder = tmp_path / "locked" / "tiny" / "float"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from hatcli.locking import exclusive
        with exclusive(Path({str(lock_file_for(folder))!r}), Path({str(folder)!r})):
            print("held", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for argv in (("train", path, "--stage", "float"), ("run", path)):
            refused = hat(*argv)
            assert refused.code == 1, refused.err
            text = refused.err.replace("\n", "")
            assert str(folder) in text and f"pid {holder.pid}" in text
        assert not (folder / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert hat("train", path, "--stage", "float").code == 0  # a dead holder blocks nobody
