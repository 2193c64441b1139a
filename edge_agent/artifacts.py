"""Install a ModelFull (manifest + every artifact file) into the agent's local artifact cache.

Installs are named by what was verified, never by the id a message claims: each backbone id has a folder
``<root>/<backbone_sha256[:16]>/`` holding one folder per verified install, named by the sha256 of its
``manifest.json`` (which pins every file's sha256 and size): ``<root>/<sha[:16]>/<manifest sha256[:32]>/``, and
a ``current`` file naming the install in use. Installation checks every file's sha256 and size against the
manifest carried in the message (and that the manifest names the same backbone), refuses ONNX models that
reference external data (src/fedge/runtime/onnx_check.py), writes into a temporary folder, verifies it again from
disk, renames it into place, then points ``current`` at it: a half-written install is never visible. An
install already present is only pointed at again, so every backbone is written once; a different verified copy
under the same id (e.g. the hub's genuine model after a forged one) replaces it, and the features and
local-only heads computed with the old copy are dropped.

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

from fedge.protocol.errors import ArtifactError
from fedge.protocol.fsio import PRIVATE_FILE, fsync_dir, private_dir, write_atomic
from fedge.protocol.manifest import MANIFEST_FILE, Manifest, verify_artifacts
from fedge.protocol.messages import ModelFull
from fedge.runtime.onnx_check import check_onnx_files

log = logging.getLogger("fedge.agent")
_HEX16 = frozenset("0123456789abcdef")

CURRENT_FILE = "current"
_NONE = "none"  # the install folder named when nothing is installed (never created)


def _backbone_root(root: Path, backbone_sha256: str) -> Path:
    if len(backbone_sha256) < 16 or not all(c in "0123456789abcdef" for c in backbone_sha256):
        raise ArtifactError(f"backbone sha256 {backbone_sha256!r} is not a lowercase hex digest")
    return root / backbone_sha256[:16]


def artifacts_dir(root: Path, backbone_sha256: str) -> Path:
    """Where the installed artifacts of one backbone live (ArtifactError unless a hex digest): the verified
    install its ``current`` file names (a folder that does not exist while none is installed)."""
    folder = _backbone_root(root, backbone_sha256)
    try:
        name = (folder / CURRENT_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        name = _NONE
    return folder / (name if len(name) == 32 and set(name) <= _HEX16 else _NONE)


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


def _point(folder: Path, name: str) -> None:
    """Make ``folder/current`` name the install ``name`` (atomically), then drop every other install."""
    write_atomic(folder / CURRENT_FILE, name.encode("ascii"))
    for entry in folder.iterdir():
        if entry.is_dir() and entry.name != name and not entry.name.startswith("."):
            shutil.rmtree(entry, ignore_errors=True)


def _forget_derived(root: Path, prefix: str) -> None:
    """Drop what the agent computed with a replaced install: cached features and local-only heads."""
    state_dir = root.parent
    shutil.rmtree(state_dir / "features" / prefix, ignore_errors=True)
    local_only = state_dir / "local_only"
    for file in sorted(local_only.glob(f"{prefix}-*.npz")) if local_only.is_dir() else []:
        file.unlink(missing_ok=True)


def install_model_full(root: Path, msg: ModelFull) -> tuple[Path, bool]:
    """Verify and install; returns (folder, newly_installed): new when the backbone's current install changed.
    Raises ArtifactError on any mismatch."""
    folder = _backbone_root(root, msg.backbone_sha256)
    name = hashlib.sha256(msg.manifest.encode("utf-8")).hexdigest()[:32]  # names every file's sha256
    target = folder / name
    current = artifacts_dir(root, msg.backbone_sha256)
    if current == target and (target / MANIFEST_FILE).is_file():  # retained: it comes again on every subscribe
        return target, False
    files = check_model_full(msg)
    check_onnx_files(files)
    replacing = (current / MANIFEST_FILE).is_file()
    if (target / MANIFEST_FILE).is_file():  # verified and written before (a copy it switched away from)
        _point(folder, name)
        if replacing:
            _forget_derived(root, folder.name)
        return target, True
    private_dir(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder))  # mode 0700
    try:
        for rel, data in files.items():
            dest = tmp / _safe_relpath(rel)
            if not dest.parent.is_dir():
                private_dir(dest.parent)
            _write_private(dest, data)
        _write_private(tmp / MANIFEST_FILE, msg.manifest.encode("utf-8"))
        verify_artifacts(tmp)
        for sub, _dirs, _files in os.walk(tmp, topdown=False):
            fsync_dir(Path(sub))  # every new entry durable before the rename publishes the folder
        if target.exists():  # a half-installed leftover without manifest.json: replace it
            shutil.rmtree(target)
        tmp.rename(target)
        fsync_dir(folder)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point(folder, name)
    if replacing:
        log.warning("backbone %s: a different verified copy replaced the installed one", folder.name)
        _forget_derived(root, folder.name)
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
