"""Source data sets for the hub: Fashion-MNIST (Debian IDX files) or scikit-learn digits.

``load_source`` is cached (``functools.lru_cache``); the arrays it returns are read-only so the
cache cannot be corrupted by a caller. Copy before modifying in place.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.errors import ConfigError, DataError

__all__ = [
    "FASHION_MNIST_DIR",
    "SOURCES",
    "Dataset",
    "as_images28",
    "load_digits_source",
    "load_fashion_mnist",
    "load_source",
    "read_idx",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCES = ("auto", "fashion-mnist", "digits")
_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
# IDX type codes -> big-endian numpy dtypes
_IDX_DTYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    """A labelled data set split into train and test, images in [0, 1] (``[N, 28, 28, 1]``) or feature vectors."""

    name: str
    x_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    x_test: NDArray[np.float32]
    y_test: NDArray[np.int64]
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def is_images(self) -> bool:
        return self.x_train.ndim == 4


def read_idx(path: str | Path) -> NDArray[Any]:
    """Parse one IDX file (optionally gzip-compressed): magic ``00 00 type ndim``, big-endian dims, data."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip data: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX data type 0x{code:02x}")
    if ndim == 0:
        raise DataError(f"{path}: IDX file with no dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX data is {len(raw) - header} bytes, dims {dims} need {expected}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _freeze(*arrays: NDArray[Any]) -> None:
    for a in arrays:
        a.setflags(write=False)


def load_fashion_mnist(directory: str | Path = FASHION_MNIST_DIR) -> Dataset:
    """Fashion-MNIST as x float32 ``[N, 28, 28, 1]`` in [0, 1], y int64 (60k train, 10k test)."""
    directory = Path(directory)
    parts: dict[str, NDArray[Any]] = {}
    for key, fname in _FASHION_FILES.items():
        path = directory / fname
        arr = read_idx(path)
        if key.startswith("x"):
            if arr.ndim != 3:
                raise DataError(f"{path}: expected images [N, H, W], got shape {arr.shape}")
            parts[key] = (arr.astype(np.float32) / np.float32(255.0))[..., None]
        else:
            if arr.ndim != 1:
                raise DataError(f"{path}: expected labels [N], got shape {arr.shape}")
            parts[key] = arr.astype(np.int64)
    for split in ("train", "test"):
        nx, ny = len(parts[f"x_{split}"]), len(parts[f"y_{split}"])
        if nx != ny:
            raise DataError(f"{directory / _FASHION_FILES['y_' + split]}: {ny} labels for {nx} images")
    _freeze(*parts.values())
    num_classes = int(max(parts["y_train"].max(), parts["y_test"].max())) + 1
    return Dataset("fashion-mnist", parts["x_train"], parts["y_train"], parts["x_test"], parts["y_test"], num_classes)


def load_digits_source(seed: int = DIGITS_SPLIT_SEED, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 digits as x float32 ``[N, 64]`` in [0, 1]; a seeded 80/20 train/test split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError("sklearn digits: scikit-learn is not installed") from exc
    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).clip(0.0, 1.0)
    y = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    _freeze(x_train, y_train, x_test, y_test)
    return Dataset("digits", x_train, y_train, x_test, y_test, int(y.max()) + 1)


def _fashion_available(directory: Path = FASHION_MNIST_DIR) -> bool:
    return all((directory / f).is_file() for f in _FASHION_FILES.values())


@functools.lru_cache(maxsize=4)
def load_source(name: str = "auto") -> Dataset:
    """``"fashion-mnist"``, ``"digits"`` or ``"auto"`` (Fashion-MNIST when its files exist, else digits)."""
    if name not in SOURCES:
        raise ConfigError("dataset", f"unknown data set {name!r} (choose from {', '.join(SOURCES)})")
    if name == "auto":
        name = "fashion-mnist" if _fashion_available() else "digits"
    if name == "fashion-mnist":
        return load_fashion_mnist()
    return load_digits_source()


def as_images28(x: NDArray[Any], order: str = "bilinear") -> NDArray[np.float32]:
    """Turn square flat images (e.g. digits ``[N, 64]``) or ``[N, h, w(, 1)]`` into ``[N, 28, 28, 1]``.

    ``order`` is ``"nearest"`` or ``"bilinear"`` (pixel-centre aligned, edges clamped).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:
        side = round(float(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise ValueError(f"cannot view {x.shape[1]} features as a square image")
        x = x.reshape(len(x), side, side)
    elif x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"expected [N, D], [N, h, w] or [N, h, w, 1], got shape {x.shape}")
    _, h, w = x.shape
    out_side = 28
    # source coordinate of each output pixel centre
    sy = (np.arange(out_side) + 0.5) * (h / out_side) - 0.5
    sx = (np.arange(out_side) + 0.5) * (w / out_side) - 0.5
    if order == "nearest":
        iy = np.clip(np.floor(sy + 0.5).astype(np.int64), 0, h - 1)
        ix = np.clip(np.floor(sx + 0.5).astype(np.int64), 0, w - 1)
        out = x[:, iy][:, :, ix]
    elif order == "bilinear":
        sy, sx = np.clip(sy, 0, h - 1), np.clip(sx, 0, w - 1)
        y0 = np.minimum(np.floor(sy).astype(np.int64), h - 2) if h > 1 else np.zeros(out_side, np.int64)
        x0 = np.minimum(np.floor(sx).astype(np.int64), w - 2) if w > 1 else np.zeros(out_side, np.int64)
        y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
        fy = (sy - y0).astype(np.float32)[None, :, None]
        fx = (sx - x0).astype(np.float32)[None, None, :]
        top = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
        bottom = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
        out = top * (1 - fy) + bottom * fy
    else:
        raise ValueError(f"unknown interpolation {order!r}")
    result: NDArray[np.float32] = np.clip(out, 0.0, 1.0).astype(np.float32)[..., None]
    return result
