"""The type aliases of fedge, defined once (heads, deltas, shapes, metrics).

A head is an ordered mapping of named float32 arrays (``h0_kernel``, ``h0_bias``, ...; ARCHITECTURE.md); a
delta is a head-shaped difference (float32 on the wire, any float dtype in the hub's sums).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

F32: TypeAlias = NDArray[np.float32]
F64: TypeAlias = NDArray[np.float64]
I64: TypeAlias = NDArray[np.int64]
Head: TypeAlias = dict[str, NDArray[np.float32]]
"""A head the caller owns (a fresh dict of float32 arrays)."""
HeadLike: TypeAlias = Mapping[str, NDArray[np.float32]]
"""A head read only."""
Delta: TypeAlias = Mapping[str, NDArray[Any]]
"""A head-shaped update, read only, any float dtype."""
Shapes: TypeAlias = Mapping[str, tuple[int, ...]]
Metrics: TypeAlias = dict[str, float]

__all__ = ["F32", "F64", "I64", "Delta", "Head", "HeadLike", "Metrics", "Shapes"]
