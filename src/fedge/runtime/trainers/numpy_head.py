"""Pure NumPy head trainer: an MLP head (ReLU hidden layers, linear logits) trained with
the closed-form softmax cross-entropy gradient and plain backprop, in float32.

Backbone features come from ``backbone.onnx`` through ``onnxruntime`` when it is
importable, else from the LiteRT ``features`` signature of ``model.tflite``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedge.core.losses import softmax_xent
from fedge.core.trainer import check_head
from fedge.protocol.errors import ArtifactError

__all__ = ["NumpyTrainer", "head_forward", "head_loss_and_grads"]

F32 = NDArray[np.float32]
Layers = Sequence[tuple[F32, F32]]


def _layers(head: Mapping[str, F32], n_layers: int) -> list[tuple[F32, F32]]:
    return [(head[f"h{i}_kernel"], head[f"h{i}_bias"]) for i in range(n_layers)]


def _n_layers(head: Mapping[str, F32]) -> int:
    return sum(1 for k in head if k.endswith("_kernel"))


def head_forward(head: Mapping[str, F32], f: F32) -> F32:
    """Logits of the MLP head (ReLU between layers, none after the last)."""
    layers = _layers(head, _n_layers(head))
    a = np.asarray(f, dtype=np.float32)
    for i, (w, b) in enumerate(layers):
        a = a @ w + b
        if i < len(layers) - 1:
            a = np.maximum(a, np.float32(0))
    return a


def head_loss_and_grads(
    head: Mapping[str, F32], f: F32, y: NDArray[np.integer], mask: F32
) -> tuple[float, dict[str, F32]]:
    """Loss and the gradient of every head parameter (same names) by backprop."""
    n_layers = _n_layers(head)
    layers = _layers(head, n_layers)
    acts: list[F32] = [np.asarray(f, dtype=np.float32)]
    pre: list[F32] = []
    a = acts[0]
    for i, (w, b) in enumerate(layers):
        z = a @ w + b
        pre.append(z)
        a = np.maximum(z, np.float32(0)) if i < n_layers - 1 else z
        acts.append(a)
    loss, dz = softmax_xent(acts[-1], y, mask)
    grads: dict[str, F32] = {}
    for i in range(n_layers - 1, -1, -1):
        grads[f"h{i}_kernel"] = acts[i].T @ dz
        grads[f"h{i}_bias"] = dz.sum(axis=0)
        if i > 0:
            dz = (dz @ layers[i][0].T) * (pre[i - 1] > 0)
    return loss, grads


class NumpyTrainer:
    """Trainer with the head in NumPy and any backbone feature function."""

    name = "numpy"

    def __init__(
        self,
        head: Mapping[str, F32],
        spec: Sequence[tuple[str, tuple[int, ...]]],
        activations: Sequence[str],
        batch_size: int,
        backbone: Callable[[F32], F32],
    ) -> None:
        n_layers = len(spec) // 2
        expected = ["relu"] * (n_layers - 1) + ["linear"]
        if list(activations) != expected:
            raise ArtifactError(f"the NumPy head supports activations {expected}, the model has {list(activations)}")
        self._spec = list(spec)
        self._head = check_head(head, self._spec)
        self.batch_size = batch_size
        self._backbone = backbone

    @classmethod
    def open(cls, artifacts_dir: str | Path) -> NumpyTrainer:
        """Open from an artifacts directory (head from ``head.npz``)."""
        from fedge.protocol.manifest import load_head, load_manifest
        from fedge.runtime.trainers.backbone import open_backbone

        m = load_manifest(artifacts_dir)
        spec = [(p.name, tuple(p.shape)) for p in m.head]
        return cls(load_head(artifacts_dir), spec, m.head_activations, m.train_batch, open_backbone(artifacts_dir))

    def features(self, x: F32) -> F32:
        return self._backbone(x)

    def get_head(self) -> dict[str, F32]:
        return {k: v.copy() for k, v in self._head.items()}

    def set_head(self, head: Mapping[str, F32]) -> None:
        self._head = check_head(head, self._spec)

    def train_step(self, f: F32, y: NDArray[np.int64], lr: float) -> float:
        n = f.shape[0]
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"train_step takes 1..{self.batch_size} rows, got {n}")
        mask = np.ones(n, dtype=np.float32)
        loss, grads = head_loss_and_grads(self._head, np.asarray(f, dtype=np.float32), np.asarray(y), mask)
        lr32 = np.float32(lr)
        for k, g in grads.items():
            self._head[k] -= lr32 * g
        return loss

    def logits(self, f: F32) -> F32:
        return head_forward(self._head, f)
