"""`hat pack verify` and the readers on damaged databases, and what verify prints.

What they pin: a truncated ``data.mdb`` is found from its size before a page is read (LMDB maps
the file, and a page past its end kills the process with SIGBUS): `hat pack verify` and every
reader (what `hat eval` and `hat train` open) exit 1 naming the damaged file. These run in a
child process, so a SIGBUS fails the test instead of killing pytest. Verify prints a readable
line (or `--json`), and its progress bar counts records, not the meta record.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hatcli.data.lmdb_format import open_packed
from hatcli.data.lmdb_writer import LmdbWriter
from hatcli.data.packers.mnist import pack_mnist_split
from hatcli.errors import Interrupted
from test_packers import _StopAfter, _db_items, _mnist_source


def _packed(tmp_path: Path, n: int = 600) -> Path:
    """A classification database of `n` records of 1 KiB each (several hundred pages)."""
    db = tmp_path / "val_lmdb"
    with LmdbWriter(db, "classification", "val", ["a", "b"]) as writer:
        for i in range(n):
            writer.put(i, {"image": os.urandom(1024), "label": i % 2, "name": f"{i:04d}.jpg"})
    return db


def _truncate_to_half(db: Path) -> Path:
    data = db / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    return data


def _in_child(*code_or_args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, timeout=120)


def test_verify_of_a_truncated_database_names_the_file_and_exits_1(tmp_path: Path) -> None:
    data = _truncate_to_half(_packed(tmp_path))
    run = _in_child("-m", "hatcli", "pack", "verify", str(tmp_path / "val_lmdb"))
    assert run.returncode != -signal.SIGBUS, "verify died of SIGBUS"
    assert run.returncode == 1, run.stderr
    assert f"{data} is truncated" in run.stderr and "LMDB header" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


READ_ALL = """
import sys
from hatcli.data.datasets import ClassificationDataset
from hatcli.errors import DataError
try:
    dataset = ClassificationDataset(sys.argv[1])
    for i in range(len(dataset)):
        dataset.reader.get_bytes(i)
except DataError as exc:
    print(exc)
    sys.exit(1)
"""


def test_a_reader_of_a_truncated_database_raises_a_data_error(tmp_path: Path) -> None:
    data = _truncate_to_half(_packed(tmp_path))
    run = _in_child("-c", READ_ALL, str(tmp_path / "val_lmdb"))
    assert run.returncode == 1, (run.returncode, run.stderr[-2000:])
    assert f"{data} is truncated" in run.stdout


def test_an_intact_database_of_the_same_size_class_still_opens(tmp_path: Path) -> None:
    db = _packed(tmp_path)
    assert len(open_packed(db)) == 600 and _in_child("-c", READ_ALL, str(db)).returncode == 0


RESUME = """
import sys
from hatcli.data.packers.mnist import pack_mnist_split
summary = pack_mnist_split(sys.argv[1], sys.argv[2], "train")
print(summary.resumed_items, summary.count)
"""


def test_a_truncated_partial_pack_is_packed_afresh_not_resumed(tmp_path: Path) -> None:
    _mnist_source(tmp_path / "mnist", n_train=2000)
    pack_mnist_split(tmp_path / "mnist", tmp_path / "whole", "train")
    with pytest.raises(Interrupted):
        pack_mnist_split(tmp_path / "mnist", tmp_path / "dst", "train", on_item=_StopAfter(1500))
    _truncate_to_half(tmp_path / "dst" / "train_lmdb.partial")  # a crash of the disk, not of the pack
    run = _in_child("-c", RESUME, str(tmp_path / "mnist"), str(tmp_path / "dst"))
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert run.stdout.split() == ["0", "2000"]
    assert _db_items(tmp_path / "dst" / "train_lmdb") == _db_items(tmp_path / "whole" / "train_lmdb")


def test_verify_prints_a_readable_summary_and_json_on_request(tmp_path: Path, hat) -> None:
    db = _packed(tmp_path)
    result = hat("pack", "verify", db)
    assert result.code == 0
    line = " ".join(result.out.split())
    assert f"ok: {db}: 600 classification records of 2 classes, split `val`; checksum sha256" in line
    assert "{" not in result.out  # not a Python dict
    report = hat("pack", "verify", db, "--json").json()
    assert report["count"] == 600 and report["ok"] is True and report["classes"] == 2


def test_the_verify_bar_counts_records_not_the_meta_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hatcli.progress
    from hatcli.data.lmdb_format import verify_packed

    seen = {}

    def track(items, total, description):
        seen["total"] = total
        seen["advanced"] = 0
        for item in items:
            seen["advanced"] += 1
            yield item

    monkeypatch.setattr(hatcli.progress, "track", track)
    verify_packed(_packed(tmp_path), progress=True)
    assert seen == {"total": 600, "advanced": 600}
