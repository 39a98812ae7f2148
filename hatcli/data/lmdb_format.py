"""The packed dataset format: one LMDB database of msgpack records per split.

Layout (also documented in docs/, keep the two in step):

- records under the keys ``b"%08d" % index`` for ``index`` in ``0 .. count-1``;
- metadata under ``b"__meta__"``: a msgpack dict ``{"format": "hat-lmdb", "version": 1,
  "kind": "classification"|"detection"|"segmentation", "split": str, "count": int, "classes": [names in label
  order], "checksums": {"records_sha256": hex}, ...}`` where the checksum is SHA-256 over the
  record bytes in key order. Packers may add more keys (detection adds ``category_ids`` and
  ``coco_categories``).

A classification record is ``{"image": bytes, "label": int, "name": str}``, plus ``"name_bytes":
bytes`` (the exact file name) when the file name is not UTF-8; a detection record
is ``{"image": bytes, "image_id": int, "file_name": str, "height": int, "width": int, "boxes":
[[x, y, w, h], ...], "labels": [int], "category_ids": [int], "iscrowd": [0|1], "area": [float]}``
with COCO ``xywh`` boxes in pixels, plus optional ``"difficult": [0|1]`` and ``"truncated": [0|1]``
per box (Pascal VOC's flags; a difficult box is neither trained on nor counted by the metrics).
A segmentation record is ``{"image": bytes, "mask": bytes, "image_id": int, "file_name": str,
"height": int, "width": int}`` where ``mask`` is an 8-bit greyscale PNG of the image's size holding
one class index per pixel (``meta["ignore_index"]``, 255, marks pixels no metric or loss counts);
segmentation meta adds ``ignore_index`` and ``palette`` (one RGB triple per class, for drawing).
Image bytes are the encoded JPEG/PNG file, as it was.

This module reads and verifies the format; `hatcli.data.lmdb_writer.LmdbWriter` writes it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from hatcli.errors import DataError

FORMAT = "hat-lmdb"
VERSION = 1
META_KEY = b"__meta__"
KINDS = ("classification", "detection", "segmentation")
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "classification": ("image", "label", "name"),
    "detection": (
        "image", "image_id", "file_name", "height", "width",
        "boxes", "labels", "category_ids", "iscrowd",
    ),
    "segmentation": ("image", "mask", "image_id", "file_name", "height", "width"),
}
IGNORE_INDEX = 255
"""The mask value of pixels that belong to no class (borders, unlabelled): no loss, no metric."""
REPACK_HINT = "re-pack it with `hat pack`"


def record_key(index: int) -> bytes:
    """Return the LMDB key of record `index` (``b"%08d" % index``)."""
    return b"%08d" % index


def is_record_key(key: bytes) -> bool:
    """Whether an LMDB key is a record key (8 digits), not the meta record."""
    return len(key) == 8 and key.isdigit()


def is_lmdb_dir(path: Path) -> bool:
    """Whether `path` is a folder holding only an LMDB environment."""
    names = {p.name for p in path.iterdir()}
    return "data.mdb" in names and names <= {"data.mdb", "lock.mdb"}


def hash_records(items: Iterable[tuple[bytes, bytes]], path: Path) -> tuple[int, str]:
    """Count the records among (key, value) pairs in key order and sha256 their bytes.

    Raises DataError when the record keys are not 0, 1, 2, ... without gaps.
    """
    sha = hashlib.sha256()
    count = 0
    for key, value in items:
        if not is_record_key(key):
            continue
        if key != record_key(count):
            raise DataError(f"{path}: records are not contiguous: expected index {count}, "
                            f"found key {bytes(key).decode(errors='replace')}; {REPACK_HINT}")
        sha.update(value)
        count += 1
    return count, sha.hexdigest()


def truncation_problem(env: lmdb.Environment, data_file: Path) -> str | None:
    """Why the environment's data file is too short for the pages its header uses, or None.

    LMDB maps the file and reads pages straight from the mapping: a page beyond the end of a
    truncated file kills the process with SIGBUS, so the size is checked before any page is read.
    The header (meta pages, read with plain reads) names the last page in use.
    """
    needed = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
    size = os.stat(data_file).st_size
    if size >= needed:
        return None
    return (f"{data_file} is truncated: it holds {size:,} bytes but its LMDB header says the database "
            f"uses {needed:,} (an interrupted copy or a full disk?); copy it again or {REPACK_HINT}")


def _open_env(path: Path) -> lmdb.Environment:
    try:
        env = lmdb.open(
            str(path), readonly=True, lock=False, readahead=False, meminit=False,
            subdir=path.is_dir(), max_readers=512,
        )
    except lmdb.Error as exc:
        raise DataError(f"cannot open packed data at {path}: {exc}; {REPACK_HINT}") from None
    problem = truncation_problem(env, path / "data.mdb" if path.is_dir() else path)
    if problem is not None:
        env.close()
        raise DataError(problem)
    return env


Identity = tuple[str, int, int]

_ENVS: dict[Identity, tuple[int, lmdb.Environment]] = {}
_ENVS_LOCK = threading.Lock()


def _identity(path: Path) -> Identity:
    """The resolved path plus device and inode of its data file: which database this is."""
    data = path / "data.mdb" if path.is_dir() else path
    try:
        st = os.stat(data)
    except OSError as exc:
        raise DataError(f"cannot open packed data at {path}: {exc}") from None
    return (str(path.resolve()), st.st_dev, st.st_ino)


def _shared_env(path: Path, identity: Identity) -> lmdb.Environment:
    """Return this process's read-only environment for the database `identity`, opening it once.

    LMDB (and py-lmdb, which refuses a second open) allows one environment per file per process,
    so every reader of a database shares one. An environment inherited through fork is closed
    (in the child only) and opened anew.
    """
    pid = os.getpid()
    with _ENVS_LOCK:
        entry = _ENVS.get(identity)
        if entry is not None and entry[0] == pid:
            return entry[1]
        if entry is not None:
            del _ENVS[identity]
            entry[1].close()  # in a forked child this only drops the child's copy
        if _identity(path) != identity:
            raise DataError(f"packed data at {path} was replaced after it was opened; open it again")
        env = _open_env(path)
        _ENVS[identity] = (pid, env)
        return env


def _close_shared(identity: Identity) -> None:
    with _ENVS_LOCK:
        entry = _ENVS.pop(identity, None)
    if entry is not None:
        entry[1].close()


def _read_meta(path: Path) -> tuple[dict[str, Any], Identity]:
    """Read and check the meta record of the database at `path`; return it and the database's identity."""
    if not path.exists():
        raise DataError(f"no packed data at {path}; create it with `hat pack`")
    if path.is_dir() and not (path / "data.mdb").exists():
        partial = "; an interrupted pack leaves a `.partial` folder" if path.name.endswith(".partial") else ""
        raise DataError(f"{path} holds no LMDB database (no data.mdb){partial}; create it with `hat pack`")
    identity = _identity(path)
    with _shared_env(path, identity).begin() as txn:
        raw = txn.get(META_KEY)
    if raw is None:
        raise DataError(
            f"{path} has no `__meta__` record: it was not written by hat, or its pack was "
            f"interrupted; {REPACK_HINT}"
        )
    try:
        meta = msgpack.unpackb(raw, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DataError(f"{path}: the meta record is unreadable ({exc}); {REPACK_HINT}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{path} is not a `{FORMAT}` database (format: {found!r}); {REPACK_HINT}")
    if meta.get("version") != VERSION:
        raise DataError(
            f"{path} is `{FORMAT}` version {meta.get('version')!r} but this hat reads version "
            f"{VERSION}; {REPACK_HINT} with this version of hat"
        )
    if meta.get("kind") not in KINDS or not isinstance(meta.get("count"), int):
        raise DataError(f"{path}: meta has a bad `kind` or `count`; {REPACK_HINT}")
    return meta, identity


class PackedReader:
    """Read-only, fork-safe random access to one packed database.

    The LMDB environment is looked up on every access in a per-process table (see
    `_shared_env`): it is opened once per process, reopened after a fork, and shared by all
    readers of the same database. Readers pickle (for spawned DataLoader workers) as their path,
    meta and the database's identity.
    """

    def __init__(self, path: str | Path, meta: dict[str, Any], identity: Identity) -> None:
        self.path = Path(path)
        self.meta = meta
        self._identity = identity

    def __len__(self) -> int:
        return int(self.meta["count"])

    def get_bytes(self, index: int) -> bytes:
        """Return the raw msgpack bytes of record `index` (negative indices count from the end)."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"record {index} out of range for {n} records in {self.path}")
        with _shared_env(self.path, self._identity).begin(buffers=False) as txn:
            raw = txn.get(record_key(index))
        if raw is None:
            raise DataError(f"{self.path}: record {index} is missing; {REPACK_HINT}")
        return raw

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self.get_bytes(index)
        try:
            return msgpack.unpackb(raw, raw=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise DataError(f"{self.path}: record {index} is corrupt ({exc}); {REPACK_HINT}") from None

    def close(self) -> None:
        """Close this process's environment for the database (other readers of it reopen lazily)."""
        _close_shared(self._identity)

    def __repr__(self) -> str:
        return f"PackedReader({str(self.path)!r}, kind={self.meta['kind']!r}, count={len(self)})"


def open_packed(path: str | Path) -> PackedReader:
    """Open the packed database at `path` for reading; DataError when it is missing or foreign."""
    path = Path(path)
    meta, identity = _read_meta(path)
    return PackedReader(path, meta, identity)


def verify_packed(path: str | Path, progress: bool = True) -> dict[str, Any]:
    """Recompute the record count and checksum of `path`; DataError when they disagree with meta.

    Returns ``{"path", "kind", "split", "count", "classes" (how many), "records_sha256", "ok": True}``.
    """
    from hatcli.progress import track

    path = Path(path)
    meta, identity = _read_meta(path)
    with _shared_env(path, identity).begin(buffers=False) as txn:
        items = ((key, value) for key, value in txn.cursor() if is_record_key(key))  # not the meta record
        if progress:
            items = track(items, total=meta["count"], description=f"verify {path.name}")
        count, digest = hash_records(items, path)
    if count != meta["count"]:
        raise DataError(f"{path}: meta says {meta['count']} records but {count} are present; {REPACK_HINT}")
    expected = meta.get("checksums", {}).get("records_sha256")
    if digest != expected:
        raise DataError(
            f"{path}: record checksum mismatch (meta {expected}, computed {digest}): "
            f"the data is corrupt; {REPACK_HINT}"
        )
    return {
        "path": str(path),
        "kind": meta["kind"],
        "split": meta["split"],
        "count": count,
        "classes": len(meta.get("classes") or []),
        "records_sha256": digest,
        "ok": True,
    }
