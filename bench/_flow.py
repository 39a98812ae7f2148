"""Shared by the accuracy benchmarks: CIFAR-10 from the tarball into packed LMDBs, and `hat`
commands run in subprocesses exactly as a user types them, their JSON results read back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class StageFailed(RuntimeError):
    """A `hat` subprocess (or an in-process step) failed; the message says which and why."""


def log(message: str) -> None:
    """Print one progress line on stderr, with the time of day."""
    print(f"[{Path(sys.argv[0]).stem} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def unpack(tarball: Path, work: Path) -> Path:
    """Unpack the CIFAR-10 tarball under `work/src` once; return the `cifar10_jpg` folder."""
    dest = work / "src"
    done = dest / ".unpacked"
    src = dest / "cifar10_jpg"
    if done.exists() and done.read_text() == str(tarball.stat().st_size):
        return src
    if dest.exists():
        shutil.rmtree(dest)
    tmp = work / "src.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log(f"unpacking {tarball} -> {dest}")
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp, filter="data")
    tmp.rename(dest)
    done.write_text(str(tarball.stat().st_size))
    return src


def subset(src: Path, split: str, limit: int | None, work: Path) -> Path:
    """The folder to pack `split` from: `src`, or a tree holding the first limit/classes images of
    every class (sorted names, hard links) when `limit` is smaller than the split."""
    folder = src / split
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    total = sum(len(list((folder / c).glob("*.jpg"))) for c in classes)
    if limit is None or limit >= total:
        return src
    per_class = max(1, limit // len(classes))
    out = work / "subsets" / f"{split}{per_class * len(classes)}"
    marker = out / ".complete"
    if marker.exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    for name in classes:
        (out / split / name).mkdir(parents=True)
        for image in sorted((folder / name).glob("*.jpg"))[:per_class]:
            try:
                os.link(image, out / split / name / image.name)
            except OSError:
                shutil.copy2(image, out / split / name / image.name)
    marker.write_text("")
    return out


def pack(src: Path, split: str, target: Path, reuse: bool) -> int:
    """Pack `src/<split>` into `target/<split>_lmdb` with `hat pack imagenet`; return the record count."""
    db = target / f"{split}_lmdb"
    if reuse and db.exists():
        from hatcli.data.lmdb_format import open_packed

        try:
            count = len(open_packed(db))
            log(f"reusing {db} ({count} records)")
            return count
        except Exception:  # noqa: BLE001 - an unreadable database is simply packed again
            pass
    result = hat(["pack", "imagenet", "--src-data-dir", str(src), "--target-data-dir", str(target),
                  "--split", split], f"pack {split}")
    return int(next(iter(result["databases"].values())))


def hat(args: list[str], what: str) -> dict[str, Any]:
    """Run `hat ARGS --json` in a subprocess (stderr shown live); return its JSON result."""
    cmd = [sys.executable, "-m", "hatcli", *args, "--json"]
    log(f"{what}: hat {' '.join(args)}")
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0:
        raise StageFailed(f"{what}: `hat {' '.join(args)}` exited with {proc.returncode}"
                          + (f"; stdout: {lines[-1][:500]}" if lines else "") + " (its error is above on stderr)")
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise StageFailed(f"{what}: `hat {' '.join(args)}` printed no JSON result") from None
    log(f"{what}: done in {time.perf_counter() - tic:.0f} s")
    return result
