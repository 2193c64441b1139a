"""Trainable last layers beyond Dense: the last convolution block (stride-1 SAME Conv2D layers, then
GlobalAveragePooling2D) plus the classifier, trained on every trainer; the feature cache caches at the cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.protocol.errors import ConfigError
from fedge.protocol.manifest import load_manifest
from tests.agent.test_selftest import run_selftest
from tests.export.support import randomize

B = 8


def _model(head_conv: Any = None) -> Any:
    import keras

    inp = keras.Input((12, 12, 3), name="img")
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stem")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = (head_conv or keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="block_conv"))(h)
    h = keras.layers.Conv2D(16, 1, padding="same", activation="relu", name="block_expand")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dropout(0.2, name="drop")(h)
    out = keras.layers.Dense(4, name="classifier")(h)
    model = randomize(keras.Model(inp, out, name="convhead"), np.random.default_rng(2))
    bn = model.get_layer("bn")  # randomize() would give a negative variance
    bn.set_weights([np.ones(8, np.float32), np.zeros(8, np.float32), np.full(8, 0.1, np.float32),
                    np.full(8, 0.5, np.float32)])
    return model


@pytest.fixture(scope="module")
def conv_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    from fedge.export.exporter import export_model

    model = _model()
    d = tmp_path_factory.mktemp("convhead") / "art"
    export_model(model, d, "block_conv", train_batch=B)
    return model, d


def test_conv_head_manifest_and_every_trainer_match_keras_and_each_other(conv_export: tuple[Any, Path]) -> None:
    from fedge.runtime.trainers import available_backends, open_trainer

    model, d = conv_export
    m = load_manifest(d)
    assert (m.feature_shape, m.feature_dim, m.features_shape) == ((6, 6, 8), 288, (6, 6, 8))
    assert m.head_spec == [("h0_kernel", (3, 3, 8, 12)), ("h0_bias", (12,)), ("h1_kernel", (1, 1, 12, 16)),
                           ("h1_bias", (16,)), ("h2_kernel", (16, 4)), ("h2_bias", (4,))]
    assert m.head_activations == ("relu", "relu", "linear")
    rng = np.random.default_rng(3)
    x = rng.random((B, 12, 12, 3), dtype=np.float32)
    y = rng.integers(0, 4, B)
    want = np.asarray(model(x, training=False))
    backends = available_backends()
    assert "litert" in backends
    losses = {}
    for backend in backends:
        trainer = open_trainer(d, backend)
        f = trainer.features(x)
        assert f.shape == (B, 6, 6, 8)
        np.testing.assert_allclose(trainer.logits(f), want, atol=1e-4, err_msg=backend)
        losses[backend] = [trainer.train_step(f, y, 0.5) for _ in range(6)]
        assert losses[backend][-1] < losses[backend][0]
        # every parameter moved, the convolutions included
        before = load_head(d)
        after = trainer.get_head()
        assert all(not np.allclose(after[k], before[k]) for k in before), backend
    for backend in backends:
        np.testing.assert_allclose(losses[backend], losses["numpy"], rtol=1e-4, err_msg=backend)


def load_head(d: Path) -> dict[str, Any]:
    from fedge.protocol.manifest import load_head as _load

    return _load(d)


def test_a_short_batch_is_masked_like_a_smaller_batch(conv_export: tuple[Any, Path]) -> None:
    from fedge.runtime.trainers import open_trainer

    _, d = conv_export
    rng = np.random.default_rng(4)
    f = rng.random((5, 6, 6, 8), dtype=np.float32)
    y = rng.integers(0, 4, 5)
    lite, ref = open_trainer(d, "litert"), open_trainer(d, "numpy")
    assert lite.train_step(f, y, 0.3) == pytest.approx(ref.train_step(f, y, 0.3), rel=1e-5)
    for k, v in ref.get_head().items():
        np.testing.assert_allclose(lite.get_head()[k], v, atol=1e-6)


def test_the_feature_cache_keeps_features_at_the_cut(conv_export: tuple[Any, Path], tmp_path: Path) -> None:
    from fedge.runtime.features import FeatureCache
    from fedge.runtime.trainers import open_trainer

    _, d = conv_export
    trainer = open_trainer(d, "litert")
    x = np.random.default_rng(5).random((20, 12, 12, 3), dtype=np.float32)
    cache = FeatureCache(tmp_path / "cache")
    sha = load_manifest(d).backbone_sha256
    got = cache.get(trainer, x, "ab" * 32, sha)
    cache.flush()
    stored = np.load(cache.path("ab" * 32, sha))
    assert stored.shape == (20, 6, 6, 8)
    np.testing.assert_array_equal(stored, got)
    again = FeatureCache(tmp_path / "cache").get(trainer, x, "ab" * 32, sha)  # a restarted agent reads the disk
    np.testing.assert_array_equal(again, got)


def test_selftest_trains_the_conv_head(conv_export: tuple[Any, Path]) -> None:
    _, d = conv_export
    code, rep, err = run_selftest("--artifacts", str(d), "--steps", "10", "--lr", "0.5")
    assert code == 0, err
    assert rep["ok"] and rep["backend"] == "litert" and rep["loss_last"] < rep["loss_first"]


def test_heads_the_trainers_cannot_train_are_refused_naming_the_layer() -> None:
    import keras

    from fedge.export.split import split_keras

    strided = _model(keras.layers.Conv2D(12, 3, strides=2, padding="same", activation="relu", name="block_conv"))
    with pytest.raises(ConfigError, match=r"'block_conv' \(Conv2D\): strides and dilation must be 1"):
        split_keras(strided, "block_conv")
    valid = _model(keras.layers.Conv2D(12, 3, padding="valid", activation="relu", name="block_conv"))
    with pytest.raises(ConfigError, match=r"'block_conv' \(Conv2D\): padding must be 'same'"):
        split_keras(valid, "block_conv")
    inp = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c")(inp)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c2")(h)
    flat = keras.Model(inp, keras.layers.Dense(2, name="out")(keras.layers.Flatten(name="flat")(h)))
    with pytest.raises(ConfigError, match=r"'c2' \(Conv2D\) must be followed by GlobalAveragePooling2D"):
        split_keras(flat, "c2")
    with pytest.raises(ConfigError, match=r"'flat' is Flatten, not Dense"):
        split_keras(flat, "flat")
