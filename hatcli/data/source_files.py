"""Reading a raw dataset's files safely: which files a packer opens, how much of them, and their names.

- Only regular files are read: a FIFO, a device (a symlink to ``/dev/zero``) or a folder is
  refused from `os.stat`, before it is opened, so a read can neither block nor run forever.
- A file larger than ``max_bytes`` is refused from its size, before it is read; an image with
  more than ``max_pixels`` pixels is refused from its header, before it is decoded.
- A file whose real path (symlinks resolved) lies outside the source folder is refused unless
  ``follow_symlinks``.
- File names are bytes on POSIX. A name that is not valid UTF-8 is kept losslessly in a record's
  ``name_bytes`` and shown with ``\\xNN`` escapes where text is needed (`name_fields`, `display_name`).

Each refusal is a reason string for the rejected list; nothing here raises for a bad file.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatcli.errors import UsageError
from hatcli.family import PackRequest

IMAGE_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
DEFAULT_MAX_BYTES: int = PackRequest.max_bytes
DEFAULT_MAX_PIXELS: int = PackRequest.max_pixels


def display_name(name: str | os.PathLike[str]) -> str:
    """`name` as valid text: bytes that are not UTF-8 become ``\\xNN`` escapes (for messages, JSON, labels)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def name_fields(name: str) -> dict[str, Any]:
    """The record fields that store the file name `name`: ``name``, plus ``name_bytes`` when it is not UTF-8.

    ``name`` is always text (`display_name`); ``name_bytes`` holds the file system's exact bytes,
    so no name is ever lost or merged with another. UTF-8 names are stored as ``name`` alone.
    """
    raw = os.fsencode(name)
    try:
        return {"name": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"name": raw.decode("utf-8", "backslashreplace"), "name_bytes": raw}


def is_inside(path: str, root: str) -> bool:
    """Whether the real path `path` lies in the real folder `root` (both already resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def symlink_problem(path: str | os.PathLike[str], root: str) -> str | None:
    """Why `path` may not be read without ``--follow-symlinks`` (it resolves outside `root`), or None."""
    real = os.path.realpath(path)
    if is_inside(real, root):
        return None
    return (f"it resolves (through a symlink) to {display_name(real)}, outside the source folder "
            f"{display_name(root)}; pass --follow-symlinks to pack it")


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


@dataclass(frozen=True)
class SourceReader:
    """Reads a source folder's files within the limits (picklable: it travels to the pack workers)."""

    root: str
    """The source folder, resolved (`os.path.realpath`)."""
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    follow_symlinks: bool = False

    def __post_init__(self) -> None:
        for option, value in (("--max-bytes", self.max_bytes), ("--max-pixels", self.max_pixels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{option} must be a positive whole number, got {value!r}")

    @classmethod
    def for_folder(cls, root: str | Path, request: PackRequest | None = None) -> SourceReader:
        """A reader of `root` with the limits of `request` (the defaults without one)."""
        request = request or PackRequest(kind="", target_data_dir=Path())
        return cls(os.path.realpath(root), request.max_bytes, request.max_pixels, request.follow_symlinks)

    def options(self) -> list[Any]:
        """What a resumed pack must share with the first (the limits change what is rejected)."""
        return [self.max_bytes, self.max_pixels, self.follow_symlinks]

    def read(self, path: str | os.PathLike[str]) -> tuple[bytes | None, str | None]:
        """Read a whole source file: ``(data, None)``, or ``(None, reason)`` when it is refused."""
        try:
            st = os.stat(path)
        except OSError as exc:
            return None, f"cannot read the file: {exc.strerror or exc}"
        if not stat.S_ISREG(st.st_mode):
            return None, f"{_file_type(st.st_mode)}, not a regular file: only regular files are read"
        if not self.follow_symlinks:
            problem = symlink_problem(path, self.root)
            if problem is not None:
                return None, problem
        if st.st_size > self.max_bytes:
            return None, self._too_big(st.st_size)
        try:
            # O_NONBLOCK: should the file have become a FIFO since the stat, opening it cannot hang.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            return None, f"cannot read the file: {exc.strerror or exc}"
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None, "not a regular file: only regular files are read"
            try:
                data = handle.read(self.max_bytes + 1)
            except OSError as exc:
                return None, f"cannot read the file: {exc.strerror or exc}"
        if len(data) > self.max_bytes:
            return None, self._too_big(len(data))
        return data, None

    def _too_big(self, size: int) -> str:
        return f"the file holds {size:,} bytes, more than --max-bytes {self.max_bytes:,}"

    def check_image(self, data: bytes) -> tuple[str | None, tuple[int, int] | None]:
        """Validate encoded image bytes the way the readers will decode them.

        Returns ``(reason, None)`` for a bad image (empty, not JPEG/PNG, over the pixel limit,
        truncated, undecodable) and ``(None, (height, width))`` for a good one. The pixel limit is
        checked from the header, before the image is decoded.
        """
        if not data:
            return "empty file", None
        kind = next((k for magic, k in IMAGE_MAGIC.items() if data.startswith(magic)), None)
        if kind is None:
            return "not a JPEG or PNG file", None
        size = header_size(data, kind)
        if size is not None and size[0] * size[1] > self.max_pixels:
            return (f"the image is {size[0]}x{size[1]} (WxH), {size[0] * size[1]:,} pixels, more than "
                    f"--max-pixels {self.max_pixels:,}"), None
        import torch
        from torchvision.io import ImageReadMode, decode_image

        try:
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            return f"cannot decode the image (truncated or corrupt): {detail[-160:]}", None
        return None, (int(image.shape[-2]), int(image.shape[-1]))


def header_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) read from a JPEG or PNG header without decoding the pixels; None when unreadable."""
    from PIL import JpegImagePlugin, PngImagePlugin

    # The plugin classes read only the header, and unlike `Image.open` apply no global pixel limit.
    opener = JpegImagePlugin.JpegImageFile if kind == "JPEG" else PngImagePlugin.PngImageFile
    try:
        with opener(io.BytesIO(data)) as image:
            return int(image.size[0]), int(image.size[1])
    except Exception:  # PIL's plugins raise many unrelated types on a bad header; the decoder names it
        return None
