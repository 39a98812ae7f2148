"""One writer per output folder: a second writer stops at once, a dead holder blocks nobody."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hatcli.locking import LockedError, exclusive, lock_file_for


def test_a_second_writer_is_refused_with_the_folder_and_the_holder(tmp_path):
    target = tmp_path / "train_lmdb"
    lock = lock_file_for(target)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from hatcli.locking import exclusive
        with exclusive(Path({str(lock)!r}), Path({str(target)!r})):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError) as info:
            with exclusive(lock, target):
                pass
        message = str(info.value)
        assert str(target) in message
        assert f"pid {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    target = tmp_path / "float"
    lock = lock_file_for(target)
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from hatcli.locking import exclusive
        with exclusive(Path({str(lock)!r}), Path({str(target)!r})):
            os.kill(os.getpid(), signal.SIGKILL)
    """)], check=False)
    assert lock.exists()  # the note stays, the lock does not
    with exclusive(lock, target):
        pass


def test_the_lock_is_released_on_leaving(tmp_path):
    lock = tmp_path / ".x.lock"
    with exclusive(lock, tmp_path / "x"):
        pass
    with exclusive(lock, tmp_path / "x"):
        pass
