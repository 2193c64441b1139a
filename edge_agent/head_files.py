"""Head files the agent keeps beside the model's: the cached local-only baseline, the personal head and the
compression residual (any of them may be missing or damaged: then it is recomputed or not used)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedge.core.personal import Choice
from fedge.protocol.errors import ArtifactError
from fedge.protocol.manifest import load_head
from fedge.protocol.types import Head

log = logging.getLogger("fedge.agent")

__all__ = ["cached_local_only", "optional_head"]


def cached_local_only(path: Path, like: Head) -> Choice | None:
    """The cached local-only baseline (None: none, unreadable or of another head layout: recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            head = {k: np.asarray(z[k], dtype=np.float32) for k in like}
            epochs, cv = int(z["__epochs"]), z["__cv"]
        if any(head[k].shape != np.shape(v) for k, v in like.items()):
            return None
        return Choice("local", head, epochs, float(cv[0]), float(cv[1]))
    except (OSError, KeyError, ValueError) as exc:
        log.warning("local-only head %s unreadable (%s): recomputed", path, exc)
        return None


def optional_head(path: Path, what: str) -> Head | None:
    """A head file the agent keeps for itself (None: none, or unreadable: not used, and recomputed where it is a
    cache)."""
    if not path.is_file():
        return None
    try:
        return load_head(path)
    except ArtifactError as exc:  # a damaged cache is recomputed
        log.warning("%s %s unreadable (%s): not used", what, path, exc)
        return None
