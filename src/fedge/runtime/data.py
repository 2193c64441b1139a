"""A device's local training data: ``.npz`` (arrays ``x`` and ``y``), ``.csv`` (label last), or images (a folder
with one sub-folder per class, or a ``.csv`` of ``file,label``; :mod:`fedge.runtime.images`, Pillow).

NumPy only (Pillow for images). Every problem raises ``DataError`` naming the file and what is wrong.
``LocalData.sha256`` is the hash of the file's bytes (the feature-cache key). :func:`load_inputs` reads the same
files for prediction, where labels are optional.
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

__all__ = ["SUFFIXES", "LocalData", "conform", "load_inputs", "load_local"]

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
    raw = _read_file(p)
    if raw is None or _is_image_csv(p, raw):
        return _load_images(p, raw, input_shape, layout)
    digest = hashlib.sha256(raw).hexdigest()
    x_raw, y_raw = _read_npz(p, raw) if p.suffix.lower() == ".npz" else _read_csv(p, raw)
    x, y = _validate(p, x_raw, y_raw, input_shape)
    return LocalData(x=x, y=y, sha256=digest, path=p)


def load_inputs(path: str | Path, input_shape: Sequence[int], layout: str = "") -> NDArray[np.float32]:
    """The samples of ``path`` as model inputs ``[N, *input_shape]``, for prediction: every file
    :func:`load_local` reads (its labels ignored), and unlabelled ones too: an ``.npz`` without ``y``, a ``.csv``
    (header line allowed) whose rows are exactly the model's input width (one more column is a label, dropped)."""
    p = Path(path)
    want = tuple(int(d) for d in input_shape)
    raw = _read_file(p)
    if raw is None or _is_image_csv(p, raw):
        return _load_images(p, raw, want, layout).x
    if p.suffix.lower() == ".npz":
        x = _read_npz(p, raw, need_y=False)[0]
    else:
        table = _csv_table(p, raw)
        width = math.prod(want)
        if table.shape[1] == width + 1:
            table = table[:, :-1]  # a training file: the label column
        elif table.shape[1] != width:
            raise DataError(f"{p}: rows have {table.shape[1]} columns; the model takes {width} features (a "
                            f"training file: {width + 1}, the label last)")
        x = table
    return _validate_x(p, x, want)


def _read_file(p: Path) -> bytes | None:
    """The bytes of data file ``p`` (None: an image folder)."""
    if p.is_dir() and p.suffix.lower() not in SUFFIXES:
        return None
    if p.suffix.lower() not in SUFFIXES:
        raise DataError(f"{p}: unknown file type {p.suffix or '(none)'!r}; expected .npz, .csv or an image folder")
    try:
        return p.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{p}: file not found") from exc
    except IsADirectoryError as exc:
        raise DataError(f"{p}: is a directory, not a data file") from exc
    except OSError as exc:
        raise DataError(f"{p}: cannot read: {exc}") from exc


def _is_image_csv(p: Path, raw: bytes) -> bool:
    from fedge.runtime.images import is_image_csv

    return p.suffix.lower() == ".csv" and is_image_csv(raw)


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


def _read_npz(p: Path, raw: bytes, need_y: bool = True) -> tuple[NDArray[Any], NDArray[Any] | None]:
    try:
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{p}: not a readable .npz archive: {exc}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{p}: is a single .npy array, not an .npz archive with 'x' and 'y'")
    with loaded:
        names = set(loaded.files)
        wanted = ("x", "y") if need_y or "y" in names else ("x",)
        missing = [k for k in wanted if k not in names]
        if missing:
            raise DataError(f"{p}: missing array(s) {', '.join(missing)} (has: {', '.join(sorted(names)) or 'none'})")
        out: list[NDArray[Any]] = []
        for key in wanted:
            try:
                out.append(loaded[key])
            except ValueError as exc:  # object arrays need pickle, which we never allow
                raise DataError(f"{p}: array {key!r} is an object/pickled array, which is not allowed") from exc
            except (OSError, EOFError, zipfile.BadZipFile) as exc:
                raise DataError(f"{p}: array {key!r} is corrupt: {exc}") from exc
    return out[0], out[1] if len(out) > 1 else None


def _parse_row(fields: list[str]) -> list[float] | None:
    try:
        return [float(f) for f in fields]
    except ValueError:
        return None


def _read_csv(p: Path, raw: bytes) -> tuple[NDArray[Any], NDArray[Any]]:
    table = _csv_table(p, raw)
    if table.shape[1] < 2:
        raise DataError(f"{p}: need at least one feature column and a label column")
    return table[:, :-1], table[:, -1]


def _csv_table(p: Path, raw: bytes) -> NDArray[np.float64]:
    """Every data row of a numeric CSV (a first non-numeric line is a header, skipped) as ``[N, columns]``."""
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
        elif len(values) != width:
            raise DataError(f"{p}: line {lineno}: {len(values)} columns, expected {width}")
        rows.append(values)
    if not rows:
        raise DataError(f"{p}: empty: no data rows")
    return np.asarray(rows, dtype=np.float64)


def _validate(
    p: Path, x: NDArray[Any], y: NDArray[Any] | None, input_shape: Sequence[int] | None
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    if y is None:
        raise DataError(f"{p}: no labels")
    if y.dtype.kind not in "biuf":
        raise DataError(f"{p}: y has non-numeric dtype {y.dtype}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{p}: y must be 1-D labels [N], got shape {y.shape}")
    if x.ndim >= 1 and len(x) != len(y):
        raise DataError(f"{p}: length mismatch: x has {len(x)} samples, y has {len(y)} labels")
    xf = _validate_x(p, x, input_shape)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError(f"{p}: y has non-finite labels")
        if not np.all(y == np.round(y)):
            raise DataError(f"{p}: y has non-integer labels")
    if y.dtype.kind == "b":
        raise DataError(f"{p}: y must hold integer class labels, not booleans")
    if np.any(y < 0):
        raise DataError(f"{p}: y has negative labels (min {y.min()})")
    return xf, y.astype(np.int64)


def _validate_x(p: Path, x: NDArray[Any], input_shape: Sequence[int] | None) -> NDArray[np.float32]:
    """``x`` as float32 ``[N, ...]``: numeric, finite, at least one sample, of ``input_shape`` when given."""
    if x.dtype.kind not in "biuf":
        raise DataError(f"{p}: x has non-numeric dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"{p}: x must be [N, ...] with at least 2 dimensions, got shape {x.shape}")
    if len(x) == 0:
        raise DataError(f"{p}: empty: no samples")
    xf = np.asarray(x, dtype=np.float32)
    if not np.isfinite(xf).all():
        bad = int(np.count_nonzero(~np.isfinite(xf)))
        raise DataError(f"{p}: x has {bad} non-finite value(s) (NaN or inf)")
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
    return np.ascontiguousarray(xf)
