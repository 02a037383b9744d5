"""Crash-safe file and folder writes: a reader (or a resume) sees the old complete file or the new one.

A file is renamed into place after an fsync (atomic); a folder replacing another takes two renames, so its
name is briefly absent, never half-written. Details: docs/scale-out.md#files-module.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A hidden temporary folder in ``parent`` with the permissions a plain mkdir would give."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700: results would be private to their writer
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, binary=True) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, binary: bool = False) -> Iterator[IO]:
    """A file written bit by bit (e.g. a stream of CSV rows) under a temporary name beside ``path``: flushed
    to disk and renamed into place when the block ends normally, removed when it raises, so ``path`` holds
    the old complete file or the new one. Text mode: UTF-8, newlines as written (what the csv module wants)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600; a plain open() would honour the umask
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


@contextlib.contextmanager
def crash_safe_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it is moved to ``path`` by ``move_dir_into_place`` (crash-safe, not atomic:
    an existing ``path`` is renamed aside first, so the name is absent for an instant)."""
    path = Path(path)
    tmp = make_temp_dir(path.parent, path.name)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_dir_into_place(tmp, path)


def move_dir_into_place(tmp: Path, path: Path) -> None:
    """Move a complete folder into place; an existing one is renamed aside first, then removed.

    Two renames, not one: crash-safe (``path`` is the old complete folder, absent, or the new complete
    one), not atomic (a reader between the renames finds no ``path``). The parent is fsynced after.
    """
    # The files first: a rename that reaches the disk before their data would name a truncated folder.
    for sub in sorted(tmp.rglob("*")):
        if sub.is_file():
            with open(sub, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
