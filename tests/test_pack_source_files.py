"""What `hat pack` agrees to read: regular files within limits, inside the source folder.

What they pin: a FIFO or a symlink to ``/dev/zero`` is refused from its type, before it is opened
(a FIFO would block the read, ``/dev/zero`` never ends); a file over ``--max-bytes`` is refused
from its size and an image over ``--max-pixels`` from its header, before it is decoded; a symlink
that leaves the source folder (an image, or a whole class folder) is refused unless
``--follow-symlinks``; an empty class folder is a warning, and an error under ``--strict``. Each
refused file is listed with its reason.

The reads that would hang or eat memory if they were attempted run in a child process, with a
time limit and an address-space limit, so a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hatcli.data.lmdb_format import open_packed
from hatcli.data.packers.coco import pack_coco_split
from hatcli.data.packers.imagenet import pack_imagenet_split
from hatcli.errors import DataError
from hatcli.family import PackRequest
from test_packers import _class_tree, _coco_source, _image_bytes, _pack_coco

GUARDED_PACK = """
import json, resource, sys
import torch, torchvision.io  # imported before the limit: only what the pack reads counts against it
from hatcli.data.packers.imagenet import pack_imagenet_split
from hatcli.family import PackRequest
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
request = PackRequest(kind="imagenet", target_data_dir=sys.argv[2], **json.loads(sys.argv[3]))
summary, _ = pack_imagenet_split(sys.argv[1], sys.argv[2], "train", workers=0, request=request)
print(json.dumps(summary.rejected_file.read_text().splitlines()))
"""


def _guarded_pack(src: Path, dst: Path, **options: object) -> dict[str, str]:
    """Pack `src` in a child process (60 s, 1 GiB more memory at most); {file name: reason} of the rejects."""
    run = subprocess.run([sys.executable, "-c", GUARDED_PACK, str(src), str(dst), json.dumps(options)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    return {Path(e["source"]).name: e["reason"] for e in map(json.loads, json.loads(run.stdout.splitlines()[-1]))}


def _huge_jpeg(width: int, height: int) -> bytes:
    """A small JPEG whose header (SOF0) claims `width` x `height` pixels."""
    data = bytearray(_image_bytes(5))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.fixture
def special_files(tmp_path: Path) -> Path:
    """The class tree plus a FIFO, a symlink to /dev/zero, a 20000x20000 JPEG header and a 65 MiB file."""
    src = _class_tree(tmp_path / "src")
    os.mkfifo(src / "train" / "cat" / "fifo.jpg")
    (src / "train" / "cat" / "zero.jpg").symlink_to("/dev/zero")
    (src / "train" / "dog" / "huge.jpg").write_bytes(_huge_jpeg(20000, 20000))
    with open(src / "train" / "dog" / "big.jpg", "wb") as handle:  # sparse: costs no disk
        handle.write(_image_bytes(6))
        handle.truncate(65 << 20)
    return src


def test_fifos_devices_huge_files_and_huge_images_are_refused_before_reading(special_files: Path,
                                                                             tmp_path: Path) -> None:
    reasons = _guarded_pack(special_files, tmp_path / "dst", follow_symlinks=True)
    assert reasons.keys() == {"fifo.jpg", "zero.jpg", "huge.jpg", "big.jpg"}
    assert "a FIFO, not a regular file" in reasons["fifo.jpg"]
    assert "a character device, not a regular file" in reasons["zero.jpg"]
    assert "20000x20000 (WxH), 400,000,000 pixels, more than --max-pixels 89,478,485" in reasons["huge.jpg"]
    assert "68,157,440 bytes, more than --max-bytes 67,108,864" in reasons["big.jpg"]
    assert open_packed(tmp_path / "dst" / "train_lmdb").meta["count"] == 18


def test_the_limits_are_options(special_files: Path, tmp_path: Path) -> None:
    reasons = _guarded_pack(special_files, tmp_path / "dst", max_bytes=100 << 20, max_pixels=400,
                            follow_symlinks=True)
    assert "20x24 (WxH), 480 pixels, more than --max-pixels 400" in reasons["00.png"]  # every image is 20x24
    assert "more than --max-pixels 400" in reasons["big.jpg"]  # read: it is within the larger --max-bytes


def test_max_bytes_and_max_pixels_on_the_command_line(tmp_path: Path, hat) -> None:
    src = _class_tree(tmp_path / "src", per_class=2)
    result = hat("pack", "imagenet", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst",
                 "--split", "train", "--max-bytes", "700", "--max-pixels", "1000", "--workers", "0", "--json")
    assert result.code == 0, result.err
    listed = [json.loads(line) for line in (tmp_path / "dst" / "train_lmdb.rejected.jsonl").read_text().splitlines()]
    assert any("--max-bytes 700" in e["reason"] for e in listed)
    assert hat("pack", "imagenet", "--src-data-dir", src, "--target-data-dir", tmp_path / "x",
               "--max-bytes", "0").code == 2


def test_without_follow_symlinks_a_device_is_still_refused_as_a_device(special_files: Path, tmp_path: Path) -> None:
    reasons = _guarded_pack(special_files, tmp_path / "dst")
    assert "a FIFO" in reasons["fifo.jpg"]
    assert "a character device" in reasons["zero.jpg"]  # not "pass --follow-symlinks": that would not help


def test_an_image_symlinked_from_outside_the_source_is_refused_unless_followed(tmp_path: Path) -> None:
    src = _class_tree(tmp_path / "src")
    (tmp_path / "elsewhere.jpg").write_bytes(_image_bytes(40))
    (src / "train" / "cat" / "outside.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    (src / "train" / "cat" / "inside.jpg").symlink_to(src / "train" / "dog" / "01.jpg")  # stays in the folder
    summary, _ = pack_imagenet_split(src, tmp_path / "dst", "train", workers=0)
    listed = [json.loads(line) for line in summary.rejected_file.read_text().splitlines()]
    assert summary.count == 19 and [Path(e["source"]).name for e in listed] == ["outside.jpg"]
    assert "elsewhere.jpg, outside the source folder" in listed[0]["reason"]
    followed, _ = pack_imagenet_split(src, tmp_path / "followed", "train", workers=0,
                                      request=PackRequest(kind="imagenet", target_data_dir=tmp_path,
                                                          follow_symlinks=True))
    assert followed.count == 20 and followed.rejected == 0


def test_a_class_folder_symlinked_from_outside_is_refused_unless_followed(tmp_path: Path, hat) -> None:
    src = _class_tree(tmp_path / "src")
    (tmp_path / "birds").mkdir()
    (tmp_path / "birds" / "00.jpg").write_bytes(_image_bytes(41))
    (src / "train" / "bird").symlink_to(tmp_path / "birds", target_is_directory=True)
    with pytest.raises(DataError, match=r"class folder .*bird: .*outside the source folder.*--follow-symlinks"):
        pack_imagenet_split(src, tmp_path / "dst", "train", workers=0)
    result = hat("pack", "imagenet", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst", "--split", "train")
    assert result.code == 1 and "--follow-symlinks" in result.err
    result = hat("pack", "imagenet", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst", "--split", "train",
                 "--follow-symlinks", "--json")
    assert result.code == 0, result.err
    assert open_packed(tmp_path / "dst" / "train_lmdb").meta["classes"] == ["bird", "cat", "dog", "fish"]


def test_a_coco_image_symlinked_from_outside_the_image_folder_is_refused(tmp_path: Path) -> None:
    src = _coco_source(tmp_path / "src")
    target = src / "val2017" / "001.jpg"
    (tmp_path / "real.jpg").write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(tmp_path / "real.jpg")
    summary = _pack_coco(src, tmp_path / "dst")
    listed = [json.loads(line) for line in summary.rejected_file.read_text().splitlines()]
    assert summary.count == 3 and len(listed) == 1 and listed[0]["image_id"] == 101
    assert "outside the source folder" in listed[0]["reason"]
    followed = pack_coco_split(src / "annotations" / "instances_val2017.json", src / "val2017", tmp_path / "f", "val",
                               request=PackRequest(kind="coco", target_data_dir=tmp_path, follow_symlinks=True))
    assert followed.count == 4


def test_an_empty_class_folder_is_a_warning_and_an_error_under_strict(tmp_path: Path, hat) -> None:
    src = _class_tree(tmp_path / "src")
    (src / "train" / "empty").mkdir()
    (src / "train" / "empty" / "readme.txt").write_text("no images here")
    result = hat("pack", "imagenet", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst", "--split", "train",
                 "--json")
    assert result.code == 0, result.err
    warnings = result.json()["warnings"]
    assert len(warnings) == 1 and "empty" in warnings[0] and "class `empty` (label 2) gets no records" in warnings[0]
    result = hat("pack", "imagenet", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst2", "--split", "train")
    assert result.code == 0 and "warning" in result.err and "class `empty`" in result.err
    result = hat("pack", "imagenet", "--src-data-dir", src, "--target-data-dir", tmp_path / "dst3", "--split", "train",
                 "--strict")
    assert result.code == 1 and "gets no records" in result.err and "--strict" in result.err
    assert not (tmp_path / "dst3" / "train_lmdb").exists()
