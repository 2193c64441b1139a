"""Other models: the mlp zoo model, a user's Keras model with --head-start, split errors, the CLI."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.protocol.errors import ConfigError
from fedge.protocol.manifest import load_head, verify_artifacts
from tests.export.support import randomize


def _ort_run(path: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray[Any, Any] = sess.run(None, {"x": x})[0]
    return out


def _logits(art: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """backbone.onnx features through the head of head.npz (ReLU between layers)."""
    from fedge.runtime.trainers.numpy_head import head_forward

    return head_forward(load_head(art), _ort_run(art / "backbone.onnx", x))


def _litert_logits(art: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    from ai_edge_litert.interpreter import Interpreter

    from fedge.runtime.trainers.numpy_head import head_forward

    it = Interpreter(model_path=str(art / "model.tflite"))
    head = {k: np.asarray(v) for k, v in it.get_signature_runner("get_head")().items()}
    return head_forward(head, it.get_signature_runner("features")(x=x)["features"])


def _parser() -> argparse.ArgumentParser:
    from fedge.export.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="fedge")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_export_small_mlp_runs_under_litert_and_onnx(tmp_path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    from fedge.export.testing import export_small

    m = export_small(tmp_path / "mlp", model="mlp", input_dim=64, num_classes=10, train_batch=16)
    assert (m.model, m.input.shape, m.feature_dim, m.num_classes, m.train_batch) == ("mlp", (64,), 32, 10, 16)
    assert m.head_spec == [("h0_kernel", (32, 10)), ("h0_bias", (10,))]
    assert m.head_activations == ("linear",)
    verify_artifacts(tmp_path / "mlp")
    x = np.random.default_rng(0).random((16, 64), dtype=np.float32)
    it = Interpreter(model_path=str(tmp_path / "mlp" / "model.tflite"))
    np.testing.assert_allclose(_litert_logits(tmp_path / "mlp", x), _logits(tmp_path / "mlp", x), atol=1e-4)
    y, mask = np.zeros(16, np.int32), np.ones(16, np.float32)
    f = it.get_signature_runner("features")(x=x)["features"]
    losses = [float(it.get_signature_runner("train_head")(f=f, y=y, mask=mask, lr=np.float32(0.5))["loss"])
              for _ in range(3)]
    assert losses[2] < losses[0]


def test_export_small_is_deterministic_in_the_seed(tmp_path: Path) -> None:
    from fedge.export.testing import export_small

    a = export_small(tmp_path / "a", model="mlp", seed=3)
    b = export_small(tmp_path / "b", model="mlp", seed=3)
    c = export_small(tmp_path / "c", model="mlp", seed=4)
    assert a.backbone_sha256 == b.backbone_sha256 != c.backbone_sha256
    assert a.files["head.npz"] == b.files["head.npz"]


def test_keras_file_with_head_start_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import keras

    inp = keras.Input((28, 28, 1), name="img")
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="c")(inp)
    h = keras.layers.AveragePooling2D(2, name="p")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dropout(0.5, name="drop")(h)
    h = keras.layers.Dense(24, activation="tanh", name="feat")(h)
    h = keras.layers.Dense(16, activation="relu", name="hA")(h)
    out = keras.layers.Dense(5, name="hB")(h)
    model = randomize(keras.Model(inp, out, name="custom"), np.random.default_rng(1))
    model.save(tmp_path / "custom.keras")

    args = _parser().parse_args(["export", "--model", str(tmp_path / "custom.keras"), "--out", str(tmp_path / "art"),
                                 "--head-start", "hA", "--train-batch", "8", "--no-ort"])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "exported custom" in printed and "model.tflite" in printed
    assert "verifying every artifact" in printed and "features" in printed and "ok" in printed

    m = verify_artifacts(tmp_path / "art")
    assert (m.feature_dim, m.num_classes, m.train_batch) == (24, 5, 8)
    assert m.head_spec == [("h0_kernel", (24, 16)), ("h0_bias", (16,)), ("h1_kernel", (16, 5)), ("h1_bias", (5,))]
    assert not any(name.startswith("ort/") for name in m.files)
    np.testing.assert_array_equal(load_head(tmp_path / "art")["h1_kernel"], model.get_layer("hB").get_weights()[0])
    x = np.random.default_rng(2).random((8, 28, 28, 1), dtype=np.float32)
    want = np.asarray(model(x, training=False))
    np.testing.assert_allclose(_logits(tmp_path / "art", x), want, atol=1e-4)
    np.testing.assert_allclose(_litert_logits(tmp_path / "art", x), want, atol=1e-4)


def test_cli_untrained_zoo_export_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["export", "--model", "mlp", "--untrained", "--input-dim", "12", "--num-classes", "3",
                                 "--out", str(tmp_path / "o")])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "fresh untrained weights" in out and "features 32  classes 3" in out and "backbone sha256" in out
    assert verify_artifacts(tmp_path / "o").input.shape == (12,)


def test_split_errors_name_the_problem() -> None:
    import keras

    from fedge.export.split import split_keras
    from fedge.export.zoo import cnn28

    with pytest.raises(ConfigError, match=r"head_start.*no layer named 'nope'"):
        split_keras(cnn28(10), "nope")
    with pytest.raises(ConfigError, match=r"head_start.*'flatten' is Flatten, not Dense"):
        split_keras(cnn28(10), "flatten")
    inp = keras.Input((6,))
    a, b = keras.layers.Dense(4, name="a")(inp), keras.layers.Dense(4, name="b")(inp)
    branchy = keras.Model(inp, keras.layers.Dense(2, name="out")(keras.layers.Add(name="add")([a, b])))
    assert split_keras(branchy, "out").feature_dim == 4  # a branching backbone is fine
    with pytest.raises(ConfigError, match=r"'add'.*must be a chain"):
        split_keras(branchy, "a")  # ... a branching head is not
    inp = keras.Input((6,))
    sig = keras.Model(inp, keras.layers.Dense(2, activation="sigmoid", name="out")(keras.layers.Dense(4)(inp)))
    with pytest.raises(ConfigError, match=r"must be linear"):
        split_keras(sig, "out")
    inp = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3, name="conv")(inp)
    unflat = keras.Model(inp, keras.layers.Dense(2, name="out")(conv))
    with pytest.raises(ConfigError, match=r"head/backbone shape mismatch.*\[None, F\].*\[None, 6, 6, 4\]"):
        split_keras(unflat, "out")


def test_unknown_model_is_a_config_error(tmp_path: Path) -> None:
    from fedge.export.exporter import export_model

    with pytest.raises(ConfigError, match=r"model"):
        export_model(str(tmp_path / "nothing.keras"), tmp_path / "o")
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match=r"bad\.keras"):
        export_model(str(tmp_path / "bad.keras"), tmp_path / "o")


def test_pretrain_on_digits_learns_and_saves_a_loadable_model(tmp_path: Path) -> None:
    import keras

    from fedge.export.pretrain import pretrain, pretrain_report

    r = pretrain_report("auto", "digits", epochs=3, seed=0, out_path=tmp_path / "d.keras")
    assert (r.model, r.dataset) == ("mlp", "digits")
    assert r.test_accuracy > 0.8
    loaded = keras.models.load_model(r.path, compile=False)
    assert [layer.name for layer in loaded.layers] == ["dense1", "features", "head0"]
    assert pretrain("mlp", "digits", 0, 0, tmp_path / "e.keras") == tmp_path / "e.keras"
    with pytest.raises(ConfigError, match=r"cnn28 needs"):
        pretrain("cnn28", "digits", 1, 0, tmp_path / "f.keras")
