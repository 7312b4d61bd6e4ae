"""Writing files and directories so that a crash leaves the old version or the new one, never half.

Every writer in cairn (checkpoints, run files, exports, tokenizers, the token cache) goes through
`write_text` or `atomic_dir`: the content is written beside its final place under a temporary name,
flushed and fsynced, then renamed into place, and the directory entry is fsynced too. Temporary
names start with "." and hold ".tmp-", so `leftovers` finds what a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory, deepest first."""
    for dirpath, _, filenames in os.walk(path, topdown=False):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def temp_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def remove(path: Path) -> None:
    """Delete a file or a directory tree; what is already gone is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block ends without an error, its files are
    fsynced and it takes `path`'s place in one rename. An existing `path` is moved aside first
    and dropped after, so the old one is whole until the new one is. On any error,
    the temporary directory goes and `path` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            old = temp_name(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        remove(tmp)


def leftovers(directory: Path) -> list[Path]:
    """The temporary files and directories a killed writer left in `directory`."""
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]


def restore_leftovers(directory: Path) -> None:
    """Put back an entry that was moved aside for replacement when its replacement never arrived,
    and delete the rest of what a killed writer left. Call it only while no other process writes
    into `directory` (under the run's lock)."""
    for p in leftovers(directory):
        if ".old-" in p.name:
            original = directory / p.name[1:].split(".old-")[0]
            if not original.exists():
                os.replace(p, original)
                continue
        remove(p)
