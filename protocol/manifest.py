"""The artifacts manifest (``manifest.json``), its verification, and the ``head.npz`` format.

NumPy and the standard library only: the edge agent uses this module without TensorFlow.
The JSON layout is the one in ARCHITECTURE.md ("Artifacts directory").
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.codec import loads_strict
from fedge.protocol.errors import ArtifactError
from fedge.protocol.fsio import PUBLIC_FILE, atomic_writer

__all__ = [
    "FORMAT",
    "HEAD_FILE",
    "MANIFEST_FILE",
    "FileEntry",
    "HeadParam",
    "InputSpec",
    "Manifest",
    "backbone_digest",
    "head_order",
    "load_head",
    "load_manifest",
    "save_head",
    "sha256_file",
    "verify",
    "verify_artifacts",
]

FORMAT = 1
MANIFEST_FILE = "manifest.json"
HEAD_FILE = "head.npz"
LAYOUTS = ("", "NHWC", "NCHW")
_HEAD_NAME = re.compile(r"^h(\d+)_(kernel|bias)$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HeadParam:
    """One trainable head array: ``h{i}_kernel`` ``[in, out]`` or ``h{i}_bias`` ``[out]``."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class InputSpec:
    """The model input: name, per-example shape (no batch dimension), dtype; ``layout`` ``NHWC``/``NCHW`` for
    images (``""``: not an image model, or an older manifest: channels last)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str = ""


@dataclass(frozen=True)
class FileEntry:
    """One artifact file: sha256, size and what it is for (``role``; empty in older manifests)."""

    sha256: str
    size: int
    role: str = ""


@dataclass(frozen=True)
class Manifest:
    """Everything an agent needs to know about one exported model version."""

    model: str
    input: InputSpec
    feature_dim: int
    num_classes: int
    train_batch: int
    head: tuple[HeadParam, ...]
    head_activations: tuple[str, ...]
    backbone_sha256: str
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    created: str = ""
    format: int = FORMAT
    feature_shape: tuple[int, ...] = ()  # set when the features are not a vector: [H, W, C] before a conv head

    @property
    def features_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the backbone features (what the head takes; the feature cache stores)."""
        return self.feature_shape or (self.feature_dim,)

    @property
    def head_spec(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(name, shape), ...]`` in head order (what ``check_head`` takes)."""
        return [(p.name, p.shape) for p in self.head]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "model": self.model,
            "input": {"name": self.input.name, "shape": list(self.input.shape), "dtype": self.input.dtype,
                      **({"layout": self.input.layout} if self.input.layout else {})},
            "feature_dim": self.feature_dim,
            **({"feature_shape": list(self.feature_shape)} if self.feature_shape else {}),
            "num_classes": self.num_classes,
            "train_batch": self.train_batch,
            "head": [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype} for p in self.head],
            "head_activations": list(self.head_activations),
            "backbone_sha256": self.backbone_sha256,
            "files": {k: {"sha256": v.sha256, "size": v.size, **({"role": v.role} if v.role else {})}
                      for k, v in sorted(self.files.items())},
            "created": self.created,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            raw: Any = loads_strict(text)
        except (ValueError, RecursionError) as exc:  # not JSON or UTF-8, a repeated key, >4300 digits, deep nesting
            raise ArtifactError(f"manifest is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> Manifest:
        if not isinstance(raw, dict):
            raise ArtifactError("manifest is not a JSON object")
        fmt = _int(raw, "format", "format")
        if fmt != FORMAT:
            raise ArtifactError(f"manifest field 'format': unsupported version {fmt} (this fedge reads {FORMAT})")
        inp = _get(raw, "input", dict, "input")
        input_spec = InputSpec(
            name=_get(inp, "name", str, "input.name"),
            shape=_shape(inp, "shape", "input.shape"),
            dtype=_get(inp, "dtype", str, "input.dtype"),
            layout=_get(inp, "layout", str, "input.layout") if "layout" in inp else "",
        )
        if input_spec.layout not in LAYOUTS:
            raise ArtifactError(f"manifest field 'input.layout': {input_spec.layout!r} is not one of NHWC, NCHW")
        head_raw = _get(raw, "head", list, "head")
        if not head_raw:
            raise ArtifactError("manifest field 'head': empty")
        head: list[HeadParam] = []
        for i, entry in enumerate(head_raw):
            where = f"head[{i}]"
            if not isinstance(entry, dict):
                raise ArtifactError(f"manifest field {where!r}: not an object")
            name = _get(entry, "name", str, f"{where}.name")
            if not _HEAD_NAME.match(name):
                raise ArtifactError(f"manifest field '{where}.name': {name!r} is not h<i>_kernel or h<i>_bias")
            head.append(HeadParam(name, _shape(entry, "shape", f"{where}.shape"), _get(entry, "dtype", str, where)))
        acts = _get(raw, "head_activations", list, "head_activations")
        if not all(isinstance(a, str) for a in acts) or len(acts) * 2 != len(head):
            raise ArtifactError("manifest field 'head_activations': need one string per head layer")
        digest = _get(raw, "backbone_sha256", str, "backbone_sha256")
        if not _HEX.match(digest):
            raise ArtifactError("manifest field 'backbone_sha256': not a lowercase sha256 hex digest")
        files_raw = _get(raw, "files", dict, "files")
        files: dict[str, FileEntry] = {}
        for name, entry in files_raw.items():
            where = f"files[{name!r}]"
            _safe_relpath(name)
            if not isinstance(entry, dict):
                raise ArtifactError(f"manifest field {where}: not an object")
            sha = _get(entry, "sha256", str, f"{where}.sha256")
            if not _HEX.match(sha):
                raise ArtifactError(f"manifest field {where}.sha256: not a lowercase sha256 hex digest")
            role = _get(entry, "role", str, f"{where}.role") if "role" in entry else ""
            files[name] = FileEntry(sha, _int(entry, "size", f"{where}.size"), role)
        return cls(
            model=_get(raw, "model", str, "model"),
            input=input_spec,
            feature_dim=_int(raw, "feature_dim", "feature_dim"),
            feature_shape=_shape(raw, "feature_shape", "feature_shape") if "feature_shape" in raw else (),
            num_classes=_int(raw, "num_classes", "num_classes"),
            train_batch=_int(raw, "train_batch", "train_batch"),
            head=tuple(head),
            head_activations=tuple(acts),
            backbone_sha256=digest,
            files=files,
            created=str(raw.get("created", "")),
            format=fmt,
        )


def _get(raw: Mapping[str, Any], key: str, typ: type, where: str) -> Any:
    if key not in raw:
        raise ArtifactError(f"manifest field {where!r}: missing")
    value = raw[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ArtifactError(f"manifest field {where!r}: expected {typ.__name__}, got {type(value).__name__}")
    return value


def _int(raw: Mapping[str, Any], key: str, where: str) -> int:
    value: int = _get(raw, key, int, where)
    if value < 0:
        raise ArtifactError(f"manifest field {where!r}: negative")
    return value


def _shape(raw: Mapping[str, Any], key: str, where: str) -> tuple[int, ...]:
    value = _get(raw, key, list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value):
        raise ArtifactError(f"manifest field {where!r}: not a list of positive ints")
    return tuple(value)


def _safe_relpath(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name or rel.as_posix() != name:
        raise ArtifactError(f"manifest field 'files': {name!r} is not a plain relative path")
    return rel


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def backbone_digest(arrays: Iterable[NDArray[Any]]) -> str:
    """sha256 of the backbone weights in order, each as float32 little-endian C-order bytes."""
    h = hashlib.sha256()
    for arr in arrays:
        h.update(np.ascontiguousarray(np.asarray(arr, dtype="<f4")).tobytes())
    return h.hexdigest()


def load_manifest(directory: str | Path) -> Manifest:
    """Parse ``<directory>/manifest.json``; ``ArtifactError`` naming the missing or invalid field."""
    path = Path(directory) / MANIFEST_FILE
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the manifest: {exc.strerror or exc}") from exc
    try:
        return Manifest.from_json(text)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from exc


def verify_artifacts(directory: str | Path) -> Manifest:
    """Load the manifest and check every listed file's size and sha256; ``ArtifactError`` names the file."""
    root = Path(directory)
    manifest = load_manifest(root)
    if not manifest.files:
        raise ArtifactError(f"{root / MANIFEST_FILE}: lists no files")
    for name, entry in sorted(manifest.files.items()):
        path = root / _safe_relpath(name)
        if not path.is_file():
            raise ArtifactError(f"artifact file {name!r} is missing from {root}")
        size = path.stat().st_size
        if size != entry.size:
            raise ArtifactError(f"artifact file {name!r}: {size} bytes, the manifest says {entry.size}")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise ArtifactError(f"artifact file {name!r}: sha256 {digest} does not match the manifest's {entry.sha256}")
    return manifest


verify = verify_artifacts  # the name ARCHITECTURE.md uses


def head_order(names: Iterable[str]) -> list[str]:
    """Head parameter names in head order (layer index, kernel before bias)."""
    keyed = []
    for name in names:
        m = _HEAD_NAME.match(name)
        if not m:
            raise ArtifactError(f"head parameter name {name!r} is not h<i>_kernel or h<i>_bias")
        keyed.append((int(m.group(1)), m.group(2) != "kernel", name))
    return [name for *_, name in sorted(keyed)]


def load_head(path: str | Path) -> dict[str, NDArray[np.float32]]:
    """The head in ``head.npz`` (``path`` is the file or the artifacts folder), in head order."""
    file = Path(path)
    if file.is_dir():
        file = file / HEAD_FILE
    try:
        with np.load(file, allow_pickle=False) as npz:
            raw = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"head file {str(file)!r} cannot be read: {exc}") from exc
    if not raw:
        raise ArtifactError(f"head file {str(file)!r} holds no arrays")
    out: dict[str, NDArray[np.float32]] = {}
    for name in head_order(raw):
        arr = raw[name]
        if arr.dtype != np.float32:
            raise ArtifactError(f"head file {str(file)!r}: {name} is {arr.dtype}, expected float32")
        out[name] = np.ascontiguousarray(arr)
    return out


def save_head(path: str | Path, head: Mapping[str, NDArray[Any]], *, mode: int = PUBLIC_FILE) -> None:
    """Write ``head`` as an uncompressed ``.npz`` (float32, head order); no pickle. Durable and atomic when it
    returns (:func:`fedge.protocol.fsio.atomic_writer`); ``mode`` sets the file's permissions (0644 by default)."""
    arrays = {name: np.ascontiguousarray(np.asarray(head[name], dtype=np.float32)) for name in head_order(head)}
    with atomic_writer(Path(path), mode) as fh:
        np.savez(fh, allow_pickle=False, **arrays)
