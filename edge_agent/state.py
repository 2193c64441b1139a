"""What the agent remembers across restarts: ``state_dir/state.json``, written atomically.

Fields: ``last_completed_round`` (an announce for a round at or below it is stale), ``buffered_version`` and
``buffered_attempt`` (in a buffered round: the model version and ``buffer_attempt`` its update was trained on),
``buffered_ahead`` and ``buffered_ahead_attempt`` (the newer version and attempt the round was announced on when
that update went out; a state file without the attempts reads them as 0), ``model_version``
(the global version the device holds), ``versions`` (version -> backbone sha256 of the heads stored
under ``heads/``), ``backbones`` (installed backbones, oldest first), ``last_reject`` (the hub's last
Reject: round, reason, detail, ts).

The state directory is private: folders 0700, files 0600 (:func:`secure_tree` at start-up, :func:`write_atomic`
for every file the agent writes); a file is fsynced, and its folder after the rename, before anything that
points at it is written.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.protocol.fsio import PRIVATE_DIR, PRIVATE_FILE, fsync_dir, private_dir, secure_tree, write_atomic

log = logging.getLogger("fedge.agent")

MAX_VERSIONS = 2
"""Heads kept on disk: the current one and the previous one (older ones are pruned)."""
MAX_BACKBONES = 2
"""Backbones kept installed besides those of the kept heads: the newest and the one before it."""


def _count(value: Any) -> int:
    """A stored count: a non-negative int, else 0 (absent in a state file written before it existed)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


@dataclass
class AgentState:
    """What an agent remembers across restarts (``state.json``): the last round it completed, the model versions
    it holds, the last reject. ``save`` writes atomically, so a crash leaves the previous state or the new one."""

    path: Path
    last_completed_round: int = 0
    buffered_version: str | None = None  # the model version of its update in buffered round last_completed_round
    buffered_attempt: int = 0  # the announce's buffer_attempt that update was trained on
    buffered_ahead: str | None = None  # the newer version that round was announced on when that update was sent
    buffered_ahead_attempt: int = 0  # and that announce's buffer_attempt
    model_version: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    backbones: list[str] = field(default_factory=list)
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
            buffered = obj.get("buffered_version")
            state.buffered_version = buffered if isinstance(buffered, str) else None
            state.buffered_attempt = _count(obj.get("buffered_attempt"))
            ahead = obj.get("buffered_ahead")
            state.buffered_ahead = ahead if isinstance(ahead, str) else None
            state.buffered_ahead_attempt = _count(obj.get("buffered_ahead_attempt"))
            version = obj.get("model_version")
            state.model_version = version if isinstance(version, str) else None
            versions = obj.get("versions", {})
            if isinstance(versions, dict):
                state.versions = {str(k): str(v) for k, v in versions.items()}
            backbones = obj.get("backbones", [])
            if isinstance(backbones, list):
                state.backbones = [str(b) for b in backbones]
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
                "buffered_version": self.buffered_version,
                "buffered_attempt": self.buffered_attempt,
                "buffered_ahead": self.buffered_ahead,
                "buffered_ahead_attempt": self.buffered_ahead_attempt,
                "model_version": self.model_version,
                "versions": dict(self.versions),
                "backbones": list(self.backbones),
                "last_reject": self.last_reject,
            }

    def save(self) -> None:
        with self.lock:
            write_atomic(self.path, (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode())

    def add_version(self, version: str, backbone_sha256: str) -> list[str]:
        """Remember a head version; returns the versions pruned (their files should be deleted): only the
        newest :data:`MAX_VERSIONS` are kept, the held one (``model_version``) always among them."""
        with self.lock:
            self.versions.pop(version, None)
            self.versions[version] = backbone_sha256
            pruned: list[str] = []
            while len(self.versions) > MAX_VERSIONS:
                oldest = next(v for v in self.versions if v != self.model_version)
                del self.versions[oldest]
                pruned.append(oldest)
            return pruned

    def add_backbone(self, backbone_sha256: str) -> None:
        """Remember that a backbone was installed: the :data:`MAX_BACKBONES` newest are remembered, newest last."""
        with self.lock:
            if backbone_sha256 in self.backbones:
                self.backbones.remove(backbone_sha256)
            self.backbones = [*self.backbones, backbone_sha256][-MAX_BACKBONES:]

    def backbones_to_keep(self) -> set[str]:
        """The backbones of the kept heads and the newest installed ones."""
        with self.lock:
            return set(self.versions.values()) | set(self.backbones)


__all__ = [
    "MAX_BACKBONES", "MAX_VERSIONS", "PRIVATE_DIR", "PRIVATE_FILE", "AgentState", "fsync_dir", "private_dir",
    "secure_tree", "write_atomic",
]
