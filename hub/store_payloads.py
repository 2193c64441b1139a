"""Raw update frames of the open round, outside SQLite: one append-only file per round, deleted when it closes.

The hub keeps every accepted update's frame until its round closes (a restarted hub re-adds them to the aggregate).
In ``hub.sqlite`` a frame cost three writes (the WAL, the checkpoint, and ``secure_delete`` zeroing it when the round
closed: about a second per 10,000 updates of a 10 KB head, on the round's critical path). Here a frame is appended to
``state_dir/updates/round-<id>.bin`` and the ``updates`` row names its offset and length; the file is fsynced before
the transaction naming it commits (:meth:`PayloadFiles.sync` is a before-commit hook of the store), and the whole
file is deleted once its round is closed: no frame of a closed round stays in the state folder, as before (their
bytes were never scrubbed from the disk blocks under the WAL either). Files 0600 in a 0700 folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO, Final

from fedge.protocol.fsio import PRIVATE_FILE, fsync_dir, private_dir

__all__ = ["PayloadFiles"]

_NAME: Final = re.compile(r"^round-([0-9]+)\.bin$")
BUFFER: Final = 1 << 20
"""Bytes of frames buffered in memory between syncs (a batch's frames go out in a few large writes)."""


class PayloadFiles:
    """Append-only frame files per round in ``folder`` (created 0700 on first use). Not thread-safe: the store
    calls it under its lock."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._open: dict[int, BinaryIO] = {}
        self._ends: dict[int, int] = {}  # the size of each open file, written and buffered
        self._dirty: set[int] = set()

    def path(self, rid: int) -> Path:
        return self.folder / f"round-{int(rid)}.bin"

    def append(self, rid: int, payload: bytes) -> tuple[int, int]:
        """Append ``payload`` to round ``rid``'s file: ``(offset, length)``; durable after :meth:`sync`."""
        fh = self._open.get(rid)
        if fh is None:
            private_dir(self.folder)
            path = self.path(rid)
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
            fh = self._open[rid] = os.fdopen(fd, "ab", buffering=BUFFER)  # written out at sync, not per frame
            self._ends[rid] = os.fstat(fd).st_size
            if created:
                fsync_dir(self.folder)  # the file's name is durable before any row names it
        offset = self._ends[rid]
        fh.write(payload)
        self._ends[rid] = offset + len(payload)
        self._dirty.add(rid)
        return offset, len(payload)

    def sync(self) -> None:
        """Flush and fsync every file appended to since the last sync (before the commit naming the frames)."""
        for rid in sorted(self._dirty):
            fh = self._open[rid]
            fh.flush()
            os.fsync(fh.fileno())
        self._dirty.clear()

    def read(self, rid: int, offset: int, length: int) -> bytes | None:
        """The frame at ``offset`` in round ``rid``'s file, or None when the file does not hold it."""
        fh = self._open.get(rid)
        if fh is not None:
            fh.flush()
        try:
            fd = os.open(self.path(rid), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        return data if len(data) == length else None

    def rounds(self) -> set[int]:
        """Rounds that have a frame file."""
        if not self.folder.is_dir():
            return set()
        return {int(m.group(1)) for p in self.folder.iterdir() if (m := _NAME.match(p.name))}

    def drop(self, rids: set[int]) -> None:
        """Delete the frame files of rounds ``rids`` (closed rounds)."""
        for rid in sorted(rids):
            fh = self._open.pop(rid, None)
            self._ends.pop(rid, None)
            self._dirty.discard(rid)
            if fh is not None:
                fh.close()
            self.path(rid).unlink(missing_ok=True)
        if rids and self.folder.is_dir():
            fsync_dir(self.folder)

    def close(self) -> None:
        for fh in self._open.values():
            fh.close()
        self._open.clear()
        self._ends.clear()
        self._dirty.clear()
