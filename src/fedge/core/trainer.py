"""The ``Trainer`` protocol every on-device back-end implements, and small shared helpers.

A trainer owns a frozen backbone (``features``) and a trainable head (dense layers, optionally after the last
convolution block). Heads are ordered mappings ``h{i}_kernel``/``h{i}_bias`` of float32 arrays (see
ARCHITECTURE.md).
The loss is the masked mean softmax cross-entropy and the optimiser plain SGD everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.errors import ArtifactError

__all__ = ["BACKENDS", "Trainer", "check_head", "pad_rows"]

BACKENDS: tuple[str, ...] = ("litert", "ort", "numpy")


@runtime_checkable
class Trainer(Protocol):
    """What the agent needs from a training back-end."""

    name: str
    batch_size: int

    def features(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """Backbone features ``[N, F]`` (``[N, H, W, C]`` before a conv head) for any ``N`` (batches internally)."""
        ...

    def get_head(self) -> dict[str, NDArray[np.float32]]:
        """A copy of the current head parameters, in head order."""
        ...

    def set_head(self, head: Mapping[str, NDArray[np.float32]]) -> None:
        """Replace every head parameter (names and shapes must match the manifest)."""
        ...

    def train_step(self, f: NDArray[np.float32], y: NDArray[np.int64], lr: float) -> float:
        """One SGD step on 1..batch_size rows; returns the (masked mean) loss before the update."""
        ...

    def logits(self, f: NDArray[np.float32]) -> NDArray[np.float32]:
        """Head forward pass on features ``[N, F]`` -> ``[N, C]``."""
        ...


def pad_rows(a: NDArray[np.generic], rows: int) -> NDArray[np.generic]:
    """``a`` padded with zero rows to exactly ``rows`` rows (``a`` must not be longer)."""
    n = a.shape[0]
    if n == rows:
        return a
    if n > rows:
        raise ValueError(f"{n} rows do not fit a batch of {rows}")
    out = np.zeros((rows, *a.shape[1:]), dtype=a.dtype)
    out[:n] = a
    return out


def check_head(
    head: Mapping[str, NDArray[np.float32]], spec: Sequence[tuple[str, tuple[int, ...]]]
) -> dict[str, NDArray[np.float32]]:
    """``head`` as contiguous float32 arrays in ``spec`` order; ``ArtifactError`` on a mismatch."""
    names = [n for n, _ in spec]
    if sorted(head) != sorted(names):
        raise ArtifactError(f"head parameters {sorted(head)} do not match the model's {names}")
    out: dict[str, NDArray[np.float32]] = {}
    for name, shape in spec:
        arr = np.array(head[name], dtype=np.float32, order="C", copy=True)
        if tuple(arr.shape) != tuple(shape):
            raise ArtifactError(f"head parameter {name}: shape {tuple(arr.shape)}, the model expects {tuple(shape)}")
        out[name] = arr
    return out
