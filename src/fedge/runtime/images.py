"""Image files as local data: a folder with one sub-folder per class, or a CSV of ``file,label`` rows.

Decoded with Pillow (no TensorFlow on the device), converted to the model's channels (1: grayscale, 3: RGB),
resized to its input size (bilinear) and scaled to float32 in [0, 1], channels last (``NHWC``) or first
(``NCHW``, e.g. a PyTorch backbone). Any other normalisation belongs in the model (a Keras ``Rescaling`` or
``Normalization`` layer; inside the module given to ``torch.onnx.export``).

Class folders: labels are the folder names when every name is a non-negative integer, else the index of the
name in sorted order. CSV: ``file,label`` per line (a header line is allowed), paths relative to the CSV's
folder. The data's sha256 hashes every file name, label and file's bytes in order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "decode_images", "is_image_csv", "list_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def is_image_csv(raw: bytes) -> bool:
    """True when the CSV's first data line is ``<image file>,<label>``."""
    for line in raw.decode("utf-8-sig", errors="replace").splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and Path(fields[0]).suffix.lower() in IMAGE_SUFFIXES:
            return True
        if line.strip() and not (len(fields) == 2 and not fields[1].lstrip("-").isdigit()):  # not a header
            return False
    return False


def _folder_entries(root: Path) -> list[tuple[Path, int]]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: an image folder needs one sub-folder per class (none found)")
    numeric = all(d.name.isdigit() for d in classes)
    entries: list[tuple[Path, int]] = []
    for index, d in enumerate(classes):
        label = int(d.name) if numeric else index
        entries += [(p, label) for p in sorted(d.iterdir()) if _is_image(p)]
    if not entries:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class sub-folders")
    return entries


def _csv_entries(csv_path: Path, raw: bytes) -> list[tuple[Path, int]]:
    entries: list[tuple[Path, int]] = []
    for lineno, line in enumerate(raw.decode("utf-8-sig").splitlines(), start=1):
        fields = [f.strip() for f in line.split(",")]
        if not line.strip() or (not entries and len(fields) == 2 and not fields[1].lstrip("-").isdigit()):
            continue  # blank line, or the header
        if len(fields) != 2 or not fields[1].isdigit():
            raise DataError(f"{csv_path}: line {lineno}: expected 'file,label' with a non-negative integer label, "
                            f"got {line.strip()[:80]!r}")
        p = Path(fields[0])
        p = p if p.is_absolute() else csv_path.parent / p
        if not _is_image(p):
            raise DataError(f"{csv_path}: line {lineno}: {str(p)!r} is not an image file")
        entries.append((p, int(fields[1])))
    if not entries:
        raise DataError(f"{csv_path}: empty: no 'file,label' rows")
    return entries


def list_images(path: Path, raw_csv: bytes | None = None) -> tuple[list[Path], NDArray[np.int64], str]:
    """``(files, labels, sha256)`` of an image folder (``raw_csv`` None) or an image CSV."""
    entries = _csv_entries(path, raw_csv) if raw_csv is not None else _folder_entries(path)
    h = hashlib.sha256()
    for p, label in entries:
        h.update(f"{p.name}\0{label}\0".encode())
        try:
            h.update(p.read_bytes())
        except OSError as exc:
            raise DataError(f"{p}: cannot read: {exc}") from exc
    return [p for p, _ in entries], np.array([label for _, label in entries], dtype=np.int64), h.hexdigest()


def decode_images(files: Sequence[Path], shape: Sequence[int] | None, layout: str = "") -> NDArray[np.float32]:
    """Decode ``files`` to ``[N, *shape]`` float32 in [0, 1]; without ``shape``: the first image's size, RGB."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise DataError("image data needs Pillow: pip install pillow") from exc
    if shape is None:
        with Image.open(files[0]) as first:
            width, height = first.size
        shape, layout = (height, width, 3), "NHWC"
    dims = [int(d) for d in shape]
    if len(dims) != 3:
        raise DataError(f"{files[0].parent}: image data needs a model input [H, W, C] or [C, H, W], got {dims}")
    nchw = layout == "NCHW"
    channels, height, width = (dims[0], dims[1], dims[2]) if nchw else (dims[2], dims[0], dims[1])
    if channels not in (1, 3):
        raise DataError(f"{files[0].parent}: images decode to 1 or 3 channels, the model takes {channels}")
    out = np.empty((len(files), height, width, channels), dtype=np.float32)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as img:
                pix = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
                arr = np.asarray(pix, dtype=np.float32)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"{p}: cannot decode the image: {exc}") from exc
        out[i] = arr.reshape(height, width, channels) / np.float32(255.0)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)) if nchw else out
