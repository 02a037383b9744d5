"""Atomic writes: old content or new content, never a mix; permissions as a plain write would give."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from qlora_cls.files import crash_safe_dir, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_and_folders_honour_the_umask(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.json", "{}\n")
    with crash_safe_dir(tmp_path / "adapter") as tmp:
        (tmp / "w.bin").write_bytes(b"x")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old\n")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # the data was written to the temporary file, not synced
    with pytest.raises(OSError):
        atomic_write_text(target, "new, longer content\n")
    monkeypatch.undo()
    with pytest.raises(RuntimeError):
        with crash_safe_dir(tmp_path / "adapter") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed mid-save")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_folder_data_reaches_the_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    """fsync order: the folder's files, then (after the rename) the parent folder that holds the new name."""
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), (tmp_path / "adapter").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    (tmp_path / "adapter").mkdir()  # an older folder of the same name is replaced
    with crash_safe_dir(tmp_path / "adapter") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"x")
    names = [(Path(p).name, exists) for p, exists in synced]
    assert names[0][0] == "w.bin" and names[-1] == (tmp_path.name, True)  # the parent, once the new name exists
    assert (tmp_path / "adapter" / "sub" / "w.bin").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
