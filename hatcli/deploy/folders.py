"""Output folders that appear whole or not at all (`hat export`, `hat compile`).

`building(out_dir)` hands out a temp folder beside `out_dir`; when the block finishes it replaces
`out_dir` with it in one rename (a previous output is swapped out, then removed), and when the
block fails the temp folder, and any parent folder it had to create, is removed: an interrupted or
failed command leaves the previous output, or nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hatcli.atomic import permit_as_created
from hatcli.errors import UsageError


def check_out_dir(out_dir: Path, marker: str) -> None:
    """Refuse an `out_dir` that is a file, or a non-empty folder without `marker` (not one of ours)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / marker).is_file():
        raise UsageError(f"{out_dir} is not empty and holds no {marker}: refusing to replace it")


def swap_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """Rename `tmp_dir` to `out_dir`, replacing what is there (restored if the rename fails)."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old.rmdir()
        os.replace(out_dir, old)
    try:
        os.replace(tmp_dir, out_dir)
    except OSError:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def building(out_dir: Path, marker: str) -> Iterator[Path]:
    """Yield a temp folder to write `out_dir`'s files into; see the module docstring."""
    check_out_dir(out_dir, marker)
    created = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    permit_as_created(tmp_dir, directory=True)
    try:
        yield tmp_dir
        swap_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise
