"""Backbone feature functions for trainers that do not carry their own backbone.

``open_backbone(dir)`` prefers ``backbone.onnx`` through ``onnxruntime`` (any batch
size) and falls back to the LiteRT ``features`` signature of ``model.tflite``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.protocol.errors import ArtifactError, ConfigError

__all__ = ["OnnxBackbone", "onnxruntime_available", "open_backbone"]

F32 = NDArray[np.float32]
CHUNK = 256


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


class OnnxBackbone:
    """``backbone.onnx`` in an ``onnxruntime.InferenceSession``; runs in chunks of 256 rows."""

    def __init__(self, path: str | Path) -> None:
        from fedge.runtime.trainers.ort_shim import import_onnxruntime

        ort = import_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: missing")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self._sess: Any = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"{path}: cannot load: {exc}") from exc
        self._in = self._sess.get_inputs()[0].name
        self._shape = [int(d) for d in self._sess.get_outputs()[0].shape[1:]]

    def __call__(self, x: F32) -> F32:
        x = np.asarray(x, dtype=np.float32)
        if x.shape[0] == 0:
            return np.zeros((0, *self._shape), dtype=np.float32)
        outs = [self._sess.run(None, {self._in: x[s : s + CHUNK]})[0] for s in range(0, x.shape[0], CHUNK)]
        return np.ascontiguousarray(np.concatenate(outs, axis=0), dtype=np.float32)


def open_backbone(artifacts_dir: str | Path) -> Callable[[F32], F32]:
    """A feature function for the artifacts' backbone (onnxruntime, else LiteRT)."""
    d = Path(artifacts_dir)
    if onnxruntime_available() and (d / "backbone.onnx").is_file():
        return OnnxBackbone(d / "backbone.onnx")
    from fedge.runtime.trainers._litert import BACKBONE_TFLITE, LiteRTModel, litert_available

    if not litert_available():
        raise ConfigError("backend", "numpy needs onnxruntime or ai-edge-litert to compute backbone features")
    path = d / BACKBONE_TFLITE if (d / BACKBONE_TFLITE).is_file() else d / "model.tflite"
    if not path.is_file():
        raise ConfigError("backend", f"{d} has no model.tflite (an ONNX backbone): the NumPy trainer needs "
                          "onnxruntime for backbone.onnx: pip install onnxruntime")
    model = LiteRTModel(path)
    batch = model.batch_size()
    return lambda x: model.features(x, batch)
