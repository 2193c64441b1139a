"""What the agent remembers across restarts: ``state_dir/state.json``, written atomically.

Fields: ``last_completed_round`` (an announce for a round at or below it is stale), ``model_version``
(the global version the device holds), ``versions`` (version -> backbone sha256 of the heads stored
under ``heads/``), ``last_reject`` (the hub's last Reject: round, reason, detail, ts).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("fedge.agent")

MAX_VERSIONS = 16
"""Heads kept on disk (the oldest beyond this are pruned)."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class AgentState:
    """What an agent remembers across restarts (``state.json``): the last round it completed, the model versions
    it holds, the last reject. ``save`` writes atomically, so a crash leaves the previous state or the new one."""

    path: Path
    last_completed_round: int = 0
    model_version: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    last_reject: dict[str, Any] | None = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @classmethod
    def load(cls, path: Path) -> AgentState:
        """Read ``state.json``; a missing or unreadable file starts from scratch (with a warning)."""
        state = cls(path)
        if not path.exists():
            return state
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            last = obj.get("last_completed_round", 0)
            state.last_completed_round = last if isinstance(last, int) and not isinstance(last, bool) else 0
            version = obj.get("model_version")
            state.model_version = version if isinstance(version, str) else None
            versions = obj.get("versions", {})
            if isinstance(versions, dict):
                state.versions = {str(k): str(v) for k, v in versions.items()}
            reject = obj.get("last_reject")
            state.last_reject = reject if isinstance(reject, dict) else None
        except (OSError, ValueError) as exc:
            log.warning("state file %s unreadable (%s); starting from scratch", path, exc)
            return cls(path)
        return state

    def to_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "last_completed_round": self.last_completed_round,
                "model_version": self.model_version,
                "versions": dict(self.versions),
                "last_reject": self.last_reject,
            }

    def save(self) -> None:
        with self.lock:
            write_atomic(self.path, (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode())

    def add_version(self, version: str, backbone_sha256: str) -> list[str]:
        """Remember a head version; returns the versions pruned (their files should be deleted)."""
        with self.lock:
            self.versions.pop(version, None)
            self.versions[version] = backbone_sha256
            pruned: list[str] = []
            while len(self.versions) > MAX_VERSIONS:
                oldest = next(iter(self.versions))
                if oldest == self.model_version:
                    self.versions[oldest] = self.versions.pop(oldest)  # keep the held one: move it to the end
                    oldest = next(iter(self.versions))
                del self.versions[oldest]
                pruned.append(oldest)
            return pruned


__all__ = ["MAX_VERSIONS", "AgentState", "write_atomic"]
