"""Compressed updates: a few bits per value, stochastic rounding, error feedback (PROTOCOL.md, "Compressed updates").

A round may announce ``compression`` = ``int8`` or ``int4``. The device adds the residual its last compression
left (error feedback), scales each array by its largest magnitude into ``[-L, L]`` (L = 127 or 7), rounds
stochastically (unbiased: ``floor(x + u)``, ``u`` uniform), keeps what the rounding lost as the next residual, and
sends offset-binary codes: one byte per value (``int8``) or two values per byte (``int4``, low nibble first), with
the arrays' scales in one float32 array ``__scales`` (sorted array-name order). The hub decodes them back to
float32 before validating the update as any other. Under DP the device clips and noises first: compression is
post-processing and costs no privacy. Secure aggregation quantises into its own ring and is never compressed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.types import Head, HeadLike

__all__ = ["MODES", "SCALES", "compress", "decompress", "levels"]

MODES: Final = ("int8", "int4")
SCALES: Final = "__scales"
_LEVELS: Final = {"int8": 127, "int4": 7}


def levels(mode: str) -> int:
    """The largest code magnitude of ``mode`` (ValueError for an unknown mode)."""
    try:
        return _LEVELS[mode]
    except KeyError:
        raise ValueError(f"unknown compression {mode!r}; known: {', '.join(MODES)}") from None


def _pack4(codes: NDArray[np.uint8]) -> NDArray[np.uint8]:
    flat = codes.ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def _unpack4(packed: NDArray[np.uint8], size: int) -> NDArray[np.uint8]:
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:size]


def compress(delta: HeadLike, mode: str, rng: np.random.Generator, residual: HeadLike | None = None
             ) -> tuple[dict[str, NDArray[np.generic]], Head]:
    """``delta`` (plus ``residual``) as the wire's code arrays and ``__scales``; and the new residual."""
    top = levels(mode)
    names = sorted(delta)
    arrays: dict[str, NDArray[np.generic]] = {}
    scales = np.zeros(len(names), np.float32)
    left: Head = {}
    for i, name in enumerate(names):
        v = np.asarray(delta[name], dtype=np.float64)
        if residual is not None and name in residual and np.shape(residual[name]) == v.shape:
            v = v + np.asarray(residual[name], dtype=np.float64)
        peak = float(np.max(np.abs(v))) if v.size else 0.0
        scale = np.float32(peak / top if peak > 0 and math.isfinite(peak) else 1.0)
        q = np.clip(np.floor(v / float(scale) + rng.random(v.shape)), -top, top)
        left[name] = (v - q * float(scale)).astype(np.float32)
        codes = (q + top).astype(np.uint8)
        arrays[name] = codes if mode == "int8" else _pack4(codes)
        scales[i] = scale
    arrays[SCALES] = scales
    return arrays, left


def decompress(arrays: Mapping[str, NDArray[np.generic]], shapes: Mapping[str, tuple[int, ...]], mode: str) -> Head:
    """The float32 delta of a compressed update over a head of ``shapes``; ValueError naming what is wrong."""
    top = levels(mode)
    names = sorted(shapes)
    if set(arrays) != {*names, SCALES}:
        raise ValueError(f"a {mode} update carries {sorted(arrays)}, expected {sorted({*names, SCALES})}")
    scales = np.asarray(arrays[SCALES])
    if scales.dtype != np.float32 or scales.shape != (len(names),) or not np.isfinite(scales).all():
        raise ValueError(f"{SCALES}: {len(names)} finite float32 scales expected")
    out: Head = {}
    for i, name in enumerate(names):
        shape = tuple(shapes[name])
        size = math.prod(shape)
        codes = np.asarray(arrays[name])
        want = (size,) if mode == "int8" else ((size + 1) // 2,)
        if codes.dtype != np.uint8 or codes.size != want[0]:
            raise ValueError(f"{name}: {want[0]} uint8 codes expected, got {codes.size} of {codes.dtype}")
        flat = codes.ravel() if mode == "int8" else _unpack4(codes.ravel(), size)
        if flat.size and int(flat.max()) > 2 * top:
            raise ValueError(f"{name}: a code above {2 * top}")
        out[name] = ((flat.astype(np.float32) - top) * scales[i]).reshape(shape)
    return out
