"""One writer per output folder: an advisory lock that a killed process cannot leave behind.

`hat pack` locks its target database and `hat train` its stage folder, so that a second process
started on the same output stops at once with one line naming the folder and the process that
holds it, instead of interleaving records or renaming checkpoints over each other.

The lock is `fcntl.flock` on a small file beside what it guards. The kernel releases it when the
holding process ends in any way (exit, Ctrl-C, `kill -9`), so a stale lock file never blocks:
the next process takes the lock and rewrites the file. The file itself only says who holds the
lock (pid, host, command, start time) for the error message.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hatcli.errors import HatError

try:  # POSIX; elsewhere the folder is not locked (documented in docs/formats.md)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class LockedError(HatError):
    """Another process is writing the same output folder; exit code 1."""


def _holder_text(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text(encoding="utf-8"))
        return (f"pid {holder['pid']} on {holder['host']} (`{holder['command']}`, "
                f"since {holder['since']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def exclusive(lock_path: Path, guarded: Path) -> Iterator[None]:
    """Hold the lock at `lock_path` for writing `guarded`, or raise LockedError naming the holder.

    Non-blocking: a second writer fails at once rather than waiting behind the first.
    """
    lock_path = Path(lock_path)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+", encoding="utf-8")  # never truncates another holder's note
    except OSError as exc:
        raise HatError(f"cannot create the lock file {lock_path}: {exc.strerror}; "
                       f"check the folder is writable") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockedError(
                    f"{guarded} is being written by {_holder_text(lock_path)}; wait for it to finish "
                    f"or stop it (a killed process releases the lock by itself)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join(["hat", *sys.argv[1:]])[:300],
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }))
        handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the flock


def lock_file_for(folder: Path) -> Path:
    """The lock file that guards `folder`: a hidden sibling, so it survives the folder's replacement."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"
