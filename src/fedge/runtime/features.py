"""Cache of backbone features, keyed on (local data sha256, backbone sha256): in memory and on disk.

Entries live at ``root/<backbone_sha256[:16]>/<data_sha256[:16]>.npy``; they are written
atomically (``fsio.atomic_writer``), off the round's critical path in a writer thread, and a file
that cannot be read back as ``float32 [N, F]`` (``[N, H, W, C]``: the cut before a conv head) with the right
``N`` is recomputed and overwritten. The last entry used is also kept in memory, so a long-running agent reads
the disk only after a restart.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedge.core.trainer import Trainer
from fedge.protocol.fsio import atomic_writer

log = logging.getLogger("fedge.agent")

__all__ = ["FeatureCache"]


def _key(sha: str, what: str) -> str:
    k = sha.strip().lower()[:16]
    if len(k) < 16 or any(c not in "0123456789abcdef" for c in k):
        raise ValueError(f"{what} must be a hex sha256, got {sha!r}")
    return k


class FeatureCache:
    """Backbone features of the local data on disk, keyed on (data sha256, backbone sha256).

    ``get`` returns features equal to ``trainer.features(x)``: a missing, truncated or corrupt entry is
    recomputed and rewritten (atomically), so a crash mid-write never serves bad features. A new backbone
    or new data never reuses old features.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._memo: tuple[Path, NDArray[np.float32]] | None = None
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()  # get() runs on the agent's worker, flush() also from stop()

    def path(self, data_sha256: str, backbone_sha256: str) -> Path:
        return self.root / _key(backbone_sha256, "backbone_sha256") / f"{_key(data_sha256, 'data_sha256')}.npy"

    def _load(self, path: Path, rows: int) -> NDArray[np.float32] | None:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim not in (2, 4) or arr.shape[0] != rows:
            return None
        if not np.isfinite(arr).all():
            return None
        return arr

    def _store(self, path: Path, feats: NDArray[np.float32]) -> None:
        with atomic_writer(path) as fh:
            np.save(fh, feats, allow_pickle=False)

    def get(
        self, trainer: Trainer, x: NDArray[np.float32], data_sha256: str, backbone_sha256: str
    ) -> NDArray[np.float32]:
        """Cached features of ``x`` (computed with ``trainer.features`` and stored on a miss)."""
        path = self.path(data_sha256, backbone_sha256)
        if self._memo is not None and self._memo[0] == path and self._memo[1].shape[0] == x.shape[0]:
            return self._memo[1]
        self.flush()
        hit = self._load(path, x.shape[0]) if path.is_file() else None
        if hit is None:
            hit = np.ascontiguousarray(trainer.features(x), dtype=np.float32)
            hit.setflags(write=False)  # shared with the writer thread and later rounds
            writer = threading.Thread(target=self._store_logged, args=(path, hit), name="fedge-feature-cache")
            with self._lock:
                self._writer = writer
            writer.start()
        else:
            hit.setflags(write=False)
        self._memo = (path, hit)
        return hit

    def flush(self) -> None:
        """Wait until the last computed entry is on disk (``get`` never waits for the disk otherwise)."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()

    def _store_logged(self, path: Path, feats: NDArray[np.float32]) -> None:
        try:
            self._store(path, feats)
        except OSError as exc:  # disk full, read-only: the features stay in memory, the next process recomputes
            log.warning("feature cache: could not write %s: %s", path, exc)
