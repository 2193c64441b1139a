"""Pure NumPy head trainer: a head of dense layers, optionally after stride-1 SAME convolutions and a global
average pool (HWIO kernels, the last convolution block of a CNN), ReLU between layers, linear logits; trained
with the closed-form softmax cross-entropy gradient and plain backprop, in float32.

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

__all__ = ["NumpyTrainer", "conv_same", "head_forward", "head_loss_and_grads"]

F32 = NDArray[np.float32]
Layers = Sequence[tuple[F32, F32]]


def _layers(head: Mapping[str, F32], n_layers: int) -> list[tuple[F32, F32]]:
    return [(head[f"h{i}_kernel"], head[f"h{i}_bias"]) for i in range(n_layers)]


def _n_layers(head: Mapping[str, F32]) -> int:
    return sum(1 for k in head if k.endswith("_kernel"))


def _pads(w: F32) -> tuple[int, int]:
    """Top/left padding of a stride-1 SAME convolution (TF's and ONNX SAME_UPPER: the extra row goes last)."""
    return (int(w.shape[0]) - 1) // 2, (int(w.shape[1]) - 1) // 2


def _padded(a: F32, w: F32) -> F32:
    kh, kw = int(w.shape[0]), int(w.shape[1])
    pt, pl = _pads(w)
    return np.pad(a, ((0, 0), (pt, kh - 1 - pt), (pl, kw - 1 - pl), (0, 0)))


def conv_same(a: F32, w: F32) -> F32:
    """Stride-1 SAME convolution, NHWC input, HWIO kernel (no bias)."""
    n, h, wd, _ = a.shape
    ap = _padded(a, w)
    out = np.zeros((n, h, wd, w.shape[3]), dtype=np.float32)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            out += ap[:, i : i + h, j : j + wd, :] @ w[i, j]
    return out


def _conv_backward(a: F32, w: F32, dz: F32, need_input: bool) -> tuple[F32, F32 | None]:
    """Gradients of :func:`conv_same` with respect to the kernel and (``need_input``) to its input."""
    _, h, wd, c = a.shape
    ap = _padded(a, w)
    flat_dz = dz.reshape(-1, dz.shape[3])
    dw = np.empty_like(w)
    dap = np.zeros_like(ap) if need_input else None
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            dw[i, j] = ap[:, i : i + h, j : j + wd, :].reshape(-1, c).T @ flat_dz
            if dap is not None:
                dap[:, i : i + h, j : j + wd, :] += dz @ w[i, j].T
    if dap is None:
        return dw, None
    pt, pl = _pads(w)
    return dw, np.ascontiguousarray(dap[:, pt : pt + h, pl : pl + wd, :])


def _forward(head: Mapping[str, F32], f: F32) -> tuple[list[F32], list[F32], list[tuple[int, ...] | None]]:
    """Per layer: its input, its pre-activation, and the [N, H, W, C] shape a global average pool reduced first."""
    layers = _layers(head, _n_layers(head))
    a = np.asarray(f, dtype=np.float32)
    inputs: list[F32] = []
    pre: list[F32] = []
    pooled: list[tuple[int, ...] | None] = []
    for i, (w, b) in enumerate(layers):
        pool = None
        if w.ndim == 4:
            if a.ndim != 4:
                raise ArtifactError(f"head layer {i} is a convolution but its input has shape {a.shape[1:]}")
            z = conv_same(a, w) + b
        else:
            if a.ndim == 4:  # the global average pool between the convolutions and the dense layers
                pool = a.shape
                a = a.mean(axis=(1, 2), dtype=np.float32)
            z = a @ w + b
        inputs.append(a)
        pre.append(z)
        pooled.append(pool)
        a = np.maximum(z, np.float32(0)) if i < len(layers) - 1 else z
    return inputs, pre, pooled


def head_forward(head: Mapping[str, F32], f: F32) -> F32:
    """Logits of the head: its layers in order (HWIO kernels: stride-1 SAME convolutions, then a global average
    pool before the first dense layer), ReLU between layers, none after the last."""
    if all(v.ndim <= 2 for v in head.values()):  # the common dense head: no bookkeeping
        layers = _layers(head, _n_layers(head))
        a = np.asarray(f, dtype=np.float32)
        for i, (w, b) in enumerate(layers):
            a = a @ w + b
            if i < len(layers) - 1:
                a = np.maximum(a, np.float32(0))
        return a
    return _forward(head, f)[1][-1]


def head_loss_and_grads(
    head: Mapping[str, F32], f: F32, y: NDArray[np.integer], mask: F32
) -> tuple[float, dict[str, F32]]:
    """Loss and the gradient of every head parameter (same names) by backprop."""
    n_layers = _n_layers(head)
    layers = _layers(head, n_layers)
    inputs, pre, pooled = _forward(head, f)
    loss, dz = softmax_xent(pre[-1], y, mask)
    grads: dict[str, F32] = {}
    for i in range(n_layers - 1, -1, -1):
        w = layers[i][0]
        if w.ndim == 4:
            grads[f"h{i}_kernel"], da = _conv_backward(inputs[i], w, dz, need_input=i > 0)
            grads[f"h{i}_bias"] = dz.sum(axis=(0, 1, 2))
        else:
            grads[f"h{i}_kernel"] = inputs[i].T @ dz
            grads[f"h{i}_bias"] = dz.sum(axis=0)
            da = dz @ w.T if i > 0 else None
            shape = pooled[i]
            if da is not None and shape is not None:  # back through the global average pool
                da = np.broadcast_to(da[:, None, None, :] / np.float32(shape[1] * shape[2]), shape)
        if i > 0 and da is not None:
            dz = (da * (pre[i - 1] > 0)).astype(np.float32)
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
