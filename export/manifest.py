"""Re-export of :mod:`protocol.manifest` (the name ARCHITECTURE.md uses: ``export.manifest.verify``)."""

from __future__ import annotations

from fedge.protocol.manifest import (
    FileEntry,
    HeadParam,
    InputSpec,
    Manifest,
    backbone_digest,
    load_head,
    load_manifest,
    save_head,
    sha256_file,
    verify,
    verify_artifacts,
)

__all__ = [
    "FileEntry",
    "HeadParam",
    "InputSpec",
    "Manifest",
    "backbone_digest",
    "load_head",
    "load_manifest",
    "save_head",
    "sha256_file",
    "verify",
    "verify_artifacts",
]
