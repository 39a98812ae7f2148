"""Write one packed split (the format of `hatcli.data.lmdb_format`): atomically, resumably.

`LmdbWriter` writes into ``<path>.partial`` and renames it to ``path`` only once the meta record
is in, so an interrupted pack never leaves a database that looks complete; a resumable write
keeps its progress beside the partial database and continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import lmdb
import msgpack

from hatcli.atomic import atomic_write_json
from hatcli.data.lmdb_format import (
    FORMAT,
    KINDS,
    META_KEY,
    REQUIRED_FIELDS,
    VERSION,
    hash_records,
    is_lmdb_dir,
    is_record_key,
    record_key,
    truncation_problem,
)
from hatcli.errors import DataError

PROGRESS_FILE = "progress.json"
"""In a resumable pack's ``.partial`` folder: how far it got (removed when it finishes)."""
REJECTED_FILE = "rejected.jsonl"
"""In a resumable pack's ``.partial`` folder: the rejections so far (removed when it finishes)."""
MAX_RECORDS = 10**8  # keys are "%08d": beyond this they would no longer sort in index order
DEFAULT_MAP_SIZE = 256 << 20


class LmdbWriter:
    """Write one packed split; use as a context manager.

    Two ways to fill it:

    - `put(index, record)`: records under explicit indices, in any order (a one-shot write: an
      interrupted write is removed);
    - `consume(record, rejections)`: one source item at a time, in source order, records getting
      contiguous indices. With a `fingerprint` (a digest of the source and the options) such a
      write is *resumable*: after every committed batch of records, the progress (items
      consumed, records, rejections) is saved beside the database in the ``.partial`` folder; an
      interrupted write keeps that folder, and a later writer with the same fingerprint
      continues from `items_done`. Progress is saved only after its records are committed, so
      after a crash it can only lag behind: the records past it are written again, with the same
      bytes. The finished database holds the same keys and bytes as an uninterrupted write, and
      no bookkeeping (an uninterrupted write is byte-identical from run to run).

    When the map is full the map size is doubled and the batch retried. On a clean exit the
    bookkeeping keys are deleted, the meta record is written last and the database is moved into
    place. `discard()` drops the partial database for good (used by `--strict`).
    """

    def __init__(
        self,
        path: str | Path,
        kind: str,
        split: str,
        classes: list[str],
        extra_meta: dict[str, Any] | None = None,
        map_size: int = DEFAULT_MAP_SIZE,
        batch_records: int = 512,
        batch_bytes: int = 64 << 20,
        fingerprint: str | None = None,
    ) -> None:
        if kind not in KINDS:
            raise DataError(f"cannot pack kind `{kind}`: the packed format knows {', '.join(KINDS)}")
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.kind = kind
        self.split = split
        self.classes = [str(c) for c in classes]
        self.extra_meta = dict(extra_meta or {})
        reserved = {"format", "version", "kind", "split", "count", "classes", "checksums"}
        clash = sorted(reserved & set(self.extra_meta))
        if clash:
            raise DataError(f"extra_meta may not set the reserved meta keys {clash}")
        self.map_size = max(int(map_size), 1 << 16)
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.fingerprint = fingerprint
        self._env: lmdb.Environment | None = None
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0
        self._next = 0  # index expected next while records arrive in order
        self._in_order = True
        self._sha = hashlib.sha256()
        self._discarded = False
        self._saved_items = 0  # items_done as last saved in the progress file
        self._saved_rejections = 0
        self.count = 0
        self.items_done = 0
        """Source items consumed so far (including those resumed from an earlier write)."""
        self.rejections: list[dict[str, Any]] = []
        """Rejections passed to `consume`, in order (including resumed ones)."""
        self.resumed_items = 0
        """How many source items an interrupted earlier write had already consumed."""

    def __enter__(self) -> LmdbWriter:
        if self.path.exists():
            if not self.path.is_dir() or (any(self.path.iterdir()) and not is_lmdb_dir(self.path)):
                raise DataError(
                    f"{self.path} exists and is not a packed database; refusing to overwrite it"
                )
        if self.partial.exists() and not self._try_resume():
            shutil.rmtree(self.partial)
        if self._env is None:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self._env = self._open_partial()
            if self.fingerprint is not None:
                self._rewrite_rejections()
        return self

    def _open_partial(self) -> lmdb.Environment:
        return lmdb.open(
            str(self.partial), map_size=self.map_size, subdir=True, lock=False,
            readahead=False, meminit=True, max_dbs=0,
        )

    def _try_resume(self) -> bool:
        """Continue the partial database of an interrupted write with the same fingerprint."""
        if self.fingerprint is None or not (self.partial / "data.mdb").is_file():
            return False
        try:
            progress = json.loads((self.partial / PROGRESS_FILE).read_text(encoding="utf-8"))
            lines = (self.partial / REJECTED_FILE).read_text(encoding="utf-8").splitlines()
            if progress.get("fingerprint") != self.fingerprint:
                return False
            count, items_done, n_rejected = int(progress["count"]), int(progress["items_done"]), int(progress["rejected"])
            rejections = [json.loads(line) for line in lines[:n_rejected]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        if len(rejections) != n_rejected:
            return False
        self.map_size = max(self.map_size, 2 * (self.partial / "data.mdb").stat().st_size)
        try:
            env = self._open_partial()
        except lmdb.Error:
            return False
        if truncation_problem(env, self.partial / "data.mdb") is not None:
            env.close()  # reading it would die of SIGBUS: pack afresh
            return False
        with env.begin() as txn:
            for key, value in txn.cursor():
                if is_record_key(key) and int(key) < count:
                    self._sha.update(value)
        self._env = env
        self._next = self.count = count
        self.items_done = self.resumed_items = self._saved_items = items_done
        self.rejections = rejections
        self._saved_rejections = n_rejected
        self._rewrite_rejections()
        return True

    def put(self, index: int, record: dict[str, Any]) -> None:
        """Add `record` (a dict of the kind's fields) under key `index`."""
        self._add(index, self._pack(index, record))

    def _pack(self, index: int, record: dict[str, Any]) -> bytes:
        """The msgpack bytes of record `index`; DataError (nothing changed) when it cannot be stored."""
        if self._env is None:
            raise DataError("LmdbWriter.put called outside its `with` block")
        if not 0 <= index < MAX_RECORDS:
            raise DataError(f"record index {index} is outside 0..{MAX_RECORDS - 1}")
        missing = [f for f in REQUIRED_FIELDS[self.kind] if f not in record]
        if missing:
            raise DataError(f"{self.kind} record {index} lacks the fields {missing}")
        try:
            return msgpack.packb(record, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
            raise DataError(f"{self.kind} record {index} ({record.get('name') or record.get('file_name')!r}) "
                            f"cannot be stored: {exc}") from None

    def _add(self, index: int, value: bytes) -> None:
        if self._in_order and index == self._next:
            self._sha.update(value)
            self._next += 1
        else:
            self._in_order = False
        self._pending.append((record_key(index), value))
        self._pending_bytes += len(value)
        if len(self._pending) >= self.batch_records or self._pending_bytes >= self.batch_bytes:
            self._flush()

    def consume(self, record: dict[str, Any] | None, rejections: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
        """Account for one source item: its record (None when rejected) and its rejections.

        The item counts as done only together with its record: when the record cannot be stored
        (DataError), nothing of the item is kept, so a resumed write reads it again.
        """
        value = None if record is None else self._pack(self._next, record)
        self.rejections.extend(rejections)
        self.items_done += 1
        if value is not None:
            self._add(self._next, value)
        elif self.items_done - self._saved_items >= self.batch_records:
            self._flush()

    def _write(self, items: list[tuple[bytes, bytes]]) -> None:
        """Write `items` in one transaction, doubling the map size until they fit."""
        assert self._env is not None
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in items:
                        txn.put(key, value)
                return
            except lmdb.MapFullError:
                self.map_size *= 2
                self._env.set_mapsize(self.map_size)

    def _flush(self) -> None:
        if self._pending:
            self._write(self._pending)
        self._pending = []
        self._pending_bytes = 0
        if self.fingerprint is not None and self._in_order and self.items_done != self._saved_items:
            self._save_progress()

    def _rewrite_rejections(self) -> None:
        """Make the partial folder's rejection list hold exactly the saved rejections."""
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rejections[:self._saved_rejections])
        (self.partial / REJECTED_FILE).write_text(text, encoding="utf-8")

    def _save_progress(self) -> None:
        """Record, after the records are committed, how far this write got."""
        new = self.rejections[self._saved_rejections:]
        if new:
            with (self.partial / REJECTED_FILE).open("a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in new))
                handle.flush()
                os.fsync(handle.fileno())
        progress = {"fingerprint": self.fingerprint, "items_done": self.items_done, "count": self._next,
                    "rejected": len(self.rejections)}
        atomic_write_json(self.partial / PROGRESS_FILE, progress)
        self._saved_items = self.items_done
        self._saved_rejections = len(self.rejections)

    def _scan(self) -> tuple[int, str]:
        """Count the records and hash them in key order (used when puts came out of order)."""
        assert self._env is not None
        with self._env.begin() as txn:
            return hash_records(txn.cursor(), self.path)

    def _finish(self) -> None:
        self._flush()
        if self._in_order:
            count, digest = self._next, self._sha.hexdigest()
        else:
            count, digest = self._scan()
        self.count = count
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "split": self.split,
            "count": count,
            "classes": self.classes,
            "checksums": {"records_sha256": digest},
            **self.extra_meta,
        }
        self._write([(META_KEY, msgpack.packb(meta, use_bin_type=True))])
        assert self._env is not None
        self._env.sync(True)
        self._env.close()
        self._env = None
        old = self.path.with_name(self.path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if self.path.exists():
            os.replace(self.path, old)
        for name in (PROGRESS_FILE, REJECTED_FILE):
            (self.partial / name).unlink(missing_ok=True)
        os.replace(self.partial, self.path)
        if old.exists():
            shutil.rmtree(old)

    def discard(self) -> None:
        """Drop the partial database: the write will neither finish nor be resumed."""
        self._discarded = True
        self._abort(keep=False)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._discarded:
            return
        if exc_type is None:
            try:
                self._finish()
                return
            except BaseException:
                self._abort(keep=False)
                raise
        self._abort(keep=self.fingerprint is not None and self._in_order)

    def _abort(self, keep: bool) -> None:
        """Close the environment; with `keep`, first commit what is complete so a rerun resumes."""
        if self._env is not None:
            if keep:
                try:
                    self._flush()
                    self._env.sync(True)
                except lmdb.Error:
                    pass  # the last committed batch is still consistent
            self._env.close()
            self._env = None
        if not keep:
            shutil.rmtree(self.partial, ignore_errors=True)
