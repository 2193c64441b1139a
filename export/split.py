"""Split a source model into a frozen backbone and a trainable dense head (:class:`Split`).

Keras (:func:`split_keras`): any single-input, single-output Sequential, Functional or nested model. The head
is the chain of layers from ``head_start`` (a top-level layer name) to the output: optionally the last
convolution block (Conv2D layers with stride 1 and SAME padding, then GlobalAveragePooling2D), then Dense
layers; ReLU between layers, the last one linear (a final softmax is dropped: the head outputs logits); Dropout
and the other inference-time identities are skipped. The backbone is everything before the cut, whatever its layers: a
Keras sub-model from the input to the head's input, converted as a whole by tf2onnx and the LiteRT converter.

ONNX (:func:`fedge.export.onnx_source.split_onnx`) builds the same :class:`Split` around an ONNX feature
extractor and a fresh head.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.export.tfenv import import_tensorflow
from fedge.export.zoo import default_head_start
from fedge.protocol.errors import ConfigError

__all__ = ["IDENTITY_LAYERS", "Split", "fresh_head", "split_keras"]

F32 = NDArray[np.float32]

#: Keras layers that are the identity at inference (skipped in the head).
IDENTITY_LAYERS: tuple[str, ...] = (
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
)


@dataclass(frozen=True)
class Split:
    """A frozen backbone ``x -> features [N, F]`` (Keras sub-model or ONNX graph) and a dense head.

    ``layout`` is ``NHWC`` or ``NCHW`` for image inputs (rank 3), else ``""``. ``backbone_weights`` are the
    arrays ``backbone_sha256`` hashes, in a fixed order.
    """

    name: str
    input_shape: tuple[int, ...]
    layout: str
    head: dict[str, F32]
    head_activations: tuple[str, ...]
    backbone_weights: tuple[F32, ...]
    keras_backbone: Any = None
    onnx_backbone: Any = None
    feature_shape: tuple[int, ...] = ()  # the cut tensor per sample: (F,), or (H, W, C) before a conv head

    @property
    def features(self) -> tuple[int, ...]:
        return self.feature_shape or (int(self.head["h0_kernel"].shape[0]),)

    @property
    def feature_dim(self) -> int:
        return int(np.prod(self.features))

    @property
    def conv_head(self) -> bool:
        return self.head["h0_kernel"].ndim == 4

    @property
    def num_classes(self) -> int:
        return int(self.head[f"h{len(self.head_activations) - 1}_bias"].shape[0])


def _dims(shape: Any) -> list[int | None]:
    return [None if d is None else int(d) for d in shape]


def _head_chain(model: Any, start: str) -> tuple[list[Any], Any]:
    """The layers from ``start`` to the output (in order) and the tensor feeding ``start`` (the features).

    Walks back from the output through each tensor's ``_keras_history``: a layer of a loaded model can have
    several inbound nodes, so ``layer.input`` is not reliable.
    """
    tensor = model.outputs[0]
    chain: list[Any] = []
    while True:
        layer, node_index, _ = tensor._keras_history
        if type(layer).__name__ == "InputLayer":
            raise ConfigError("head_start", f"layer {start!r} is not on the path from the input to the output")
        inputs = layer._inbound_nodes[node_index].input_tensors
        chain.append(layer)
        if layer.name == start:
            if len(inputs) != 1:
                raise ConfigError("head_start", f"head layer {start!r} has {len(inputs)} inputs: the head must start "
                                  "on one feature tensor")
            chain.reverse()
            return chain, inputs[0]
        if len(inputs) != 1:
            raise ConfigError("head_start", f"head layer {layer.name!r} ({type(layer).__name__}) has {len(inputs)} "
                              f"inputs: the layers from {start!r} to the output must be a chain")
        tensor = inputs[0]


def _dense_weights(layer: Any) -> tuple[F32, F32]:
    ws = [np.ascontiguousarray(np.asarray(w, dtype=np.float32)) for w in layer.get_weights()]
    if not layer.use_bias:
        ws.append(np.zeros(ws[0].shape[-1], dtype=np.float32))
    return ws[0], ws[1]


def _check_conv(layer: Any) -> None:
    cfg = layer.get_config()
    bad = []
    if tuple(cfg.get("strides", (1, 1))) != (1, 1) or tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1):
        bad.append("strides and dilation must be 1")
    if cfg.get("padding") != "same":
        bad.append("padding must be 'same'")
    if cfg.get("groups", 1) != 1 or cfg.get("data_format", "channels_last") != "channels_last":
        bad.append("only ungrouped channels_last convolutions")
    if bad:
        raise ConfigError("head_start", f"head layer {layer.name!r} (Conv2D): {'; '.join(bad)} in a trainable "
                          "head; move --head-start after it (it then belongs to the frozen backbone)")


def _head_kinds(layers: list[Any]) -> list[Any]:
    """The head's layers without inference-time identities, checked to be Conv2D* [GlobalAveragePooling2D] Dense+."""
    kept = [layer for layer in layers if type(layer).__name__ not in IDENTITY_LAYERS]
    kinds = [type(layer).__name__ for layer in kept]
    n_conv = 0
    while n_conv < len(kinds) and kinds[n_conv] == "Conv2D":
        n_conv += 1
    rest = kinds[n_conv:]
    if n_conv and rest[:1] == ["GlobalAveragePooling2D"] and not kept[n_conv].get_config().get("keepdims", False):
        rest = rest[1:]
    elif n_conv:
        raise ConfigError("head_start", f"head layer {kept[n_conv - 1].name!r} (Conv2D) must be followed by "
                          "GlobalAveragePooling2D (then Dense layers) in a trainable head")
    for layer, kind in zip(kept[len(kinds) - len(rest):], rest, strict=True):
        if kind != "Dense":
            raise ConfigError("head_start", f"head layer {layer.name!r} is {kind}, not Dense: a trainable head is "
                              "[Conv2D(padding='same', strides=1)...] [GlobalAveragePooling2D] Dense...; move "
                              "--head-start after it (it then belongs to the frozen backbone)")
    if not rest:
        raise ConfigError("head_start", "the head has no Dense layer")
    for layer in kept[:n_conv]:
        _check_conv(layer)
    return [layer for layer in kept if type(layer).__name__ != "GlobalAveragePooling2D"]


def _head(layers: list[Any], features: Any) -> tuple[dict[str, F32], tuple[str, ...]]:
    params = _head_kinds(layers)
    feat_shape = _dims(features.shape)
    first = params[0]
    want = 4 if type(first).__name__ == "Conv2D" else 2
    if len(feat_shape) != want:
        takes = "an image tensor [None, H, W, C]" if want == 4 else "a flat feature vector [None, F]"
        raise ConfigError("head_start", f"head/backbone shape mismatch: head layer {first.name!r} "
                          f"({type(first).__name__}) takes {takes}, the backbone outputs "
                          f"{feat_shape}: end the backbone with GlobalAveragePooling2D or Flatten, or move "
                          "--head-start")
    head: dict[str, F32] = {}
    acts: list[str] = []
    for i, layer in enumerate(params):
        act = layer.activation.__name__
        last = i == len(params) - 1
        if last and act not in ("linear", "softmax"):
            raise ConfigError("head_start", f"last head layer {layer.name!r} must be linear (or softmax), not {act}")
        if not last and act != "relu":
            raise ConfigError("head_start", f"head layer {layer.name!r} must use relu, not {act}")
        head[f"h{i}_kernel"], head[f"h{i}_bias"] = _dense_weights(layer)
        acts.append("linear" if last else "relu")
    return head, tuple(acts)


def split_keras(model: Any, head_start: str | None = None, name: str | None = None) -> Split:
    """Split a Keras model at the top-level layer ``head_start`` (default :func:`default_head_start`)."""
    import_tensorflow()
    import keras

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConfigError("model", f"only single-input single-output models can be exported; {model.name!r} has "
                          f"{len(model.inputs)} input(s) and {len(model.outputs)} output(s)")
    start = head_start or default_head_start(model)
    names = [layer.name for layer in model.layers]
    if start not in names:
        raise ConfigError("head_start", f"no layer named {start!r} (top-level layers: {', '.join(names)})")
    if type(model.get_layer(start)).__name__ == "InputLayer":
        raise ConfigError("head_start", f"{start!r} is the input layer: the backbone would be empty")
    layers, features = _head_chain(model, start)
    head, acts = _head(layers, features)
    feat_shape = tuple(int(d) for d in _dims(features.shape)[1:] if d is not None)
    if feat_shape[-1] != head["h0_kernel"].shape[-2]:
        raise ConfigError("head_start", f"head/backbone shape mismatch: the backbone outputs [None, "
                          f"{', '.join(map(str, feat_shape))}], head layer {start!r} takes "
                          f"{head['h0_kernel'].shape[-2]} channels/features")
    backbone = keras.Model(model.inputs[0], features, name=f"{model.name}_backbone")
    input_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    if any(d <= 0 for d in input_shape):
        raise ConfigError("model", f"the input shape must be fixed, got {list(model.inputs[0].shape)}")
    weights = tuple(np.ascontiguousarray(np.asarray(w.numpy(), dtype=np.float32)) for w in backbone.weights)
    return Split(
        name=name or str(model.name),
        input_shape=input_shape,
        layout="NHWC" if len(input_shape) == 3 else "",
        head=head,
        head_activations=acts,
        backbone_weights=weights,
        keras_backbone=backbone,
        feature_shape=feat_shape,
    )


def fresh_head(feature_dim: int, num_classes: int, hidden: int, rng: np.random.Generator
               ) -> tuple[dict[str, F32], tuple[str, ...]]:
    """A new head: Glorot-uniform kernels and zero biases; ``hidden`` > 0 adds one ReLU layer of that width."""
    widths = [feature_dim, *([hidden] if hidden > 0 else []), num_classes]
    head: dict[str, F32] = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        head[f"h{i}_kernel"] = rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)
        head[f"h{i}_bias"] = np.zeros(fan_out, dtype=np.float32)
    acts = ("relu",) * (len(widths) - 2) + ("linear",)
    return head, acts
