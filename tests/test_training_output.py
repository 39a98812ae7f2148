"""What training and `hat run` print when their output is not a terminal (CI, `| tee`, a log file).

Off a terminal there are no progress bars: each epoch prints one plain line with its numbers
(stage, epoch N/M, loss, validation metrics, lr, images/s, elapsed, ETA), each stage of `hat run`
one line as it ends, and any other progress a line when it ends - never cut at 80 columns. Also:
TensorBoard is an optional extra, and training says once when its event files are off.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import TextColumn

from hatcli import progress
from hatcli.engine.callbacks import TensorBoardLogger
from hatcli.progress import LineProgress, track

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]


def _has_bar_or_cut(text: str) -> bool:
    """A rich bar (its line of ━ before a count), or text cut at the width with `…`."""
    return "…" in text or any(re.search(r"[━╸].*\d+/\d+", line) for line in text.splitlines())


def _epoch_lines(text: str, stage: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(rf"{stage} epoch \d+/\d+ ", line)]


def test_training_off_a_terminal_prints_one_line_per_epoch_with_its_numbers(hat, tiny_recipe):
    result = hat("train", tiny_recipe, "--stage", "float", "--set", "float.epochs=3")
    assert result.code == 0, result.err
    lines = _epoch_lines(result.err, "float")
    assert [line.split()[2] for line in lines] == ["1/3", "2/3", "3/3"]
    for line in lines:
        for number in (r"loss \d+\.\d{4}", r"top1 \d+\.\d\d", r"top5 \d+\.\d\d", r"lr \d\.\d\de-\d\d",
                       r"[\d,]+ img/s", r"elapsed \d+:\d\d:\d\d", r"ETA \d+:\d\d:\d\d"):
            assert re.search(number, line), (number, line)
    assert not _has_bar_or_cut(result.err), result.err


def test_progress_off_a_terminal_is_one_uncut_line_at_the_end_and_no_bar(capsys):
    description = "verify " + "a-very-long-database-name-" * 6  # far wider than 80 columns
    assert list(track(range(601), 601, description)) == list(range(601))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{description}  601/601  ")
    assert "elapsed 0:00:0" in err and not _has_bar_or_cut(err)


def test_bars_on_a_narrow_terminal_wrap_instead_of_being_cut(monkeypatch):
    terminal = Console(file=io.StringIO(), width=60, force_terminal=True, color_system=None)
    monkeypatch.setattr(progress, "console", terminal)
    bar = progress.make_progress(TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} 908 img/s",
                                            table_column=progress.WRAP))
    bar.add_task("float epoch 12/14", total=1316, completed=127, loss=1.2345, lr=0.05)
    terminal.print(bar.make_tasks_table(bar.tasks))
    text = terminal.file.getvalue()
    assert "…" not in text
    words = "float epoch 12/14 127/1316 loss 1.2345 lr 5.00e-02 908 img/s 0:00:00".split()
    assert set(words) <= set(text.split()), text  # every word whole, some on a second line


def test_a_long_task_off_a_terminal_prints_a_line_now_and_then_with_its_eta(capsys):
    with LineProgress(every=0.0) as progress:
        task = progress.add_task("pack train", total=4)
        for _ in range(4):
            progress.advance(task)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert "(25%)" in lines[0] and "ETA " in lines[0] and "ETA" not in lines[-1]


def test_a_transient_progress_leaves_no_line(capsys):
    with LineProgress(transient=True) as progress:
        task = progress.add_task("float val", total=2)
        progress.advance(task, 2)
    assert capsys.readouterr().err == ""


def test_hat_run_of_the_quickstart_into_a_log_file_prints_one_line_per_epoch_and_per_stage(tmp_path, tiny_shapes):
    log = tmp_path / "log.txt"
    overrides = [f"work_dir={str(tmp_path / 'runs')!r}", f"data.root={str(tiny_shapes)!r}", "data.input_size=[32, 32]",
                 'data.val_transforms=[{name = "Resize", size = [32, 32]}]', "data.batch_size=16",
                 "float.epochs=2", "qat.epochs=1", "calibration.num_batches=2", "deploy.perf_runs=5"]
    argv = [sys.executable, "-m", "hatcli", "run", str(REPO / "recipes" / "quickstart.toml")]
    for item in overrides:
        argv += ["--set", item]
    with log.open("w") as handle:
        done = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path, timeout=600,
                              env={**os.environ, "COLUMNS": "80"})
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert [line.split()[2] for line in _epoch_lines(text, "float")] == ["1/2", "2/2"]
    assert [line.split()[2] for line in _epoch_lines(text, "qat")] == ["1/1"]
    for stage in ("pack", "float", "calibration", "qat", "int_infer", "export", "check (nash_e)",
                  "compile (nash_e -O3)", "perf", "deploy"):
        assert re.search(rf"^{re.escape(stage)} done: .+\(", text, re.M), stage
    assert re.search(r"^float done: top1 \d+\.\d\d  top5 \d+\.\d\d \(\d+\.\d s\)$", text, re.M)
    assert not _has_bar_or_cut(text), text


def test_training_says_once_that_tensorboard_event_files_are_off_when_it_is_not_installed(hat, tiny_recipe,
                                                                                          monkeypatch):
    monkeypatch.setattr(TensorBoardLogger, "available", staticmethod(lambda: False))
    result = hat("train", tiny_recipe, "--stage", "float")
    assert result.code == 0, result.err
    assert result.err.count("TensorBoard event files are off") == 1
    assert "pip install 'hatcli[tensorboard]'" in result.err
    first_epoch = result.err.index("float epoch 1/2")
    assert result.err.index("warning: TensorBoard event files are off") < first_epoch  # said at the start
    assert not (tiny_recipe.parent / "runs" / "tiny" / "float" / "tensorboard").exists()


def test_the_readme_documents_the_tensorboard_extra():
    readme = (REPO / "README.md").read_text()
    assert "hatcli[tensorboard]" in readme
    assert 'tensorboard = ["tensorboard' in (REPO / "pyproject.toml").read_text()
