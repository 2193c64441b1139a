"""Install a ModelFull (manifest + every artifact file) into the agent's local artifact cache.

Each backbone version lives in ``<root>/<backbone_sha256[:16]>/``. Installation checks every
file's sha256 and size against the manifest carried in the message (and that the manifest names
the same backbone), writes into a temporary folder beside the target, verifies it again from
disk, then renames it into place: a half-written version is never visible. A version already
present is left alone, so every backbone is downloaded and written once.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import numpy as np

from fedge.protocol.errors import ArtifactError
from fedge.protocol.manifest import MANIFEST_FILE, Manifest, verify_artifacts
from fedge.protocol.messages import ModelFull


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


def check_model_full(msg: ModelFull) -> dict[str, bytes]:
    """Validate a ModelFull against the manifest it carries; returns file name -> bytes."""
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
    out: dict[str, bytes] = {}
    for name, entry in sorted(manifest.files.items()):
        _safe_relpath(name)
        if name == MANIFEST_FILE:
            raise ArtifactError("the manifest must not list itself")
        if name not in msg.files:
            raise ArtifactError(f"file {name!r} listed in the manifest is missing from the message")
        arr = msg.files[name]
        if arr.dtype != np.uint8 or arr.ndim != 1:
            raise ArtifactError(f"file {name!r} is not a 1-D uint8 array")
        data = arr.tobytes()
        if len(data) != entry.size:
            raise ArtifactError(f"file {name!r}: {len(data)} bytes, the manifest says {entry.size}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise ArtifactError(f"file {name!r}: sha256 {digest} does not match the manifest's {entry.sha256}")
        out[name] = data
    return out


def install_model_full(root: Path, msg: ModelFull) -> tuple[Path, bool]:
    """Verify and install; returns (folder, newly_installed). Raises ArtifactError on any mismatch."""
    target = artifacts_dir(root, msg.backbone_sha256)
    if is_installed(root, msg.backbone_sha256):  # retained: it comes again on every (re)subscribe
        return target, False
    files = check_model_full(msg)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        for name, data in files.items():
            dest = tmp / _safe_relpath(name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        (tmp / MANIFEST_FILE).write_text(msg.manifest, encoding="utf-8")
        verify_artifacts(tmp)
        if target.exists():  # a half-installed leftover without manifest.json (or a race): replace it
            if is_installed(root, msg.backbone_sha256):
                shutil.rmtree(tmp)
                return target, False
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, True


__all__ = ["artifacts_dir", "check_model_full", "install_model_full", "is_installed"]
