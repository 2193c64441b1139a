"""Keras preprocessing layers in the backbone: Normalization, Rescaling, BatchNormalization, Dropout, Reshape,
global pooling, LayerNormalization and a custom layer (the converters take whatever the backbone holds).

Each model is exported (through a saved ``.keras`` file, as ``fedge export --model`` does) and every trainer
must give the Keras model's features and logits: LiteRT (``model.tflite``), ONNX Runtime training (``ort/head``
over ``backbone.onnx``) and the NumPy head; a backbone op LiteRT cannot convert is named in the error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from fedge.protocol.errors import ConfigError
from fedge.protocol.manifest import verify_artifacts
from tests.export.support import randomize

F32 = NDArray[np.float32]
B = 8
ATOL = 1e-4


def _set_batchnorm(model: Any, rng: np.random.Generator) -> None:
    """Non-trivial inference statistics (randomize() would give negative variances)."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c).astype(np.float32), rng.normal(0, 0.3, c).astype(np.float32),
                               rng.normal(0, 0.5, c).astype(np.float32), rng.uniform(0.2, 3.0, c).astype(np.float32)])


def _tabular(rng: np.random.Generator) -> tuple[Any, F32]:
    """Input(12) -> Normalization(adapted) -> Dense(relu) -> BatchNormalization -> Dropout -> Dense -> head."""
    import keras

    inp = keras.Input((12,), name="x")
    h = keras.layers.Normalization(name="norm")(inp)
    h = keras.layers.Dense(32, activation="relu", name="d1")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dropout(0.3, name="drop")(h)
    h = keras.layers.Dense(16, activation="relu", name="features")(h)
    out = keras.layers.Dense(4, name="head0")(h)
    model = randomize(keras.Model(inp, out, name="tabular"), rng)
    data = (rng.normal(50.0, 10.0, (256, 12)) * rng.uniform(0.1, 5.0, 12)).astype(np.float32)
    model.get_layer("norm").adapt(data)
    _set_batchnorm(model, rng)
    return model, data[:B]


def _image(rng: np.random.Generator) -> tuple[Any, F32]:
    """Rescaling(1/255) -> Normalization(per channel) -> Conv -> BatchNormalization -> pool -> Reshape -> Flatten."""
    import keras

    inp = keras.Input((10, 10, 3), name="img")
    h = keras.layers.Rescaling(1 / 255, offset=-0.25, name="rescale")(inp)
    h = keras.layers.Normalization(axis=-1, name="chan_norm")(h)
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)
    h = keras.layers.Reshape((4, -1), name="reshape")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(12, activation="relu", name="features")(h)
    out = keras.layers.Dense(3, name="head0")(h)
    model = randomize(keras.Model(inp, out, name="image"), rng)
    pixels = rng.integers(0, 256, (64, 10, 10, 3)).astype(np.float32)
    model.get_layer("chan_norm").adapt(pixels / 255 - 0.25)
    _set_batchnorm(model, rng)
    return model, pixels[:B]


def _pooled(pool: str) -> Any:
    def build(rng: np.random.Generator) -> tuple[Any, F32]:
        """Rescaling(per channel) -> Conv(same) -> BatchNormalization -> global pooling -> Flatten."""
        import keras

        keep = pool == "GlobalMaxPooling2D"  # one of the two keeps the dims (then Flatten)
        inp = keras.Input((8, 8, 3), name="img")
        h = keras.layers.Rescaling([1 / 255, 2 / 255, 0.5 / 255], name="rescale")(inp)
        h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(h)
        h = keras.layers.BatchNormalization(name="bn")(h)
        h = getattr(keras.layers, pool)(keepdims=keep, name="pool")(h)
        h = keras.layers.Flatten(name="flat")(h)
        h = keras.layers.Dense(10, activation="relu", name="features")(h)
        out = keras.layers.Dense(3, name="head0")(h)
        model = randomize(keras.Model(inp, out, name="pooled"), rng)
        _set_batchnorm(model, rng)
        return model, rng.integers(0, 256, (B, 8, 8, 3)).astype(np.float32)

    build.__name__ = pool
    return build


def _custom(rng: np.random.Generator) -> tuple[Any, F32]:
    """LayerNormalization and a custom layer (x * 2 - 1) in the backbone: refused by the old hand-written builder."""
    import keras

    @keras.saving.register_keras_serializable(package="fedge_tests")  # type: ignore[misc]
    class Affine2(keras.layers.Layer):  # type: ignore[misc]
        def call(self, x: Any) -> Any:
            return x * 2.0 - 1.0

    inp = keras.Input((12,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="d1")(inp)
    h = keras.layers.LayerNormalization(name="ln")(h)
    h = Affine2(name="affine2")(h)
    h = keras.layers.Dense(10, activation="relu", name="features")(h)
    out = keras.layers.Dense(3, name="head0")(h)
    model = randomize(keras.Model(inp, out, name="custom"), rng)
    return model, rng.normal(0, 1, (B, 12)).astype(np.float32)


@pytest.mark.parametrize("build", [_tabular, _image, _pooled("GlobalAveragePooling2D"), _pooled("GlobalMaxPooling2D"),
                                   _custom], ids=["tabular", "image", "global-avg", "global-max", "custom"])
def test_preprocessing_backbone_exports_with_keras_parity(tmp_path: Path, build: Any) -> None:
    import keras

    from fedge.export.exporter import export_model
    from fedge.runtime.trainers import available_backends, open_trainer

    model, x = build(np.random.default_rng(11))
    model.save(tmp_path / "m.keras")
    manifest = export_model(str(tmp_path / "m.keras"), tmp_path / "art", head_start="head0", train_batch=B)
    verify_artifacts(tmp_path / "art")
    assert (manifest.feature_dim, manifest.num_classes) == (model.get_layer("features").units,
                                                            model.get_layer("head0").units)
    want_logits = np.asarray(model(x, training=False))
    want_feats = np.asarray(keras.Model(model.inputs[0], model.get_layer("features").output)(x, training=False))
    assert float(np.abs(want_feats).max()) > 0.1  # the features are not all dead ReLUs
    y = (np.arange(B) % manifest.num_classes).astype(np.int64)
    shifted = want_logits - want_logits.max(axis=1, keepdims=True)
    want_loss = float(-(shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))[np.arange(B), y].mean())
    backends = available_backends()
    assert "litert" in backends
    for backend in backends:
        trainer = open_trainer(tmp_path / "art", backend)
        feats = trainer.features(x)
        np.testing.assert_allclose(feats, want_feats, atol=ATOL, err_msg=backend)
        np.testing.assert_allclose(trainer.logits(feats), want_logits, atol=ATOL, err_msg=backend)
        assert trainer.train_step(feats, y, 0.1) == pytest.approx(want_loss, rel=1e-4), backend


def test_a_backbone_op_litert_cannot_convert_names_the_layer_and_the_fix(tmp_path: Path) -> None:
    import keras
    import tensorflow as tf

    from fedge.export.exporter import export_model

    class Det(keras.layers.Layer):  # type: ignore[misc]
        def call(self, x: Any) -> Any:  # MatrixDeterminant: a TF op with no LiteRT built-in kernel
            return tf.linalg.det(tf.reshape(x, [-1, 2, 2, 2])) * tf.ones([1, 2])

    inp = keras.Input((6,), name="x")
    h = keras.layers.Dense(8, name="d")(inp)
    h = Det(name="det")(h)
    model = keras.Model(inp, keras.layers.Dense(2, name="head0")(h))
    with pytest.raises(ConfigError) as info:
        export_model(model, tmp_path / "art", "head0", train_batch=4)
    msg = str(info.value)
    assert "MatrixDeterminant" in msg and "layer 'det'" in msg
    assert "replace that layer" in msg and "move --head-start" in msg
    assert not (tmp_path / "art").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind either
