"""Model versions: ``v0, v1, ...`` — a head over a backbone, with lineage and score.

Files: ``state_dir/models/<version>/head.npz`` and one artifacts folder per backbone under
``state_dir/backbones/<sha[:16]>/``. Metadata and the current-version pointer live in the store. Every file
is 0600 in 0700 folders and fsynced (with its folders) before the store commits a row that names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.hub.store import Store, VersionRow
from fedge.protocol.errors import ArtifactError
from fedge.protocol.fsio import PRIVATE_FILE, fsync_dir, private_dir, secure_tree
from fedge.protocol.manifest import MANIFEST_FILE, Manifest, head_order, load_head, save_head, verify_artifacts
from fedge.protocol.messages import ModelFull, ModelHead

CURRENT = "current_version"


def head_sha256(head: Mapping[str, NDArray[Any]]) -> str:
    """sha256 over the head's names, shapes and float32 LE bytes, in head order."""
    h = hashlib.sha256()
    for name in head_order(head):
        arr = np.ascontiguousarray(np.asarray(head[name], dtype="<f4"))
        h.update(f"{name}:{list(arr.shape)};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (deepest first)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


class Registry:
    """Every model version of a fleet: backbones (exported artifacts, verified by hash) and heads.

    Versions are never overwritten: each aggregation writes a new head file (atomically) and a new row naming
    its parent and round; ``current()`` is the version devices get; ``rollback`` deploys an older one's head
    again, as a new version.
    ``w0`` is a backbone's source head (the proximal anchor).
    """

    def __init__(self, store: Store, state_dir: Path) -> None:
        self.store = store
        self.state_dir = state_dir
        self.models_dir = state_dir / "models"
        self.backbones_dir = state_dir / "backbones"
        secure_tree(state_dir)  # folders 0700, files 0600 (also what an older hub left behind)

    # backbones
    def backbone_dir(self, sha256: str) -> Path:
        return self.backbones_dir / sha256[:16]

    def manifest(self, sha256: str) -> Manifest:
        return verify_artifacts(self.backbone_dir(sha256))

    def has_backbone(self, sha256: str) -> bool:
        return self.store.backbone_path(sha256) is not None and (self.backbone_dir(sha256) / MANIFEST_FILE).is_file()

    def import_artifacts(self, artifacts: Path, *, parent: str | None = None) -> VersionRow:
        """Copy an exported artifacts folder in as a backbone and register its head as a new version."""
        sha, head = self.add_backbone(artifacts)
        return self.add_version(head, parent=parent, round_id=None, backbone_sha256=sha)

    def add_backbone(self, artifacts: Path) -> tuple[str, dict[str, NDArray[np.float32]]]:
        """Verify an exported artifacts folder and copy it in as a backbone (no version): its sha256 and head."""
        manifest = verify_artifacts(artifacts)
        head = load_head(artifacts)
        self._check_head(head, manifest)
        sha = manifest.backbone_sha256
        target = self.backbone_dir(sha)
        if not (target / MANIFEST_FILE).is_file():
            private_dir(self.backbones_dir)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=self.backbones_dir))
            try:
                shutil.copytree(artifacts, tmp, dirs_exist_ok=True)
                secure_tree(tmp)
                verify_artifacts(tmp)
                _fsync_tree(tmp)
                if target.exists():
                    shutil.rmtree(target)
                tmp.rename(target)
                fsync_dir(self.backbones_dir)  # durable before the store records it
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.store.add_backbone(sha, str(target))
        return sha, head

    @staticmethod
    def _check_head(head: Mapping[str, NDArray[Any]], manifest: Manifest) -> None:
        spec = {p.name: p.shape for p in manifest.head}
        got = {name: tuple(arr.shape) for name, arr in head.items()}
        if got != spec:
            raise ArtifactError(f"head.npz {got} does not match the manifest's head {spec}")

    # versions
    def write_head(self, head: Mapping[str, NDArray[Any]], *, parent: str | None, round_id: int | None,
                   backbone_sha256: str, accuracy: float | None = None, loss: float | None = None) -> VersionRow:
        """Write the next version's head file; the caller records the returned row in the store."""
        idx = self.store.next_version_idx()
        version = f"v{idx}"
        folder = private_dir(self.models_dir / version)
        save_head(folder / "head.npz", head, mode=PRIVATE_FILE)  # fsyncs the file and its folder
        fsync_dir(self.models_dir)  # the version's folder too: all durable before a commit names it
        return VersionRow(version, idx, head_sha256(head), parent, round_id, backbone_sha256, accuracy, loss,
                          time.time())

    def add_version(self, head: Mapping[str, NDArray[Any]], *, parent: str | None, round_id: int | None,
                    backbone_sha256: str, accuracy: float | None = None, loss: float | None = None,
                    make_current: bool = True) -> VersionRow:
        """Write the head file, then record the version (and make it current) in one transaction."""
        row = self.write_head(head, parent=parent, round_id=round_id, backbone_sha256=backbone_sha256,
                              accuracy=accuracy, loss=loss)
        self.store.add_version(row, make_current=make_current)
        return row

    def load_head(self, version: str) -> dict[str, NDArray[np.float32]]:
        head = load_head(self.models_dir / version / "head.npz")
        row = self.store.version(version)
        if row is not None and head_sha256(head) != row.sha256:
            raise ArtifactError(f"model {version}: head.npz does not match its recorded sha256")
        return head

    def current(self) -> VersionRow | None:
        name = self.store.get_meta(CURRENT)
        return None if name is None else self.store.version(name)

    def w0(self, backbone_sha256: str) -> dict[str, NDArray[np.float32]]:
        """The source head of a backbone: its first registered version."""
        row = self.store.first_version_of(backbone_sha256)
        if row is None:
            raise ArtifactError(f"no version registered for backbone {backbone_sha256[:16]}")
        return self.load_head(row.version)

    def make_current(self, version: str) -> VersionRow:
        """Deploy a version registered but held back (a gate's candidate, newer than the deployed one)."""
        row = self.store.version(version)
        if row is None:
            raise ArtifactError(f"unknown model version {version!r}")
        self.store.set_meta(CURRENT, version)
        return row

    def rollback(self, version: str) -> VersionRow:
        """Deploy ``version``'s head again as a NEW version (its copy, parent the current one): versions only
        move forward, so devices that refuse replayed older versions (signed fleets) take it."""
        row = self.store.version(version)
        if row is None:
            known = ", ".join(v.version for v in self.store.versions())
            raise ArtifactError(f"unknown model version {version!r}; known: {known}")
        cur = self.current()
        return self.add_version(self.load_head(version), parent=None if cur is None else cur.version, round_id=None,
                                backbone_sha256=row.backbone_sha256, accuracy=row.accuracy, loss=row.loss)

    # messages
    def model_head(self, fleet: str, row: VersionRow) -> ModelHead:
        return ModelHead(fleet=fleet, version=row.version, parent=row.parent, backbone_sha256=row.backbone_sha256,
                         round=row.round, head=dict(self.load_head(row.version)))

    def model_full(self, fleet: str, backbone_sha256: str) -> ModelFull:
        """Manifest text plus every file it lists, as uint8 arrays keyed by relative path."""
        folder = self.backbone_dir(backbone_sha256)
        verify_artifacts(folder)
        text = (folder / MANIFEST_FILE).read_text(encoding="utf-8")
        listed = json.loads(text)["files"]
        files = {name: np.fromfile(folder / name, dtype=np.uint8) for name in sorted(listed)}
        return ModelFull(fleet=fleet, backbone_sha256=backbone_sha256, manifest=text, files=dict(files))


__all__ = ["CURRENT", "Registry", "head_sha256"]
