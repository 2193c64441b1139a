"""LiteRT trainer: the ``train_head``/``features``/``get_head``/``set_head`` signatures of ``model.tflite``
(features from ``backbone.tflite`` instead when the export ships a quantised backbone).

``train_head`` has a fixed batch B: a short batch is zero-padded and masked. Logits are
the NumPy head forward pass on the head read back with ``get_head`` (cached until the next
step or ``set_head``): cheaper than a padded pass and exactly the same maths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedge.core.trainer import check_head, pad_rows
from fedge.runtime.trainers._litert import BACKBONE_TFLITE, LiteRTModel
from fedge.runtime.trainers.numpy_head import head_forward

__all__ = ["LiteRTTrainer"]

F32 = NDArray[np.float32]


class LiteRTTrainer:
    """The default :class:`Trainer`: the exported ``model.tflite`` run by LiteRT (built-in ops only, no TensorFlow).

    Guarantees the Trainer contract: ``train_step`` takes 1..``batch_size`` rows (padded and masked to the
    fixed training batch), updates only the head with plain SGD, and returns the masked mean loss; the
    backbone is never changed; ``get_head``/``set_head`` read and write the head as named float32 arrays.
    """

    name = "litert"

    def __init__(self, model: LiteRTModel, spec: Sequence[tuple[str, tuple[int, ...]]], batch_size: int,
                 backbone: LiteRTModel | None = None) -> None:
        self._m = model
        self._backbone = backbone or model  # a quantised export keeps its features in backbone.tflite
        self._spec = list(spec)
        self.batch_size = batch_size
        self._train = model.runner("train_head")
        self._get = model.runner("get_head")
        self._set = model.runner("set_head")
        self._head: dict[str, F32] | None = None
        self._mask_full = np.ones(batch_size, dtype=np.float32)

    @classmethod
    def open(cls, artifacts_dir: str | Path, num_threads: int | None = None) -> LiteRTTrainer:
        from fedge.protocol.manifest import load_manifest

        d = Path(artifacts_dir)
        m = load_manifest(d)
        model = LiteRTModel(d / "model.tflite", num_threads=num_threads)
        backbone = LiteRTModel(d / BACKBONE_TFLITE, num_threads=num_threads) if BACKBONE_TFLITE in m.files else None
        return cls(model, [(p.name, tuple(p.shape)) for p in m.head], m.train_batch, backbone)

    def features(self, x: F32) -> F32:
        return self._backbone.features(x, self.batch_size)

    def get_head(self) -> dict[str, F32]:
        if self._head is None:
            out = self._get()
            self._head = {name: np.array(out[name], dtype=np.float32) for name, _ in self._spec}
        return {k: v.copy() for k, v in self._head.items()}

    def set_head(self, head: Mapping[str, F32]) -> None:
        checked = check_head(head, self._spec)
        self._set(**checked)
        self._head = None

    def train_step(self, f: F32, y: NDArray[np.int64], lr: float) -> float:
        n = f.shape[0]
        b = self.batch_size
        if not 1 <= n <= b:
            raise ValueError(f"train_step takes 1..{b} rows, got {n}")
        if n == b:
            mask = self._mask_full
        else:
            mask = np.zeros(b, dtype=np.float32)
            mask[:n] = 1.0
        out = self._train(
            f=pad_rows(np.asarray(f, dtype=np.float32), b),
            y=pad_rows(np.asarray(y, dtype=np.int32), b),
            mask=mask,
            lr=np.array(lr, dtype=np.float32),
        )
        self._head = None
        return float(out["loss"])

    def logits(self, f: F32) -> F32:
        self.get_head()
        assert self._head is not None
        return head_forward(self._head, f)
