"""Model zoo (Keras builders) and the split of a Keras chain model into a NumPy backbone + head.

The split (:class:`SplitModel`) is plain NumPy: the TFLite and ONNX builders both read it, so
every artifact is built from exactly the same weights. Backbone layers supported: see
:data:`BACKBONE_LAYERS`. Normalization (adapted, or given mean/variance), Rescaling and
inference-mode BatchNormalization become one ``affine`` op, ``(x - shift) * scale + offset``, with
the Keras statistics folded into float32 ``shift``/``scale``/``offset`` arrays (broadcast against
the sample shape, channels last); Dropout and the other train-only noise layers are the identity.
The head is the run of Dense layers from ``head_start`` to the end: ReLU between them, the last
linear (a softmax on the last layer is dropped: the head outputs logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.export.tfenv import import_tensorflow
from fedge.protocol.errors import ConfigError

__all__ = [
    "BACKBONE_LAYERS",
    "ZOO",
    "BackboneLayer",
    "SplitModel",
    "build_zoo_model",
    "cnn28",
    "default_head_start",
    "init_weights",
    "mlp",
    "split_model",
]

ZOO: tuple[str, ...] = ("cnn28", "mlp")
HEAD_PREFIX = "head"
ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid")

F32 = NDArray[np.float32]

#: Keras layers that are the identity at inference (dropped from the backbone).
IDENTITY_LAYERS: tuple[str, ...] = (
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
)
#: Every Keras layer class a backbone may use (the error for any other layer lists them).
BACKBONE_LAYERS: tuple[str, ...] = (
    "Dense", "Conv2D", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D",
    "Flatten", "Reshape", "ReLU", "Activation", "Normalization", "Rescaling", "BatchNormalization", *IDENTITY_LAYERS,
)
_WEIGHT_NAMES = {"affine": ("shift", "scale", "offset")}


def cnn28(num_classes: int = 10) -> Any:
    """Conv(16)-pool-Conv(32)-pool-flatten-Dense(64) backbone; head Dense(32, relu) -> Dense(C)."""
    import_tensorflow()
    import keras

    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1), name="x"),
            keras.layers.Conv2D(16, 3, activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(2, name="pool1"),
            keras.layers.Conv2D(32, 3, activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(2, name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(64, activation="relu", name="features"),
            keras.layers.Dense(32, activation="relu", name="head0"),
            keras.layers.Dense(num_classes, name="head1"),
        ],
        name="cnn28",
    )


def mlp(input_dim: int, num_classes: int = 10) -> Any:
    """Dense(64, relu) -> Dense(32, relu) backbone; head Dense(C)."""
    import_tensorflow()
    import keras

    return keras.Sequential(
        [
            keras.Input(shape=(input_dim,), name="x"),
            keras.layers.Dense(64, activation="relu", name="dense1"),
            keras.layers.Dense(32, activation="relu", name="features"),
            keras.layers.Dense(num_classes, name="head0"),
        ],
        name="mlp",
    )


def build_zoo_model(name: str, num_classes: int = 10, input_dim: int = 64) -> Any:
    if name == "cnn28":
        return cnn28(num_classes)
    if name == "mlp":
        return mlp(input_dim, num_classes)
    raise ConfigError("model", f"unknown zoo model {name!r} (known: {', '.join(ZOO)})")


@dataclass(frozen=True)
class BackboneLayer:
    """One backbone operation with NumPy weights in Keras layout (Conv2D kernel HWIO, Dense [in, out]).

    ``affine`` is ``(x - shift) * scale + offset``; its arrays broadcast against the sample
    shape (no batch axis, channels last) and have at most that many dimensions.
    """

    kind: str  # conv2d | maxpool | avgpool | globalavg | globalmax | flatten | dense | activation | reshape | affine
    name: str
    weights: tuple[F32, ...] = ()
    activation: str = "linear"
    strides: tuple[int, int] = (1, 1)
    pool: tuple[int, int] = (1, 1)
    padding: str = "valid"  # valid | same
    target_shape: tuple[int, ...] = ()  # reshape: the sample shape after it; globalavg/globalmax: the output


@dataclass(frozen=True)
class SplitModel:
    name: str
    input_shape: tuple[int, ...]
    backbone: tuple[BackboneLayer, ...]
    head: dict[str, F32] = field(default_factory=dict)
    head_activations: tuple[str, ...] = ()

    @property
    def feature_dim(self) -> int:
        return int(self.head["h0_kernel"].shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.head[f"h{len(self.head_activations) - 1}_bias"].shape[0])

    @property
    def backbone_weights(self) -> list[F32]:
        """Backbone arrays in layer order (kernel, bias): what ``backbone_digest`` hashes."""
        return [w for layer in self.backbone for w in layer.weights]

    def backbone_param_names(self) -> list[str]:
        return [f"bb{i}_{layer.name}_{_WEIGHT_NAMES.get(layer.kind, ('kernel', 'bias'))[j]}"
                for i, layer in enumerate(self.backbone) for j in range(len(layer.weights))]


def default_head_start(model: Any) -> str:
    """``head0`` when the model has it (zoo models), else the last layer (a single Dense head)."""
    names = [layer.name for layer in model.layers]
    return "head0" if "head0" in names else str(names[-1])


def _chain_layers(model: Any) -> list[Any]:
    """The model's layers from input to output; refuses anything that is not a single straight chain.

    Walks back from the output through each tensor's ``_keras_history`` (layers of a loaded model
    can have several inbound nodes, so ``layer.input`` is not reliable).
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConfigError("model", "only single-input single-output models can be exported")
    target = model.inputs[0]
    tensor = model.outputs[0]
    chain: list[Any] = []
    while tensor is not target:
        layer, node_index, _ = tensor._keras_history
        if type(layer).__name__ == "InputLayer":
            raise ConfigError("model", "the output does not depend on the model input")
        inputs = layer._inbound_nodes[node_index].input_tensors
        if len(inputs) != 1:
            raise ConfigError("model", f"layer {layer.name!r} has {len(inputs)} inputs (not a plain chain)")
        chain.append(layer)
        tensor = inputs[0]
    chain.reverse()
    others = {layer.name for layer in model.layers if type(layer).__name__ != "InputLayer"} - {
        layer.name for layer in chain
    }
    if others:
        raise ConfigError("model", f"layers {sorted(others)} are off the input->output chain (not a plain chain)")
    return chain


def _activation(layer: Any, where: str) -> str:
    act = layer.activation.__name__ if hasattr(layer, "activation") else "linear"
    if act not in ACTIVATIONS:
        known = ", ".join(ACTIVATIONS)
        raise ConfigError(where, f"layer {layer.name!r} ({type(layer).__name__}): activation {act!r} "
                          f"is not supported ({known})")
    return str(act)


def _pair(v: Any) -> tuple[int, int]:
    t = tuple(int(a) for a in (v if isinstance(v, (tuple, list)) else (v, v)))
    return (t[0], t[1])


def _weights(layer: Any) -> tuple[F32, ...]:
    ws = [np.ascontiguousarray(np.asarray(w, dtype=np.float32)) for w in layer.get_weights()]
    if getattr(layer, "use_bias", True) is False:
        ws.append(np.zeros(ws[0].shape[-1], dtype=np.float32))
    return tuple(ws)


def _unsupported(layer: Any, why: str = "is not supported in a backbone") -> ConfigError:
    kind = type(layer).__name__
    return ConfigError("model", f"backbone layer {layer.name!r} ({kind}) {why}: move it out of the model into "
                       f"your data preprocessing, or use only these layers before --head-start: "
                       f"{', '.join(BACKBONE_LAYERS)}")


def _f32(*arrays: Any) -> tuple[F32, ...]:
    return tuple(np.ascontiguousarray(np.asarray(a, dtype=np.float32)) for a in arrays)


def _affine(layer: Any, in_shape: tuple[int, ...]) -> BackboneLayer:
    """Normalization, Rescaling, BatchNormalization (inference) -> ``(x - shift) * scale + offset``."""
    kind = type(layer).__name__
    rank = len(in_shape)
    if kind == "Normalization":
        unadapted = _unsupported(layer, "is not adapted (call layer.adapt(data) before saving the model, "
                                 "or pass mean= and variance=)")
        if getattr(layer, "mean", None) is None or getattr(layer, "variance", None) is None:
            raise unadapted
        mean = np.asarray(layer.mean, dtype=np.float64)
        var = np.asarray(layer.variance, dtype=np.float64)
        if getattr(layer, "input_mean", None) is None and not mean.any() and (var == 1.0).all():
            raise unadapted  # Keras' initial statistics: the layer would silently be the identity
        if mean.ndim == rank + 1:  # Keras keeps a leading batch axis of 1
            if mean.shape[0] != 1:
                raise _unsupported(layer, "normalises over the batch axis")
            mean, var = mean[0], var[0]
        std = np.maximum(np.sqrt(var), 1e-7)  # keras.backend.epsilon(), as Normalization.call
        if getattr(layer, "invert", False):
            weights = _f32(np.zeros_like(mean), std, mean)
        else:
            weights = _f32(mean, 1.0 / std, np.zeros_like(mean))
    elif kind == "Rescaling":
        scale = np.atleast_1d(np.asarray(layer.scale, dtype=np.float64))
        offset = np.atleast_1d(np.asarray(layer.offset, dtype=np.float64))
        weights = _f32(np.zeros(1), scale, offset)
    else:  # BatchNormalization: inference mode uses the moving statistics
        axis = int(layer.axis) % (rank + 1)
        if axis == 0:
            raise _unsupported(layer, "normalises over the batch axis")
        shape = [1] * rank
        shape[axis - 1] = in_shape[axis - 1]
        mean = np.asarray(layer.moving_mean, dtype=np.float64).reshape(shape)
        var = np.asarray(layer.moving_variance, dtype=np.float64).reshape(shape)
        gamma = np.asarray(layer.gamma, dtype=np.float64).reshape(shape) if layer.scale else np.ones(shape)
        beta = np.asarray(layer.beta, dtype=np.float64).reshape(shape) if layer.center else np.zeros(shape)
        weights = _f32(mean, gamma / np.sqrt(var + float(layer.epsilon)), beta)
    for w in weights:
        if w.ndim > rank or np.broadcast_shapes(w.shape, in_shape) != in_shape:
            raise _unsupported(layer, f"has parameters of shape {w.shape} that do not broadcast to its input "
                               f"{list(in_shape)}")
    if not all(np.isfinite(w).all() for w in weights):
        raise _unsupported(layer, "has non-finite statistics (negative variance?)")
    return BackboneLayer("affine", layer.name, weights)


def _backbone_layer(layer: Any, in_shape: tuple[int, ...]) -> BackboneLayer | None:
    kind = type(layer).__name__
    if kind == "Conv2D":
        cfg = layer.get_config()
        if cfg.get("data_format", "channels_last") != "channels_last" or _pair(cfg["dilation_rate"]) != (1, 1):
            raise _unsupported(layer, "is channels_first or dilated (only channels_last, undilated convolutions)")
        if cfg.get("groups", 1) != 1:
            raise _unsupported(layer, "is a grouped convolution")
        return BackboneLayer("conv2d", layer.name, _weights(layer), _activation(layer, "model"),
                             _pair(cfg["strides"]), padding=str(cfg["padding"]))
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        cfg = layer.get_config()
        pool = _pair(cfg["pool_size"])
        strides = _pair(cfg["strides"] if cfg["strides"] is not None else pool)
        return BackboneLayer("maxpool" if kind == "MaxPooling2D" else "avgpool", layer.name, (),
                             strides=strides, pool=pool, padding=str(cfg["padding"]))
    if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        cfg = layer.get_config()
        if cfg.get("data_format", "channels_last") != "channels_last" or len(in_shape) != 3:
            raise _unsupported(layer, "is channels_first or not on an image (only channels_last [H, W, C])")
        out = (1, 1, in_shape[2]) if cfg.get("keepdims", False) else (in_shape[2],)
        return BackboneLayer("globalavg" if kind == "GlobalAveragePooling2D" else "globalmax", layer.name,
                             target_shape=out)
    if kind == "Flatten":
        return BackboneLayer("flatten", layer.name)
    if kind == "Reshape":
        target = [int(d) for d in layer.target_shape]
        if target.count(-1) == 1:  # resolve Keras' -1 now: every artifact gets the explicit shape
            known = int(np.prod([d for d in target if d != -1]))
            target[target.index(-1)] = int(np.prod(in_shape)) // max(known, 1)
        if int(np.prod(target)) != int(np.prod(in_shape)):
            raise _unsupported(layer, f"cannot reshape {list(in_shape)} to {target}")
        return BackboneLayer("reshape", layer.name, target_shape=tuple(target))
    if kind == "Dense":
        return BackboneLayer("dense", layer.name, _weights(layer), _activation(layer, "model"))
    if kind in IDENTITY_LAYERS:
        return None
    if kind == "ReLU":
        cfg = layer.get_config()
        if cfg.get("max_value") is not None or cfg.get("negative_slope", 0.0) or cfg.get("threshold", 0.0):
            raise _unsupported(layer, "has max_value/negative_slope/threshold (only the plain ReLU)")
        return BackboneLayer("activation", layer.name, activation="relu")
    if kind == "Activation":
        return BackboneLayer("activation", layer.name, activation=_activation(layer, "model"))
    if kind in ("Normalization", "Rescaling", "BatchNormalization"):
        return _affine(layer, in_shape)
    raise _unsupported(layer)


def split_model(model: Any, head_start: str | None = None, name: str | None = None) -> SplitModel:
    """Split a Keras chain model at ``head_start`` (default :func:`default_head_start`)."""
    start = head_start or default_head_start(model)
    layers = _chain_layers(model)
    names = [layer.name for layer in layers]
    if start not in names:
        raise ConfigError("head_start", f"no layer named {start!r} (layers: {', '.join(names)})")
    cut = names.index(start)
    input_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    backbone: list[BackboneLayer] = []
    shape = input_shape
    for layer in layers[:cut]:
        b = _backbone_layer(layer, shape)
        if b is not None:
            backbone.append(b)
            shape = _out_shape(b, shape)
    head: dict[str, F32] = {}
    acts: list[str] = []
    head_layers = [layer for layer in layers[cut:] if type(layer).__name__ not in IDENTITY_LAYERS]
    for i, layer in enumerate(head_layers):
        if type(layer).__name__ != "Dense":
            raise ConfigError("head_start", f"head layer {layer.name!r} is {type(layer).__name__}, not Dense")
        act = layer.activation.__name__
        last = i == len(head_layers) - 1
        if last and act not in ("linear", "softmax"):
            raise ConfigError("head_start", f"last head layer {layer.name!r} must be linear (or softmax), not {act}")
        if not last and act != "relu":
            raise ConfigError("head_start", f"head layer {layer.name!r} must use relu, not {act}")
        kernel, bias = _weights(layer)
        head[f"h{i}_kernel"], head[f"h{i}_bias"] = kernel, bias
        acts.append("linear" if last else "relu")
    split = SplitModel(name or str(model.name), input_shape, tuple(backbone), head, tuple(acts))
    features_shape = _feature_shape(split)
    if len(features_shape) != 1 or features_shape[0] != split.feature_dim:
        raise ConfigError("head_start", f"backbone output shape {features_shape} does not feed the head "
                          f"(expects [{split.feature_dim}]); the backbone must end flat")
    return split


def _out_shape(layer: BackboneLayer, shape: tuple[int, ...]) -> tuple[int, ...]:
    if layer.kind == "dense":
        return (*shape[:-1], int(layer.weights[0].shape[1]))
    if layer.kind == "flatten":
        return (int(np.prod(shape)),)
    if layer.kind in ("reshape", "globalavg", "globalmax"):
        return layer.target_shape
    if layer.kind in ("conv2d", "maxpool", "avgpool"):
        k = layer.weights[0].shape[:2] if layer.kind == "conv2d" else layer.pool
        out = []
        for d in range(2):
            if layer.padding == "same":
                out.append(-(-shape[d] // layer.strides[d]))
            else:
                out.append((shape[d] - int(k[d])) // layer.strides[d] + 1)
        ch = int(layer.weights[0].shape[3]) if layer.kind == "conv2d" else shape[2]
        return (out[0], out[1], ch)
    return shape  # activation, affine: elementwise


def _feature_shape(split: SplitModel) -> tuple[int, ...]:
    shape = split.input_shape
    for layer in split.backbone:
        shape = _out_shape(layer, shape)
    return shape


def init_weights(model: Any, rng: np.random.Generator) -> None:
    """Glorot-uniform kernels and zero biases drawn from ``rng`` (no global seeding anywhere)."""
    for layer in model.layers:
        new = []
        for w in layer.get_weights():
            if w.ndim <= 1:  # biases (and scalars such as a Normalization's count)
                new.append(np.zeros_like(w, dtype=np.float32))
                continue
            receptive = int(np.prod(w.shape[:-2])) if w.ndim > 2 else 1
            fan_in, fan_out = w.shape[-2] * receptive, w.shape[-1] * receptive
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            new.append(rng.uniform(-limit, limit, size=w.shape).astype(np.float32))
        if new:
            layer.set_weights(new)
