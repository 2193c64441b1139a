"""A device's local training data: ``.npz`` (arrays ``x`` and ``y``), ``.csv`` (label last), or images (a folder
with one sub-folder per class, or a ``.csv`` of ``file,label``; :mod:`fedge.runtime.images`, Pillow).

NumPy only (Pillow for images). Every problem raises ``DataError`` naming the file and what is wrong.
``LocalData.sha256`` is the hash of the file's bytes (the feature-cache key).
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.errors import DataError

__all__ = ["SUFFIXES", "LocalData", "conform", "load_local"]

SUFFIXES = (".npz", ".csv")


@dataclass(frozen=True)
class LocalData:
    x: NDArray[np.float32]
    y: NDArray[np.int64]
    sha256: str
    path: Path
    images: tuple[Path, ...] = ()  # image data: the files, re-decoded at the model's input size by conform()

    def __len__(self) -> int:
        return len(self.y)


def load_local(path: str | Path, input_shape: Sequence[int] | None = None, layout: str = "") -> LocalData:
    """Load and validate ``path``; with ``input_shape`` the per-sample shape must match.

    ``[N, 28, 28]`` is accepted for an input shape ``[28, 28, 1]`` (the channel axis is added), and
    flat rows ``[N, 784]`` (as a CSV gives) are reshaped row-major when the sizes agree. Images are decoded
    at ``input_shape`` in ``layout`` (``NHWC`` or ``NCHW``); without it at the first image's size, RGB,
    channels last (:func:`conform` re-decodes them for a model).
    """
    p = Path(path)
    if p.is_dir() and p.suffix.lower() not in SUFFIXES:
        return _load_images(p, None, input_shape, layout)
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{p}: unknown file type {p.suffix or '(none)'!r}; expected .npz, .csv or an image folder")
    try:
        raw = p.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{p}: file not found") from exc
    except IsADirectoryError as exc:
        raise DataError(f"{p}: is a directory, not a data file") from exc
    except OSError as exc:
        raise DataError(f"{p}: cannot read: {exc}") from exc
    from fedge.runtime.images import is_image_csv

    if suffix == ".csv" and is_image_csv(raw):
        return _load_images(p, raw, input_shape, layout)
    digest = hashlib.sha256(raw).hexdigest()
    x_raw, y_raw = _read_npz(p, raw) if suffix == ".npz" else _read_csv(p, raw)
    x, y = _validate(p, x_raw, y_raw, input_shape)
    return LocalData(x=x, y=y, sha256=digest, path=p)


def _load_images(p: Path, raw: bytes | None, shape: Sequence[int] | None, layout: str) -> LocalData:
    from fedge.runtime.images import decode_images, list_images

    files, y, digest = list_images(p, raw)
    x = decode_images(files, shape, layout)
    return LocalData(x=x, y=y, sha256=digest, path=p, images=tuple(files))


def conform(data: LocalData, shape: Sequence[int], layout: str = "") -> NDArray[np.float32]:
    """``data.x`` as ``[N, *shape]`` for a model: images re-decoded at its size and layout, flat rows reshaped."""
    want = tuple(int(d) for d in shape)
    x = data.x
    if data.images and tuple(x.shape[1:]) != want:
        from fedge.runtime.images import decode_images

        return decode_images(data.images, want, layout)
    if tuple(x.shape[1:]) != want:
        if int(np.prod(x.shape[1:])) != int(np.prod(want)):
            raise DataError(f"local data {data.path} has samples of shape {x.shape[1:]}, model wants {want}")
        x = x.reshape((x.shape[0], *want))
    return np.asarray(x, dtype=np.float32)


def _read_npz(p: Path, raw: bytes) -> tuple[NDArray[Any], NDArray[Any]]:
    try:
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{p}: not a readable .npz archive: {exc}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{p}: is a single .npy array, not an .npz archive with 'x' and 'y'")
    with loaded:
        names = set(loaded.files)
        missing = [k for k in ("x", "y") if k not in names]
        if missing:
            raise DataError(f"{p}: missing array(s) {', '.join(missing)} (has: {', '.join(sorted(names)) or 'none'})")
        out: list[NDArray[Any]] = []
        for key in ("x", "y"):
            try:
                out.append(loaded[key])
            except ValueError as exc:  # object arrays need pickle, which we never allow
                raise DataError(f"{p}: array {key!r} is an object/pickled array, which is not allowed") from exc
            except (OSError, EOFError, zipfile.BadZipFile) as exc:
                raise DataError(f"{p}: array {key!r} is corrupt: {exc}") from exc
    return out[0], out[1]


def _parse_row(fields: list[str]) -> list[float] | None:
    try:
        return [float(f) for f in fields]
    except ValueError:
        return None


def _read_csv(p: Path, raw: bytes) -> tuple[NDArray[Any], NDArray[Any]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text: {exc}") from exc
    rows: list[list[float]] = []
    width = None
    first = True
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        values = _parse_row(fields)
        if values is None:
            if first:  # a header line
                first = False
                continue
            raise DataError(f"{p}: line {lineno}: non-numeric value in {line.strip()[:80]!r}")
        first = False
        if width is None:
            width = len(values)
            if width < 2:
                raise DataError(f"{p}: line {lineno}: need at least one feature column and a label column")
        elif len(values) != width:
            raise DataError(f"{p}: line {lineno}: {len(values)} columns, expected {width}")
        rows.append(values)
    if not rows:
        raise DataError(f"{p}: empty: no data rows")
    table = np.asarray(rows, dtype=np.float64)
    return table[:, :-1], table[:, -1]


def _validate(
    p: Path, x: NDArray[Any], y: NDArray[Any], input_shape: Sequence[int] | None
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{p}: x has non-numeric dtype {x.dtype}")
    if y.dtype.kind not in "biuf":
        raise DataError(f"{p}: y has non-numeric dtype {y.dtype}")
    if x.ndim < 2:
        raise DataError(f"{p}: x must be [N, ...] with at least 2 dimensions, got shape {x.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{p}: y must be 1-D labels [N], got shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{p}: length mismatch: x has {len(x)} samples, y has {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{p}: empty: no samples")
    xf = np.asarray(x, dtype=np.float32)
    if not np.isfinite(xf).all():
        bad = int(np.count_nonzero(~np.isfinite(xf)))
        raise DataError(f"{p}: x has {bad} non-finite value(s) (NaN or inf)")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError(f"{p}: y has non-finite labels")
        if not np.all(y == np.round(y)):
            raise DataError(f"{p}: y has non-integer labels")
    if y.dtype.kind == "b":
        raise DataError(f"{p}: y must hold integer class labels, not booleans")
    if np.any(y < 0):
        raise DataError(f"{p}: y has negative labels (min {y.min()})")
    yi = y.astype(np.int64)
    if input_shape is not None:
        want = tuple(int(d) for d in input_shape)
        got = tuple(int(d) for d in xf.shape[1:])
        if got != want:
            if len(want) >= 2 and want[-1] == 1 and got == want[:-1]:
                xf = xf[..., None]
            elif len(got) == 1 and len(want) > 1 and math.prod(got) == math.prod(want):
                xf = xf.reshape((len(xf), *want))  # flat rows (e.g. CSV), row-major
            else:
                raise DataError(f"{p}: wrong shape: samples are {list(got)}, the model expects {list(want)}")
    return np.ascontiguousarray(xf), yi
