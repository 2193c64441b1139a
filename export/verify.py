"""Every export checks itself: each artifact, run the way devices run it, against the source model.

Samples: the calibration data when given; else, for a backbone that starts by normalising its input (a Keras
``Normalization`` layer, as ``fedge pretrain --data`` builds), seeded inputs drawn around the statistics it holds
(inputs many standard deviations away from any data would measure float32 rounding on huge logits, not the
conversion); else seeded uniform random inputs in [0, 1). The reference is the source
(Keras ``backbone(x, training=False)``, or the source ONNX file through onnxruntime) and the head's forward
pass in float64. Per artifact: the largest absolute difference of the features and of the logits (through the
trainer that uses it: LiteRT ``model.tflite``, ONNX Runtime training ``ort/head`` over ``backbone.onnx``, the
NumPy head over ``backbone.onnx``), and of the loss of one training step on the reference features.
Float artifacts must agree within :data:`FLOAT_TOL`; a quantised backbone must give the float model's top-1
class on at least :data:`QUANT_MIN_AGREEMENT` of the samples (its feature difference is printed, not bounded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.core.losses import softmax_xent
from fedge.export.split import Split
from fedge.protocol.errors import ConfigError

__all__ = ["FLOAT_TOL", "QUANT_MIN_AGREEMENT", "Check", "input_statistics", "reference_features", "sample_inputs",
           "verify_export"]

FLOAT_TOL = 1e-4
#: Top-1 agreement of a quantised backbone (int8 or dynamic-range) with the float source, on the samples.
QUANT_MIN_AGREEMENT = 0.9
SAMPLES = 64

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class Check:
    """One artifact against the source: max abs differences (``None``: not measured) and the verdict."""

    artifact: str
    features: float | None
    logits: float | None
    loss: float | None
    agreement: float | None = None
    quantized: bool = False

    @property
    def ok(self) -> bool:
        if self.quantized:
            return self.agreement is not None and self.agreement >= QUANT_MIN_AGREEMENT and self._loss_ok()
        return all(v is None or v <= FLOAT_TOL for v in (self.features, self.logits)) and self._loss_ok()

    def _loss_ok(self) -> bool:
        return self.loss is None or self.loss <= FLOAT_TOL

    def line(self) -> str:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.2e}"

        limit = (f"top-1 agreement {self.agreement:.3f} (>= {QUANT_MIN_AGREEMENT})" if self.quantized and
                 self.agreement is not None else f"limit {FLOAT_TOL:.0e}")
        verdict = "ok" if self.ok else "FAILED"
        return (f"  {self.artifact:34s} features {fmt(self.features):>9s}  logits {fmt(self.logits):>9s}  "
                f"train-step loss {fmt(self.loss):>9s}  {limit}  {verdict}")


def sample_inputs(split: Split, calibration: F32 | None, seed: int = 0) -> F32:
    """Up to :data:`SAMPLES` calibration rows; else, when the backbone normalises its input, ``mean + std * z``
    (``z`` seeded standard normal) with the statistics it holds; else seeded uniform [0, 1) inputs of the model's
    shape."""
    if calibration is not None and len(calibration):
        return np.ascontiguousarray(calibration[:SAMPLES], dtype=np.float32)
    rng = np.random.default_rng(seed)
    stats = input_statistics(split)
    if stats is not None:
        mean, std = stats
        z = rng.standard_normal((SAMPLES, *split.input_shape))
        return np.ascontiguousarray(mean + std * z, dtype=np.float32)
    return rng.random((SAMPLES, *split.input_shape), dtype=np.float32)


def input_statistics(split: Split) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    """``(mean, std)`` of one input, broadcast to the input shape, when a Keras ``Normalization`` layer (not
    inverted) takes the backbone's input itself; else None."""
    if split.keras_backbone is None:
        return None
    for layer in split.keras_backbone.layers:
        if type(layer).__name__ != "Normalization" or getattr(layer, "invert", False) or layer.mean is None:
            continue
        nodes = getattr(layer, "_inbound_nodes", [])
        if not nodes or not all(type(t._keras_history[0]).__name__ == "InputLayer" for t in nodes[0].input_tensors):
            continue
        try:
            mean = np.broadcast_to(np.asarray(layer.mean, dtype=np.float64)[0], split.input_shape)
            var = np.broadcast_to(np.asarray(layer.variance, dtype=np.float64)[0], split.input_shape)
        except ValueError:  # statistics of another shape: not this input's
            continue
        return mean, np.sqrt(np.maximum(var, 0.0))
    return None


def reference_features(split: Split, x: F32) -> F32:
    """The source's features: the Keras backbone, or the source ONNX graph in onnxruntime."""
    if split.keras_backbone is not None:
        return np.asarray(split.keras_backbone(x, training=False), dtype=np.float32)
    from fedge.runtime.trainers.ort_shim import import_onnxruntime

    ort = import_onnxruntime()
    sess = ort.InferenceSession(split.onnx_backbone.SerializeToString(), providers=["CPUExecutionProvider"])
    out: F32 = sess.run(None, {"x": x})[0]
    return np.asarray(out, dtype=np.float32)


def _head64(head: dict[str, F32], acts: tuple[str, ...], f: F32) -> NDArray[np.float64]:
    """The head's logits in float64 (a conv head: the NumPy head's float32 forward pass)."""
    if any(v.ndim == 4 for v in head.values()):
        from fedge.runtime.trainers.numpy_head import head_forward

        return head_forward(head, f).astype(np.float64)
    a = np.asarray(f, dtype=np.float64)
    for i, act in enumerate(acts):
        a = a @ head[f"h{i}_kernel"].astype(np.float64) + head[f"h{i}_bias"]
        if act == "relu":
            a = np.maximum(a, 0.0)
    return a


def _check_trainer(name: str, trainer: Any, split: Split, x: F32, feats: F32, y: NDArray[np.int64],
                   quantized: bool) -> Check:
    ref_logits = _head64(split.head, split.head_activations, feats)
    got_feats = trainer.features(x)
    got_logits = trainer.logits(got_feats)
    b = min(trainer.batch_size, len(x))
    want_loss, _ = softmax_xent(ref_logits[:b].astype(np.float32), y[:b], np.ones(b, np.float32))
    got_loss = trainer.train_step(feats[:b], y[:b], 0.0)
    agreement = float(np.mean(np.argmax(got_logits, axis=1) == np.argmax(ref_logits, axis=1)))
    return Check(name, float(np.abs(got_feats - feats).max()), float(np.abs(got_logits - ref_logits).max()),
                 abs(got_loss - want_loss), agreement if quantized else None, quantized)


def verify_export(out_dir: Path, split: Split, x: F32, *, quantized: bool,
                  report: Callable[[str], None] | None = None) -> list[Check]:
    """Run every artifact in ``out_dir`` against the source; ``ConfigError`` (field ``verification``) on a miss."""
    from fedge.runtime.trainers import available_backends, open_trainer

    feats = reference_features(split, x)
    y = np.argmax(_head64(split.head, split.head_activations, feats), axis=1).astype(np.int64)
    y = (y + np.arange(len(y))) % split.num_classes  # varied labels: a non-trivial loss
    checks: list[Check] = []
    have = available_backends()
    plan = [("litert", "model.tflite" + (" + backbone.tflite" if quantized else ""), "model.tflite", quantized),
            ("ort", "ort/head + backbone.onnx", "ort/head/checkpoint", False),
            ("numpy", "head.npz + backbone.onnx", "backbone.onnx", False)]
    for backend, label, needs, quant in plan:
        if backend not in have or not (out_dir / needs).is_file():
            continue
        if backend == "numpy" and not _onnxruntime_importable():
            continue
        checks.append(_check_trainer(label, open_trainer(out_dir, backend), split, x, feats, y, quant))
    if not checks:
        raise ConfigError("verification", "no runtime could run the exported artifacts (install ai-edge-litert or "
                          "onnxruntime-training-cpu)")
    for c in checks:
        if report is not None:
            report(c.line())
    failed = [c for c in checks if not c.ok]
    if failed:
        raise ConfigError("verification", "the exported artifacts do not match the source model: " + "; ".join(
            c.line().strip() for c in failed) + ". Nothing was written")
    return checks


def _onnxruntime_importable() -> bool:
    from fedge.runtime.trainers.backbone import onnxruntime_available

    return onnxruntime_available()
