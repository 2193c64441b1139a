"""The on-device training model (``model.tflite``) built from a :class:`SplitModel`.

A ``tf.Module`` holds the weights as explicitly created ``tf.Variable`` objects (Keras 3 layers
inside a ``tf.Module`` are not tracked), with the signatures of ARCHITECTURE.md:
``train``, ``train_head``, ``infer``, ``features``, ``get_head``, ``set_head``. The batch size is
fixed (a dynamic batch makes the gradient emit a Flex op) and the loss is the hand-written masked
mean cross-entropy (``sparse_softmax_cross_entropy_with_logits`` is Flex too). ``train`` and
``train_head`` update the head only: the backbone is frozen (its digest names the version).
Converted with built-in ops only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fedge.export.tfenv import import_tensorflow
from fedge.export.zoo import BackboneLayer, SplitModel

__all__ = ["SIGNATURES", "build_module", "convert", "export_tflite"]

SIGNATURES: tuple[str, ...] = ("train", "train_head", "infer", "features", "get_head", "set_head")


def _act(tf: Any, x: Any, act: str) -> Any:
    if act == "relu":
        return tf.nn.relu(x)
    if act == "tanh":
        return tf.tanh(x)
    if act == "sigmoid":
        return tf.sigmoid(x)
    return x


def build_module(split: SplitModel, batch: int = 32) -> Any:
    """The ``tf.Module`` with concrete signature functions (a dict in ``module.signatures_``)."""
    import_tensorflow()
    import tensorflow as tf

    head_names = list(split.head)
    n_layers = len(split.head_activations)
    in_shape = [batch, *split.input_shape]
    feat = split.feature_dim

    class TrainModule(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(name="fedge")
            self.backbone_vars = [
                [tf.Variable(w, trainable=False, name=f"{layer.name}_{j}") for j, w in enumerate(layer.weights)]
                for layer in split.backbone
            ]
            self.head_vars = [tf.Variable(split.head[n], name=n) for n in head_names]

        def backbone(self, x: Any) -> Any:
            for layer, ws in zip(split.backbone, self.backbone_vars, strict=True):
                x = _layer(tf, layer, ws, x, batch)
            return x

        def head(self, f: Any) -> Any:
            for i, act in enumerate(split.head_activations):
                f = _act(tf, tf.matmul(f, self.head_vars[2 * i]) + self.head_vars[2 * i + 1], act)
            return f

        def _step(self, f: Any, y: Any, mask: Any, lr: Any) -> Any:
            """Loss before the update; closed-form backward (ReluGrad is not a built-in op)."""
            acts, pre = [f], []
            for i, act in enumerate(split.head_activations):
                z = tf.matmul(acts[-1], self.head_vars[2 * i]) + self.head_vars[2 * i + 1]
                pre.append(z)
                acts.append(_act(tf, z, act))
            logits = pre[-1]
            denom = tf.maximum(tf.reduce_sum(mask), 1.0)
            onehot = tf.one_hot(y, split.num_classes, dtype=tf.float32)
            logp = tf.nn.log_softmax(logits)
            loss = tf.reduce_sum(mask * -tf.reduce_sum(onehot * logp, axis=1)) / denom
            dz = (tf.exp(logp) - onehot) * tf.reshape(mask / denom, [batch, 1])
            grads: list[Any] = [None] * len(self.head_vars)
            for i in reversed(range(n_layers)):
                grads[2 * i] = tf.matmul(acts[i], dz, transpose_a=True)
                grads[2 * i + 1] = tf.reduce_sum(dz, axis=0)
                if i > 0:
                    dz = tf.matmul(dz, self.head_vars[2 * i], transpose_b=True) * tf.cast(pre[i - 1] > 0, tf.float32)
            for v, g in zip(self.head_vars, grads, strict=True):
                v.assign_sub(lr * g)
            return loss

    m = TrainModule()
    x_spec = tf.TensorSpec(in_shape, tf.float32, name="x")
    y_spec = tf.TensorSpec([batch], tf.int32, name="y")
    mask_spec = tf.TensorSpec([batch], tf.float32, name="mask")
    lr_spec = tf.TensorSpec([], tf.float32, name="lr")

    def train(x: Any, y: Any, mask: Any, lr: Any) -> Any:
        return {"loss": m._step(m.backbone(x), y, mask, lr)}

    def train_head(f: Any, y: Any, mask: Any, lr: Any) -> Any:
        return {"loss": m._step(f, y, mask, lr)}

    def infer(x: Any) -> Any:
        return {"logits": m.head(m.backbone(x))}

    def features(x: Any) -> Any:
        return {"features": m.backbone(x)}

    def get_head() -> Any:
        return {n: tf.identity(v) for n, v in zip(head_names, m.head_vars, strict=True)}

    def _set(*values: Any) -> Any:
        for v, new in zip(m.head_vars, values, strict=True):
            v.assign(new)
        return {"ok": tf.constant(1.0, tf.float32)}

    # set_head needs one keyword argument per head parameter: generate a function with those names.
    if not all(n.replace("_", "").isalnum() for n in head_names):
        raise ValueError(f"bad head parameter names {head_names}")
    args = ", ".join(head_names)
    scope: dict[str, Any] = {"_set": _set}
    exec(f"def set_head({args}):\n    return _set({args})\n", scope)
    set_specs = [tf.TensorSpec(split.head[n].shape, tf.float32, name=n) for n in head_names]

    f_spec = tf.TensorSpec([batch, feat], tf.float32, name="f")
    specs: dict[str, tuple[Any, list[Any]]] = {
        "train": (train, [x_spec, y_spec, mask_spec, lr_spec]),
        "train_head": (train_head, [f_spec, y_spec, mask_spec, lr_spec]),
        "infer": (infer, [x_spec]),
        "features": (features, [x_spec]),
        "get_head": (get_head, []),
        "set_head": (scope["set_head"], set_specs),
    }
    m.signatures_ = {
        key: tf.function(fn, input_signature=sig).get_concrete_function() for key, (fn, sig) in specs.items()
    }
    return m


def _layer(tf: Any, layer: BackboneLayer, ws: list[Any], x: Any, batch: int) -> Any:
    pad = layer.padding.upper()
    if layer.kind == "conv2d":
        y = tf.nn.conv2d(x, ws[0], strides=[1, *layer.strides, 1], padding=pad) + ws[1]
        return _act(tf, y, layer.activation)
    if layer.kind == "maxpool":
        return tf.nn.max_pool2d(x, list(layer.pool), list(layer.strides), pad)
    if layer.kind == "avgpool":
        return tf.nn.avg_pool2d(x, list(layer.pool), list(layer.strides), pad)
    if layer.kind in ("globalavg", "globalmax"):
        reduce = tf.reduce_mean if layer.kind == "globalavg" else tf.reduce_max
        return reduce(x, axis=[1, 2], keepdims=len(layer.target_shape) == 3)
    if layer.kind == "flatten":
        n = 1
        for d in x.shape[1:]:
            n *= int(d)
        return tf.reshape(x, [batch, n])
    if layer.kind == "reshape":
        return tf.reshape(x, [batch, *layer.target_shape])
    if layer.kind == "dense":
        return _act(tf, tf.matmul(x, ws[0]) + ws[1], layer.activation)
    if layer.kind == "activation":
        return _act(tf, x, layer.activation)
    if layer.kind == "affine":  # Normalization, Rescaling, BatchNormalization (folded)
        return (x - ws[0]) * ws[1] + ws[2]
    raise ValueError(f"unknown backbone layer kind {layer.kind!r}")


def convert(module: Any) -> bytes:
    """SavedModel round trip, then TFLite with resource variables and built-in ops only."""
    import_tensorflow()
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="fedge-savedmodel-") as tmp:
        tf.saved_model.save(module, tmp, signatures=module.signatures_)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(SIGNATURES))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        data: bytes = converter.convert()
    return data


def export_tflite(split: SplitModel, path: str | Path, batch: int = 32) -> Path:
    out = Path(path)
    out.write_bytes(convert(build_module(split, batch)))
    return out
