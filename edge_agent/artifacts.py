"""Install a ModelFull (manifest + every artifact file) into the agent's local artifact cache.

Each backbone version lives in ``<root>/<backbone_sha256[:16]>/``. Installation checks every
file's sha256 and size against the manifest carried in the message (and that the manifest names
the same backbone), writes into a temporary folder beside the target, verifies it again from
disk, then renames it into place: a half-written version is never visible. A version already
present is left alone, so every backbone is downloaded and written once.

Memory: the files are hashed and written straight from the message's arrays (read-only views into the
received frame, see ``codec.decode``), so installing holds no second copy of the model. Files are 0600,
folders 0700, fsynced before the rename. :func:`prune_backbones` deletes the backbones no longer kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np

from fedge.edge_agent.state import PRIVATE_FILE, fsync_dir, private_dir
from fedge.protocol.errors import ArtifactError
from fedge.protocol.manifest import MANIFEST_FILE, Manifest, verify_artifacts
from fedge.protocol.messages import ModelFull

log = logging.getLogger("fedge.agent")
_HEX16 = frozenset("0123456789abcdef")

def artifacts_dir(root: Path, backbone_sha256: str) -> Path:
    """Where the artifacts of one backbone version live (ArtifactError unless a hex digest)."""
    if len(backbone_sha256) < 16 or not all(c in "0123456789abcdef" for c in backbone_sha256):
        raise ArtifactError(f"backbone sha256 {backbone_sha256!r} is not a lowercase hex digest")
    return root / backbone_sha256[:16]


def is_installed(root: Path, backbone_sha256: str) -> bool:
    return (artifacts_dir(root, backbone_sha256) / MANIFEST_FILE).is_file()


def _safe_relpath(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name or rel.as_posix() != name:
        raise ArtifactError(f"artifact file name {name!r} is not a plain relative path")
    return rel


def check_model_full(msg: ModelFull) -> dict[str, memoryview]:
    """Validate a ModelFull against the manifest it carries; returns file name -> its bytes (a view, not a copy)."""
    artifacts_dir(Path(), msg.backbone_sha256)  # a hex digest, or ArtifactError
    manifest = Manifest.from_json(msg.manifest)
    if manifest.backbone_sha256 != msg.backbone_sha256:
        raise ArtifactError(
            f"manifest backbone_sha256 {manifest.backbone_sha256!r} differs from the message's {msg.backbone_sha256!r}"
        )
    if not manifest.files:
        raise ArtifactError("manifest lists no files")
    extra = sorted(set(msg.files) - set(manifest.files))
    if extra:
        raise ArtifactError(f"message carries files the manifest does not list: {extra}")
    out: dict[str, memoryview] = {}
    for name, entry in sorted(manifest.files.items()):
        _safe_relpath(name)
        if name == MANIFEST_FILE:
            raise ArtifactError("the manifest must not list itself")
        if name not in msg.files:
            raise ArtifactError(f"file {name!r} listed in the manifest is missing from the message")
        arr = msg.files[name]
        if arr.dtype != np.uint8 or arr.ndim != 1 or not arr.flags.c_contiguous:
            raise ArtifactError(f"file {name!r} is not a 1-D uint8 array")
        if arr.size != entry.size:
            raise ArtifactError(f"file {name!r}: {arr.size} bytes, the manifest says {entry.size}")
        view = arr.data  # the frame's own bytes
        digest = hashlib.sha256(view).hexdigest()
        if digest != entry.sha256:
            raise ArtifactError(f"file {name!r}: sha256 {digest} does not match the manifest's {entry.sha256}")
        out[name] = view
    return out


def _write_private(path: Path, data: memoryview | bytes) -> None:
    """Write a new 0600 file from a buffer (no copy) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def install_model_full(root: Path, msg: ModelFull) -> tuple[Path, bool]:
    """Verify and install; returns (folder, newly_installed). Raises ArtifactError on any mismatch."""
    target = artifacts_dir(root, msg.backbone_sha256)
    if is_installed(root, msg.backbone_sha256):  # retained: it comes again on every (re)subscribe
        return target, False
    files = check_model_full(msg)
    private_dir(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))  # mode 0700
    try:
        for name, data in files.items():
            dest = tmp / _safe_relpath(name)
            if not dest.parent.is_dir():
                private_dir(dest.parent)
            _write_private(dest, data)
        _write_private(tmp / MANIFEST_FILE, msg.manifest.encode("utf-8"))
        verify_artifacts(tmp)
        for folder, _dirs, _files in os.walk(tmp, topdown=False):
            fsync_dir(Path(folder))  # every new entry durable before the rename publishes the folder
        if target.exists():  # a half-installed leftover without manifest.json (or a race): replace it
            if is_installed(root, msg.backbone_sha256):
                shutil.rmtree(tmp)
                return target, False
            shutil.rmtree(target)
        tmp.rename(target)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, True


def prune_backbones(state_dir: Path, keep: Iterable[str]) -> list[str]:
    """Delete every backbone not in ``keep`` (sha256 digests) from an agent's ``state_dir``: its artifacts
    (``artifacts/<sha[:16]>/``), its cached features (``features/<sha[:16]>/``) and its local-only heads
    (``local_only/<sha[:16]>-*.npz``). Returns the 16-character prefixes removed."""
    kept = {k[:16] for k in keep}
    removed: set[str] = set()
    for sub in ("artifacts", "features"):
        folder = state_dir / sub
        entries = list(folder.iterdir()) if folder.is_dir() else []
        for entry in entries:  # in-progress installs are hidden (".<sha>.tmp") and not touched
            if len(entry.name) == 16 and set(entry.name) <= _HEX16 and entry.name not in kept and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.add(entry.name)
    local_only = state_dir / "local_only"
    for file in sorted(local_only.glob("*-*.npz")) if local_only.is_dir() else []:
        prefix = file.name.split("-", 1)[0]
        if len(prefix) == 16 and prefix not in kept:
            file.unlink(missing_ok=True)
            removed.add(prefix)
    if removed:
        log.info("pruned backbone(s) %s", ", ".join(sorted(removed)))
    return sorted(removed)


__all__ = ["artifacts_dir", "check_model_full", "install_model_full", "is_installed", "prune_backbones"]
