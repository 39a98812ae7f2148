"""One `hat pack` per target database: a second stops at once, a killed one blocks nobody.

What they pin: while one process packs ``DST/train_lmdb``, a second `hat pack` into the same
target exits 1 with one line that names the database folder and the process holding it, and
leaves the first one's work alone; once the first is killed (``kill -9``), the next pack takes
the lock and continues the interrupted pack.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hatcli.data.packers.imagenet import pack_imagenet_split
from test_packers import _class_tree, _db_items

HOLDER = """
import pathlib, sys, time
from hatcli.data.packers.imagenet import pack_imagenet_split
def hold(done):
    if done == 700:  # past the first committed batch
        pathlib.Path(sys.argv[3]).write_text("holding")
        time.sleep(300)
pack_imagenet_split(sys.argv[1], sys.argv[2], "train", workers=0, on_item=hold)
"""


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else "the holder exited"
        assert time.monotonic() < deadline, "the holder never reached its pause"
        time.sleep(0.1)


def test_a_second_pack_into_the_same_target_stops_and_a_killed_one_does_not_block(tmp_path: Path, hat) -> None:
    src = _class_tree(tmp_path / "src", per_class=400)
    marker = tmp_path / "holding"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(src), str(tmp_path / "dst"), str(marker)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(marker, holder)
        args = ("pack", "imagenet", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst", "--split", "train",
                "--workers", "0")
        second = hat(*args)
        assert second.code == 1
        assert len(second.err.strip().splitlines()) == 1
        assert str(tmp_path / "dst" / "train_lmdb") in second.err and f"pid {holder.pid}" in second.err
        assert (tmp_path / "dst" / "train_lmdb.partial").is_dir()  # the holder's work is untouched
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    third = hat(*args)
    assert third.code == 0, third.err
    assert "resumed after" in third.out
    pack_imagenet_split(src, tmp_path / "whole", "train", workers=0)
    assert _db_items(tmp_path / "dst" / "train_lmdb") == _db_items(tmp_path / "whole" / "train_lmdb")
