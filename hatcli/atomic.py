"""Files written atomically: a temp file in the same folder, fsync, then a rename; and the
early check that a folder can hold a stage's outputs at all (`check_writable`).

Torch-free, so that deploy code (compile, runtime) can use it without importing torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hatcli.errors import HatError


def _umask() -> int:
    """The process umask (read without a lasting change: os.umask is the only portable way)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def permit_as_created(path: Path, directory: bool = False) -> None:
    """Give a temp file or folder the mode an ordinary open()/mkdir() would have given it.

    mkstemp/mkdtemp create 0600/0700 entries; once renamed into place they would be the only
    files of a run that other users (or a serving process) cannot read.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and an atomic rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise HatError(f"cannot write to {path.parent}: {exc.strerror}; check the folder is writable") from None
    try:
        permit_as_created(Path(tmp))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write text atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, indented for people."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def check_writable(folder: Path) -> None:
    """Fail early, with a clear message, when `folder` cannot hold the stage's outputs."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise HatError(f"cannot write to {folder}: {exc.strerror or exc}; "
                       f"choose another `work_dir` (e.g. --set work_dir=/tmp/runs)") from None
