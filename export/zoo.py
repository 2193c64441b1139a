"""Model zoo: the Keras builders of ``cnn28`` and ``mlp`` and their seeded initialisation.

Any other Keras model is split into backbone and head by :mod:`fedge.export.split`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.export.tfenv import import_tensorflow
from fedge.protocol.errors import ConfigError

__all__ = ["NORM_LAYER", "ZOO", "build_zoo_model", "cnn28", "default_head_start", "init_weights", "mlp",
           "set_normalization"]

ZOO: tuple[str, ...] = ("cnn28", "mlp")
NORM_LAYER = "norm"
"""The name of the input ``Normalization`` layer of a zoo model built with ``normalize=True``."""
CONSTANT_REL_STD = 1e-6
"""A column whose standard deviation is at most this times ``max(1, |mean|)`` counts as constant."""


def _norm(normalize: bool, axis: int | None) -> list[Any]:
    """``[Normalization]`` (first layer of the backbone, statistics set by :func:`set_normalization`) or ``[]``."""
    import keras

    return [keras.layers.Normalization(axis=axis, name=NORM_LAYER)] if normalize else []


def cnn28(num_classes: int = 10, *, normalize: bool = False) -> Any:
    """Conv(16)-pool-Conv(32)-pool-flatten-Dense(64) backbone; head Dense(32, relu) -> Dense(C).
    ``normalize``: a scalar ``Normalization`` of the pixels first."""
    import_tensorflow()
    import keras

    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1), name="x"),
            *_norm(normalize, None),
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


def mlp(input_dim: int, num_classes: int = 10, *, normalize: bool = False) -> Any:
    """Dense(64, relu) -> Dense(32, relu) backbone; head Dense(C). ``normalize``: a per-column ``Normalization``
    first."""
    import_tensorflow()
    import keras

    return keras.Sequential(
        [
            keras.Input(shape=(input_dim,), name="x"),
            *_norm(normalize, -1),
            keras.layers.Dense(64, activation="relu", name="dense1"),
            keras.layers.Dense(32, activation="relu", name="features"),
            keras.layers.Dense(num_classes, name="head0"),
        ],
        name="mlp",
    )


def build_zoo_model(name: str, num_classes: int = 10, input_dim: int = 64, *, normalize: bool = False) -> Any:
    if name == "cnn28":
        return cnn28(num_classes, normalize=normalize)
    if name == "mlp":
        return mlp(input_dim, num_classes, normalize=normalize)
    raise ConfigError("model", f"unknown zoo model {name!r} (known: {', '.join(ZOO)})")


def default_head_start(model: Any) -> str:
    """``head0`` when the model has it (zoo models), else the last layer (a single Dense head)."""
    names = [layer.name for layer in model.layers]
    return "head0" if "head0" in names else str(names[-1])


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


def set_normalization(model: Any, x: NDArray[Any]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Set the statistics of ``model``'s :data:`NORM_LAYER` to those of ``x`` (per column, or one scalar for
    images); returns ``(mean, std)``. A column (almost) constant in ``x`` keeps a scale of 1 (centred only): dividing
    by its tiny spread would blow up any other value it takes on a device. Call after :func:`init_weights`."""
    layer = model.get_layer(NORM_LAYER)
    mean_w, var_w, count_w = layer.get_weights()
    xs = np.asarray(x, dtype=np.float64)
    axes = tuple(range(xs.ndim)) if np.ndim(mean_w) == 0 else tuple(range(xs.ndim - 1))
    mean = xs.mean(axis=axes)
    var = xs.var(axis=axes)
    constant = np.sqrt(var) <= CONSTANT_REL_STD * np.maximum(1.0, np.abs(mean))
    var = np.where(constant, 1.0, var)
    layer.set_weights([np.asarray(mean, dtype=mean_w.dtype).reshape(np.shape(mean_w)),
                       np.asarray(var, dtype=var_w.dtype).reshape(np.shape(var_w)),
                       np.asarray(len(xs), dtype=count_w.dtype)])
    layer.finalize_state()  # Keras 3 reads the statistics into constants here
    return mean, np.sqrt(var)
