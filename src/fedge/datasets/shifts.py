"""Domain shifts on image batches, in pure NumPy.

Images are float32 ``[N, H, W, C]`` in [0, 1]; every function returns a new float32 array
clipped to [0, 1]. ``contrast``, ``gaussian_noise`` and ``invert`` are elementwise per sample
and also accept feature vectors ``[N, D]``; ``rotate`` needs images.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.errors import ConfigError
from fedge.protocol.types import F32

__all__ = ["Shift", "contrast", "gaussian_noise", "invert", "rotate"]



def _as_f32(x: NDArray[Any]) -> F32:
    return np.asarray(x, dtype=np.float32)


def _clip(x: NDArray[Any]) -> F32:
    out: F32 = np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)
    return out


def rotate(x: NDArray[Any], degrees: float, order: Literal["bilinear", "nearest"] = "bilinear") -> F32:
    """Rotate every image of ``x`` ``[N, H, W, C]`` counter-clockwise by ``degrees`` about its centre.

    Pixels that come from outside the image are 0. ``rotate(x, 90)`` equals
    ``np.rot90(x, 1, axes=(1, 2))`` for square images (same direction as ``np.rot90``).
    """
    x = _as_f32(x)
    if x.ndim != 4:
        raise ValueError(f"rotate needs images [N, H, W, C], got shape {x.shape}")
    if not math.isfinite(degrees):
        raise ValueError(f"rotation must be finite, got {degrees}")
    if order not in ("bilinear", "nearest"):
        raise ValueError(f"unknown interpolation {order!r}")
    n, h, w, c = x.shape
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    rr, cc = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    yy, xx = rr - cy, cc - cx
    # inverse map: where in the source does each output pixel come from
    src_y = cos * yy + sin * xx + cy
    src_x = -sin * yy + cos * xx + cx
    if order == "nearest":
        iy = np.rint(src_y).astype(np.int64)
        ix = np.rint(src_x).astype(np.int64)
        ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
        out = np.zeros_like(x)
        out[:, ok, :] = x[:, iy[ok], ix[ok], :]
        return _clip(out)
    # snap values within float noise of an integer so exact grid rotations stay exact
    src_y = np.where(np.abs(src_y - np.rint(src_y)) < 1e-9, np.rint(src_y), src_y)
    src_x = np.where(np.abs(src_x - np.rint(src_x)) < 1e-9, np.rint(src_x), src_x)
    y0 = np.floor(src_y).astype(np.int64)
    x0 = np.floor(src_x).astype(np.int64)
    fy = (src_y - y0).astype(np.float32)
    fx = (src_x - x0).astype(np.float32)
    acc = np.zeros((n, h, w, c), dtype=np.float32)
    for dy, dx, wgt in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        iy, ix = y0 + dy, x0 + dx
        ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w) & (wgt > 0)
        acc[:, ok, :] += x[:, iy[ok], ix[ok], :] * wgt[ok][None, :, None]
    return _clip(acc)


def contrast(x: NDArray[Any], factor: float) -> F32:
    """Scale each sample's deviation from its own mean by ``factor`` (1 = unchanged, 0 = flat)."""
    x = _as_f32(x)
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"contrast factor must be finite and >= 0, got {factor}")
    if x.ndim < 2:
        raise ValueError(f"contrast needs a batch [N, ...], got shape {x.shape}")
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    return _clip((x - mean) * np.float32(factor) + mean)


def gaussian_noise(x: NDArray[Any], sigma: float, rng: np.random.Generator) -> F32:
    """Add N(0, sigma²) noise to every value."""
    x = _as_f32(x)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"noise sigma must be finite and >= 0, got {sigma}")
    if sigma == 0:
        return _clip(x.copy())
    return _clip(x + rng.normal(0.0, sigma, size=x.shape).astype(np.float32))


def invert(x: NDArray[Any]) -> F32:
    """``1 - x``."""
    return _clip(np.float32(1.0) - _as_f32(x))


@dataclass(frozen=True)
class Shift:
    """A device domain: rotation, then contrast, then (optional) inversion, then noise."""

    rotation_deg: float = 0.0
    contrast: float = 1.0
    noise_sigma: float = 0.0
    invert: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.rotation_deg):
            raise ConfigError("rotation_deg", f"must be finite, got {self.rotation_deg}")
        if not (math.isfinite(self.contrast) and self.contrast >= 0):
            raise ConfigError("contrast", f"must be finite and >= 0, got {self.contrast}")
        if not (math.isfinite(self.noise_sigma) and self.noise_sigma >= 0):
            raise ConfigError("noise_sigma", f"must be finite and >= 0, got {self.noise_sigma}")

    @property
    def is_identity(self) -> bool:
        return self.rotation_deg % 360 == 0 and self.contrast == 1.0 and self.noise_sigma == 0 and not self.invert

    def apply(self, x: NDArray[Any], rng: np.random.Generator) -> F32:
        """Apply the shift to a batch; ``rng`` draws the noise (unused when ``noise_sigma`` is 0)."""
        out = _as_f32(x)
        if self.rotation_deg % 360 != 0:
            out = rotate(out, self.rotation_deg)
        if self.contrast != 1.0:
            out = contrast(out, self.contrast)
        if self.invert:
            out = invert(out)
        if self.noise_sigma > 0:
            out = gaussian_noise(out, self.noise_sigma, rng)
        return _clip(out)  # np.clip always returns a new array

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
