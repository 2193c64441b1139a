"""Files that must survive a crash and stay private: the one atomic write of fedge, fsync, 0700/0600.

``write_atomic`` writes a temporary file in the same folder, fsyncs it, renames it over the target and fsyncs
the folder: a crash leaves the old file or the new one, never a torn one. Folders are 0700 and files 0600
(``private_dir``, ``secure_tree``). Standard library only (hub, agent and devices use it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "PRIVATE_DIR", "PRIVATE_FILE", "PUBLIC_FILE", "atomic_writer", "fsync_dir", "private_dir", "secure_tree",
    "write_atomic",
]

log = logging.getLogger("fedge.fsio")

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
PUBLIC_FILE = 0o644




def private_dir(folder: Path) -> Path:
    """Create ``folder`` if needed, and every missing parent, all 0700; make ``folder`` 0700."""
    missing = [folder, *(p for p in folder.parents if not p.exists())]
    for d in reversed(missing):
        d.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    os.chmod(folder, PRIVATE_DIR)
    return folder


def secure_tree(root: Path) -> None:
    """Make ``root`` and everything below it private: folders 0700, files 0600 (symbolic links are left alone;
    an entry that cannot be changed, e.g. owned by another user, is logged)."""
    private_dir(root)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = os.path.join(folder, name)
            try:
                mode = os.lstat(path).st_mode
                if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                    want = PRIVATE_DIR if stat.S_ISDIR(mode) else PRIVATE_FILE
                    if stat.S_IMODE(mode) != want:
                        os.chmod(path, want)
            except OSError as exc:
                log.warning("cannot make %s private: %s", path, exc)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = PRIVATE_FILE) -> Iterator[BinaryIO]:
    """A file handle whose content replaces ``path`` durably when the block ends without an exception: written to
    a temporary file in the same folder (created ``mode``, 0600 by default), fsynced, renamed over ``path``, the
    folder fsynced. A crash leaves the old file or the new one; an exception leaves the old file and no temporary
    one. Missing parent folders are created private (0700)."""
    if not path.parent.is_dir():
        private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode != PRIVATE_FILE:
                os.fchmod(fh.fileno(), mode)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | memoryview, mode: int = PRIVATE_FILE) -> None:
    """Write ``data`` to ``path`` durably and atomically (:func:`atomic_writer`); the file is 0600 by default."""
    with atomic_writer(path, mode) as fh:
        fh.write(data)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
