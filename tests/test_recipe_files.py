"""Reading recipe files: every way a file can be unreadable is one RecipeError naming it.

A recipe that is missing, a directory, unreadable, not UTF-8, too large, not a regular file or
not valid TOML gives one line with the file (and the line where it is known), exit 2, and no
traceback; the same holds for a file named by `extends`.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from hatcli.errors import RecipeError
from hatcli.recipe import load_recipe

GOOD = 'task = "files"\n[model]\nname = "mobilenet_v1"\n'


def error_of(path) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    return str(err.value)


def test_stray_byte_names_the_file_and_its_line(tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(b'task = "files"\n[model]\nname = "mobile\xffnet_v1"\n')
    message = error_of(path)
    assert f"{path}:3" in message and "UTF-8" in message


def test_binary_file_is_a_recipe_error(tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(bytes(range(256)) * 4)
    assert "UTF-8" in error_of(path)


def test_non_utf8_base_names_the_base(tmp_path):
    (tmp_path / "base.toml").write_bytes(b"\n\n# caf\xe9\n")
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n' + GOOD)
    assert f"{(tmp_path / 'base.toml').resolve()}:3" in error_of(child)


def test_non_utf8_recipe_exits_2_without_traceback(hat, tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(b"\xff\xfe" + GOOD.encode("utf-16-le"))
    result = hat("recipe", "validate", path)
    assert result.code == 2
    assert "UnicodeDecodeError" not in result.err and "Traceback" not in result.err
    assert str(path) in result.err


def test_directory_is_a_recipe_error(tmp_path):
    assert f"{tmp_path}" in error_of(tmp_path) and "not a file" in error_of(tmp_path)


def test_missing_file_says_not_found(tmp_path):
    assert "recipe file not found" in error_of(tmp_path / "nope.toml")


def test_missing_base_names_the_file_that_extends_it(tmp_path):
    child = tmp_path / "child.toml"
    child.write_text('extends = "nope.toml"\n' + GOOD)
    message = error_of(child)
    assert "nope.toml" in message and f"{child.resolve()}:1" in message


def test_unreadable_file_is_a_recipe_error(tmp_path, monkeypatch):
    path = tmp_path / "r.toml"
    path.write_text(GOOD)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)  # chmod 0 would not stop root
    monkeypatch.setattr(Path, "read_text", refuse)
    message = error_of(path)
    assert message == f"cannot read recipe {path}: Permission denied"


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "r.toml"
    os.mkfifo(fifo)

    def blocked(*_):
        raise TimeoutError("load_recipe blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(5)
    try:
        assert "not a file" in error_of(fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_huge_file_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "r.toml"
    with path.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    assert "too large" in error_of(path)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('task = "x"\n\n[model\nname = 1\n')
    message = error_of(path)
    assert message.startswith(f"{path}:3: invalid TOML")
    assert "\n" not in message


@pytest.mark.parametrize("depth", [40, 3000, 200_000])
def test_deeply_nested_arrays_are_one_error(tmp_path, depth):
    path = tmp_path / "r.toml"
    path.write_text(GOOD.replace("[model]", f"a = {'[' * depth}{']' * depth}\n[model]"))
    assert "nested" in error_of(path)


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert load_recipe(path).recipe.task == "files"
