"""The engine every packer runs on: parallel read/validate, resumable writes, rejected records.

A packer lists its source as an ordered sequence of *items* (small picklable tuples: a path, a
label, annotations) and gives a module-level `read(item) -> Outcome` function that reads and
validates one item. `run_pack` maps `read` over the items, in ``--workers`` processes when asked,
and hands the outcomes in source order to a resumable `LmdbWriter`:

- records get contiguous indices in source order, so a run with any number of workers, or an
  interrupted run continued later, ends with the same keys and bytes as a plain run;
- the writer's fingerprint is a digest of the source listing (paths, sizes, modification times)
  and the options, so a continued run only ever resumes the *same* pack;
- rejections (bad images, bad annotations, ...) are skipped and listed in
  ``<db>.rejected.jsonl`` next to the database; with ``strict`` the first one stops the pack
  with a DataError and the partial database is removed;
- the database is locked (`hatcli.locking`) for the whole pack, so two packs never write it at once.

What a packer may read, and how much, is `hatcli.data.source_files.SourceReader`'s job.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hatcli.atomic import atomic_write_text
from hatcli.data.lmdb_writer import LmdbWriter
from hatcli.data.source_files import display_name
from hatcli.errors import DataError, Interrupted, UsageError
from hatcli.locking import exclusive, lock_file_for
from hatcli.family import PackResult

CHUNK_ITEMS = 64


@dataclass
class Outcome:
    """What reading one source item gave: its record (None when rejected) and any rejections."""

    record: dict[str, Any] | None
    rejections: list[dict[str, Any]] = field(default_factory=list)


def rejection(source: str | Path, reason: str, **details: Any) -> dict[str, Any]:
    """A rejected-record entry: the path (or annotation) that was skipped and why.

    The source is text (`display_name`: bytes of a file name that are not UTF-8 appear as
    ``\\xNN``), so the list stays valid UTF-8 JSON.
    """
    return {"source": display_name(source), "reason": reason, **details}


@dataclass
class PackSummary:
    """What `run_pack` wrote."""

    path: Path
    count: int
    rejected: int
    rejected_file: Path | None
    resumed_items: int
    seconds: float
    items: int
    warnings: list[str] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        """Source items read per second in this run (resumed items excluded)."""
        return (self.items - self.resumed_items) / max(self.seconds, 1e-9)


def check_split_name(split: str) -> str:
    """Return `split`, or UsageError when it is not a plain name (it names files in the target folder)."""
    if not split or split.startswith(".") or any(c in split for c in "/\\:"):
        raise UsageError(f"--split `{split}` is not a plain name (like train or val)")
    return split


def db_path(target_data_dir: Path, split: str) -> Path:
    """``DST/<split>_lmdb``; refuses a split name that would leave the target folder."""
    return Path(target_data_dir) / f"{check_split_name(split)}_lmdb"


def rejected_path(db: Path) -> Path:
    """Where the rejections of the database `db` are listed: ``<db>.rejected.jsonl``."""
    return db.with_name(db.name + ".rejected.jsonl")


def pack_fingerprint(*parts: Any) -> str:
    """SHA-256 over the JSON of `parts`: what a resumed pack must have in common with the first."""
    sha = hashlib.sha256()
    for part in parts:
        sha.update(json.dumps(part, sort_keys=True, default=str).encode())
        sha.update(b"\0")
    return sha.hexdigest()


def file_signature(path: Path) -> list[Any]:
    """(size, mtime in ns) of a file, or the error: enough to see that a source file changed."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return ["error", exc.errno]
    return [st.st_size, st.st_mtime_ns]


AUTO_WORKERS_MIN_ITEMS = 2000
"""Below this many items a worker pool costs more than it saves."""


def resolve_workers(workers: int, n_items: int) -> int:
    """The number of worker processes: `workers` itself, or for -1 one per core (up to 8) on large sources."""
    if workers < -1:
        raise UsageError(f"--workers must be -1 (automatic), 0 (this process) or more, got {workers}")
    if workers == -1:
        return min(os.cpu_count() or 1, 8) if n_items >= AUTO_WORKERS_MIN_ITEMS else 0
    return workers


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; only the parent handles it (and stops the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _outcomes(read: Callable[[Any], Outcome], items: Sequence[Any], workers: int) -> Iterator[Outcome]:
    """`read` over `items` in order, in `workers` processes (0: in this process)."""
    if workers <= 0:
        for item in items:
            yield read(item)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "fork":
        # The decoder's import takes seconds (torchvision imports torch._dynamo); pay it once here,
        # not once per worker.
        import torchvision.io  # noqa: F401
    pool = multiprocessing.get_context(method).Pool(workers, initializer=_ignore_sigint)
    try:
        yield from pool.imap(read, items, chunksize=CHUNK_ITEMS)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _strict_stop(source: str, reason: str) -> DataError:
    return DataError(f"{source}: {reason} (--strict: stopped, no database written; "
                     f"fix the source or drop --strict to skip bad records)")


def run_pack(
    *,
    db: Path,
    kind: str,
    split: str,
    classes: list[str],
    items: Sequence[Any],
    read: Callable[[Any], Outcome],
    source_fingerprint: str,
    workers: int = 0,
    strict: bool = False,
    listing_rejections: list[dict[str, Any]] | None = None,
    warnings: list[tuple[str, str]] | None = None,
    extra_meta: dict[str, Any] | None = None,
    description: str | None = None,
    on_item: Callable[[int], None] | None = None,
) -> PackSummary:
    """Pack `items` into the database `db`, resuming an interrupted run of the same pack.

    `listing_rejections` are problems found while listing the source (bad annotations, unsafe
    file names); they are reported like the rest. `warnings` are ``(where, what)`` problems that
    do not lose a record (an empty class folder): reported in the summary, errors under `strict`.
    `on_item(items_done)` is called after every item (progress hooks, tests that interrupt a
    pack). The database is locked for the whole pack: a second pack into it stops at once with
    `hatcli.locking.LockedError`.
    """
    listing_rejections = list(listing_rejections or [])
    warnings = list(warnings or [])
    if strict and listing_rejections:
        raise _strict_stop(listing_rejections[0]["source"], listing_rejections[0]["reason"])
    if strict and warnings:
        raise _strict_stop(*warnings[0])
    workers = resolve_workers(workers, len(items))
    tic = time.perf_counter()
    with exclusive(lock_file_for(db), db):
        writer = _write(db, kind, split, classes, items, read, source_fingerprint, workers, strict,
                        extra_meta, description, on_item)
        all_rejections = listing_rejections + writer.rejections
        listed = rejected_path(db)
        if all_rejections:
            atomic_write_text(listed, "".join(json.dumps(r, sort_keys=True) + "\n" for r in all_rejections))
        elif listed.exists():
            listed.unlink()  # from an earlier pack of a source that has since been fixed
    return PackSummary(path=db, count=writer.count, rejected=len(all_rejections),
                       rejected_file=listed if all_rejections else None, resumed_items=writer.resumed_items,
                       seconds=time.perf_counter() - tic, items=len(items),
                       warnings=[f"{where}: {what}" for where, what in warnings])


def _write(
    db: Path, kind: str, split: str, classes: list[str], items: Sequence[Any], read: Callable[[Any], Outcome],
    source_fingerprint: str, workers: int, strict: bool, extra_meta: dict[str, Any] | None,
    description: str | None, on_item: Callable[[int], None] | None,
) -> LmdbWriter:
    """The write loop of `run_pack`: outcomes in source order into a resumable writer."""
    from hatcli.progress import console, make_progress

    writer = LmdbWriter(db, kind, split, classes, extra_meta=extra_meta, fingerprint=source_fingerprint)
    with writer:
        start = writer.items_done
        if start:
            console.print(f"[cyan]resuming[/] {db.name}: {start} of {len(items)} items were packed before")
        try:
            with make_progress() as progress:
                bar = progress.add_task(description or f"pack {split}", total=len(items), completed=start)
                for outcome in _outcomes(read, items[start:], workers):
                    if strict and outcome.rejections:
                        bad = outcome.rejections[0]
                        writer.discard()
                        raise _strict_stop(bad["source"], bad["reason"])
                    writer.consume(outcome.record, outcome.rejections)
                    progress.advance(bar)
                    if on_item is not None:
                        on_item(writer.items_done)
        except KeyboardInterrupt:
            raise Interrupted(
                f"pack interrupted after {writer.items_done} of {len(items)} items; "
                f"run the same command again to continue"
            ) from None
    return writer


def add_summary(result: PackResult, summary: PackSummary) -> None:
    """Add one database's summary to a packer's result (count, rejections, a line for the user)."""
    result.databases[str(summary.path)] = summary.count
    result.rejected += summary.rejected
    rate = f"{summary.items_per_s:,.0f} items/s" if summary.items > summary.resumed_items else "nothing left to read"
    resumed = f", resumed after {summary.resumed_items}" if summary.resumed_items else ""
    line = f"{summary.path.name}: {summary.count} records in {summary.seconds:.1f} s ({rate}{resumed})"
    if summary.rejected:
        line += f"; {summary.rejected} rejected, listed in {summary.rejected_file}"
    result.notes.append(line)
    result.warnings.extend(summary.warnings)
