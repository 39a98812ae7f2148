"""Files written atomically look like files written plainly: same mode, all or nothing."""

from __future__ import annotations


def test_atomically_written_files_and_built_folders_get_the_ordinary_mode(tmp_path):
    """A temp file renamed into place reads like any other file of the run (0644 under umask 022)."""
    import os
    import stat

    from hatcli.atomic import atomic_write_text
    from hatcli.deploy.folders import building

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with building(tmp_path / "artifact", "manifest.json") as folder:
            (folder / "manifest.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "artifact").stat().st_mode) == 0o755
