"""ONNX Runtime on-device training trainer over the ``ort/head/`` artifacts.

The head is trained with ``Module``/``Optimizer`` (SGD optimiser model); backbone
features come from ``backbone.onnx`` in a plain ``InferenceSession``. ORT's
CrossEntropy is a plain mean over the rows given, so a short last batch is simply a
smaller batch (which equals the masked mean of the padded batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.core.trainer import check_head
from fedge.protocol.errors import ArtifactError
from fedge.runtime.trainers.backbone import OnnxBackbone
from fedge.runtime.trainers.numpy_head import head_forward
from fedge.runtime.trainers.ort_shim import import_onnxruntime, training_api

__all__ = ["OrtTrainer"]

F32 = NDArray[np.float32]
_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


class OrtTrainer:
    """A :class:`Trainer` on ONNX Runtime on-device training artifacts (``ort/head/``), where its wheels exist.

    Same contract as the LiteRT trainer (head-only SGD, padded and masked batches, named float32 head);
    backbone features come from ``backbone.onnx``. Imports neither torch nor onnx.
    """

    name = "ort"

    def __init__(
        self, head_dir: Path, backbone: OnnxBackbone, spec: Sequence[tuple[str, tuple[int, ...]]], batch_size: int
    ) -> None:
        for f in _FILES:
            if not (head_dir / f).exists():
                raise ArtifactError(f"{head_dir / f}: missing")
        api = training_api()
        # ORT logs a harmless shape-merge warning for the SGD optimizer graph at load: keep stderr clean.
        import_onnxruntime().set_default_logger_severity(3)
        try:
            self._state: Any = api.CheckpointState.load_checkpoint(str(head_dir / "checkpoint"))
            self._module: Any = api.Module(
                str(head_dir / "training_model.onnx"), self._state, str(head_dir / "eval_model.onnx"), device="cpu"
            )
            self._opt: Any = api.Optimizer(str(head_dir / "optimizer_model.onnx"), self._module)
        except Exception as exc:  # ORT raises its own exception types
            raise ArtifactError(f"{head_dir}: cannot load the ORT training artifacts: {exc}") from exc
        self._spec = list(spec)
        names = {name for name, _ in self._state.parameters}
        missing = [n for n, _ in self._spec if n not in names]
        if missing:
            raise ArtifactError(f"{head_dir / 'checkpoint'}: no parameters {missing} (has {sorted(names)})")
        self._backbone = backbone
        self.batch_size = batch_size
        self._lr: float | None = None
        self._module.train()

    @classmethod
    def open(cls, artifacts_dir: str | Path) -> OrtTrainer:
        from fedge.protocol.manifest import load_manifest

        d = Path(artifacts_dir)
        m = load_manifest(d)
        spec = [(p.name, tuple(p.shape)) for p in m.head]
        return cls(d / "ort" / "head", OnnxBackbone(d / "backbone.onnx"), spec, m.train_batch)

    def features(self, x: F32) -> F32:
        return self._backbone(x)

    def get_head(self) -> dict[str, F32]:
        params = self._state.parameters
        return {name: np.array(params[name].data, dtype=np.float32).reshape(shape) for name, shape in self._spec}

    def set_head(self, head: Mapping[str, F32]) -> None:
        checked = check_head(head, self._spec)
        params = self._state.parameters
        for name, arr in checked.items():
            params[name] = arr

    def train_step(self, f: F32, y: NDArray[np.int64], lr: float) -> float:
        n = f.shape[0]
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"train_step takes 1..{self.batch_size} rows, got {n}")
        if self._lr != lr:
            self._opt.set_learning_rate(float(lr))
            self._lr = lr
        out = self._module(np.ascontiguousarray(f, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64))
        loss = out[0] if isinstance(out, (tuple, list)) else out
        self._opt.step()
        self._module.lazy_reset_grad()
        return float(loss)

    def logits(self, f: F32) -> F32:
        return head_forward(self.get_head(), f)
