"""Model zoo: the Keras builders of ``cnn28`` and ``mlp`` and their seeded initialisation.

Any other Keras model is split into backbone and head by :mod:`fedge.export.split`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedge.export.tfenv import import_tensorflow
from fedge.protocol.errors import ConfigError

__all__ = ["ZOO", "build_zoo_model", "cnn28", "default_head_start", "init_weights", "mlp"]

ZOO: tuple[str, ...] = ("cnn28", "mlp")


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
