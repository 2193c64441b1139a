"""The exported artifacts agree with the Keras model and with each other (LiteRT, ONNX, ORT, NumPy)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from fedge.protocol.manifest import backbone_digest, load_head, verify_artifacts
from tests.export.support import Exported

B = 32
F32 = NDArray[np.float32]


def _interpreter(d: Path) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(d / "model.tflite"))


def _images(n: int, seed: int) -> F32:
    return np.random.default_rng(seed).random((n, 28, 28, 1), dtype=np.float32)


def _ort(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _keras_features(model: Any, x: F32) -> F32:
    import keras

    sub = keras.Model(model.inputs[0], model.get_layer("features").output)
    return np.asarray(sub(x))


# ---- NumPy reference of the head and of one masked SGD step -----------------------------------------


def _np_forward(head: dict[str, F32], f: F32) -> tuple[list[NDArray[np.float64]], list[NDArray[np.float64]]]:
    n = len(head) // 2
    acts, pre = [f.astype(np.float64)], []
    for i in range(n):
        z = acts[-1] @ head[f"h{i}_kernel"].astype(np.float64) + head[f"h{i}_bias"]
        pre.append(z)
        acts.append(np.maximum(z, 0.0) if i < n - 1 else z)
    return acts, pre


def _np_sgd_step(head: dict[str, F32], f: F32, y: NDArray[Any], mask: F32, lr: float) -> float:
    """In place: one SGD step on the masked mean softmax cross-entropy; returns the loss before it."""
    n = len(head) // 2
    acts, pre = _np_forward(head, f)
    logits = pre[-1]
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    onehot = np.eye(logits.shape[1])[y]
    denom = max(float(mask.sum()), 1.0)
    loss = float(np.sum(mask * -(onehot * logp).sum(axis=1)) / denom)
    dz = (np.exp(logp) - onehot) * (mask / denom)[:, None]
    grads = {}
    for i in reversed(range(n)):
        grads[f"h{i}_kernel"] = acts[i].T @ dz
        grads[f"h{i}_bias"] = dz.sum(axis=0)
        if i > 0:
            dz = (dz @ head[f"h{i}_kernel"].T) * (pre[i - 1] > 0)
    for k, g in grads.items():
        head[k] = (head[k] - lr * g).astype(np.float32)
    return loss


# ---- manifest -------------------------------------------------------------------------------------


def test_manifest_verifies_and_lists_every_written_file(cnn28_export: Exported) -> None:
    m = verify_artifacts(cnn28_export.dir)
    on_disk = {p.relative_to(cnn28_export.dir).as_posix() for p in cnn28_export.dir.rglob("*") if p.is_file()}
    assert set(m.files) == on_disk - {"manifest.json"}
    assert set(m.files) == {"model.tflite", "backbone.onnx", "head.npz", "ort/head/checkpoint",
                            "ort/head/training_model.onnx", "ort/head/eval_model.onnx", "ort/head/optimizer_model.onnx"}
    # only what devices use: no full-model inference/training files
    assert not {"model.onnx", "ort/full/checkpoint"} & set(m.files)
    assert all(entry.role for entry in m.files.values())
    assert "LiteRT" in m.files["model.tflite"].role and "features" in m.files["backbone.onnx"].role
    assert (m.model, m.input.name, m.input.shape, m.input.layout, m.feature_dim, m.num_classes, m.train_batch) == (
        "cnn28", "x", (28, 28, 1), "NHWC", 64, 10, 32)
    assert m.head_spec == [("h0_kernel", (64, 32)), ("h0_bias", (32,)), ("h1_kernel", (32, 10)), ("h1_bias", (10,))]
    assert m.head_activations == ("relu", "linear")
    assert m.created.endswith("Z")


def test_backbone_digest_hashes_the_keras_backbone_weights(cnn28_export: Exported) -> None:
    model = cnn28_export.keras_model
    weights = [w for name in ("conv1", "conv2", "features") for w in model.get_layer(name).get_weights()]
    assert cnn28_export.manifest.backbone_sha256 == backbone_digest(weights)
    weights[0] = weights[0] + 1e-3
    assert cnn28_export.manifest.backbone_sha256 != backbone_digest(weights)


def test_head_npz_is_the_keras_head(cnn28_export: Exported) -> None:
    head = load_head(cnn28_export.dir)
    model = cnn28_export.keras_model
    assert list(head) == ["h0_kernel", "h0_bias", "h1_kernel", "h1_bias"]
    for i, layer in enumerate(("head0", "head1")):
        kernel, bias = model.get_layer(layer).get_weights()
        np.testing.assert_array_equal(head[f"h{i}_kernel"], kernel)
        np.testing.assert_array_equal(head[f"h{i}_bias"], bias)


# ---- LiteRT ----------------------------------------------------------------------------------------


def test_tflite_signatures_have_the_documented_names_and_shapes(cnn28_export: Exported) -> None:
    it = _interpreter(cnn28_export.dir)
    sigs = it.get_signature_list()
    heads = ["h0_bias", "h0_kernel", "h1_bias", "h1_kernel"]
    assert {k: (sorted(v["inputs"]), sorted(v["outputs"])) for k, v in sigs.items()} == {
        "train_head": (["f", "lr", "mask", "y"], ["loss"]),
        "features": (["x"], ["features"]),
        "get_head": ([], heads),
        "set_head": (heads, ["ok"]),
    }
    x, y, mask, lr = _images(B, 1), np.zeros(B, np.int32), np.ones(B, np.float32), np.float32(0.0)
    assert it.get_signature_runner("features")(x=x)["features"].shape == (B, 64)
    f = np.zeros((B, 64), np.float32)
    assert it.get_signature_runner("train_head")(f=f, y=y, mask=mask, lr=lr)["loss"].dtype == np.float32
    got = it.get_signature_runner("get_head")()
    assert {k: v.shape for k, v in got.items()} == {"h0_kernel": (64, 32), "h0_bias": (32,), "h1_kernel": (32, 10),
                                                    "h1_bias": (10,)}
    assert float(it.get_signature_runner("set_head")(**got)["ok"]) == 1.0
    with pytest.raises(RuntimeError):  # the batch is fixed
        it.get_signature_runner("features")(x=_images(B + 1, 1))


def _head_logits(head: dict[str, F32], f: F32) -> F32:
    _acts, pre = _np_forward(head, f)
    return pre[-1].astype(np.float32)


def test_litert_features_and_head_equal_keras_logits(cnn28_export: Exported) -> None:
    x = _images(B, 2)
    it = _interpreter(cnn28_export.dir)
    feats = it.get_signature_runner("features")(x=x)["features"]
    head = {k: np.asarray(v) for k, v in it.get_signature_runner("get_head")().items()}
    np.testing.assert_allclose(_head_logits(head, feats), np.asarray(cnn28_export.keras_model(x)), atol=1e-4)


def test_onnx_backbone_and_head_equal_keras(cnn28_export: Exported) -> None:
    x = _images(5, 3)  # dynamic batch
    feats = _ort(cnn28_export.dir / "backbone.onnx").run(["features"], {"x": x})[0]
    np.testing.assert_allclose(feats, _keras_features(cnn28_export.keras_model, x), atol=1e-4)
    logits = _head_logits(load_head(cnn28_export.dir), feats)
    np.testing.assert_allclose(logits, np.asarray(cnn28_export.keras_model(x)), atol=1e-4)


def test_litert_features_equal_backbone_onnx(cnn28_export: Exported) -> None:
    x = _images(B, 4)
    lite = _interpreter(cnn28_export.dir).get_signature_runner("features")(x=x)["features"]
    onnx_f = _ort(cnn28_export.dir / "backbone.onnx").run(["features"], {"x": x})[0]
    np.testing.assert_allclose(lite, onnx_f, atol=1e-4)
    assert float(np.abs(lite).max()) > 0.0


def test_litert_train_head_equals_numpy_sgd_for_20_steps(cnn28_export: Exported) -> None:
    rng = np.random.default_rng(5)
    it = _interpreter(cnn28_export.dir)
    step = it.get_signature_runner("train_head")
    ref = load_head(cnn28_export.dir)
    lr = 0.05
    for i in range(20):
        f = rng.normal(0, 1, (B, 64)).astype(np.float32)
        y = rng.integers(0, 10, B)
        mask = np.ones(B, np.float32)
        if i % 4 == 3:  # a padded last batch: only some rows count
            mask[rng.integers(1, B):] = 0.0
        got = float(step(f=f, y=y.astype(np.int32), mask=mask, lr=np.float32(lr))["loss"])
        want = _np_sgd_step(ref, f, y, mask, lr)
        assert got == pytest.approx(want, rel=1e-4)
    final = it.get_signature_runner("get_head")()
    for k, v in ref.items():
        np.testing.assert_allclose(final[k], v, rtol=1e-4, atol=1e-6)
    assert not np.allclose(final["h1_kernel"], load_head(cnn28_export.dir)["h1_kernel"])


def test_litert_train_head_on_image_features_decreases_the_loss_and_freezes_the_backbone(
        cnn28_export: Exported) -> None:
    x, y = _images(B, 6), (np.arange(B) % 10).astype(np.int32)
    mask, lr = np.ones(B, np.float32), np.float32(0.5)
    it = _interpreter(cnn28_export.dir)
    f = it.get_signature_runner("features")(x=x)["features"]
    losses = [float(it.get_signature_runner("train_head")(f=f, y=y, mask=mask, lr=lr)["loss"]) for _ in range(10)]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    # the backbone is frozen: features are unchanged by training
    np.testing.assert_allclose(it.get_signature_runner("features")(x=x)["features"], f, atol=1e-6)


def test_litert_set_head_changes_the_model(cnn28_export: Exported) -> None:
    it = _interpreter(cnn28_export.dir)
    head = {k: np.zeros_like(v) for k, v in load_head(cnn28_export.dir).items()}
    head["h1_bias"] = np.arange(10, dtype=np.float32)
    it.get_signature_runner("set_head")(**head)
    np.testing.assert_array_equal(it.get_signature_runner("get_head")()["h1_bias"], head["h1_bias"])
    # logits are the bias alone now: the loss of label 9 is -log_softmax(arange(10))[9]
    f = it.get_signature_runner("features")(x=_images(B, 8))["features"]
    loss = float(it.get_signature_runner("train_head")(f=f, y=np.full(B, 9, np.int32), mask=np.ones(B, np.float32),
                                                       lr=np.float32(0.0))["loss"])
    z = np.arange(10.0)
    assert loss == pytest.approx(float(np.log(np.exp(z).sum()) - 9.0), rel=1e-5)


# ---- ONNX Runtime training ------------------------------------------------------------------------


def _ort_training(d: Path, lr: float) -> tuple[Any, Any, Any]:
    from fedge.runtime.trainers.ort_shim import import_training

    api = import_training("api")
    state = api.CheckpointState.load_checkpoint(str(d / "checkpoint"))
    module = api.Module(str(d / "training_model.onnx"), state, str(d / "eval_model.onnx"))
    opt = api.Optimizer(str(d / "optimizer_model.onnx"), module)
    opt.set_learning_rate(lr)
    return state, module, opt


def test_ort_head_artifacts_train_like_numpy(cnn28_export: Exported) -> None:
    state, module, opt = _ort_training(cnn28_export.dir / "ort" / "head", 0.05)
    assert sorted(name for name, _ in state.parameters) == ["h0_bias", "h0_kernel", "h1_bias", "h1_kernel"]
    assert module.input_names() == ["features", "labels"]
    rng = np.random.default_rng(9)
    f = rng.normal(0, 1, (20, 64)).astype(np.float32)
    y = rng.integers(0, 10, 20)
    ref = load_head(cnn28_export.dir)
    module.train()
    losses = []
    for _ in range(3):
        losses.append(float(module(f, y.astype(np.int64))))
        opt.step()
        module.lazy_reset_grad()
        want = _np_sgd_step(ref, f, y, np.ones(20, np.float32), 0.05)
        assert losses[-1] == pytest.approx(want, rel=1e-4)
    assert losses[-1] < losses[0]
