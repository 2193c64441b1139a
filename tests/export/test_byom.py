"""Bring your own model, at the hub: the verification every export prints (and what a failed one leaves), an
ONNX backbone written the way PyTorch writes one, and quantised backbones of a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from fedge.protocol.errors import ConfigError
from fedge.protocol.manifest import load_manifest
from tests.agent.test_selftest import run_selftest
from tests.export.torchstyle import TorchStyleNet

F32 = NDArray[np.float32]


def _cli(*argv: str) -> int:
    from fedge.cli import main

    return main(list(argv))


@pytest.mark.slow  # a MobileNetV2 export (~30 s): make test, not the fast lane
def test_mobilenet_export_prints_the_verification_of_every_artifact(mobilenet_export: tuple[Path, str]) -> None:
    d, printed = mobilenet_export
    lines = [line for line in printed.splitlines() if "features" in line and "logits" in line]
    assert [line.split()[0] for line in lines] == ["model.tflite", "ort/head", "head.npz"]
    for line in lines:
        words = line.split()
        assert words[-1] == "ok"
        assert float(words[words.index("features") + 1]) <= 1e-4
        assert float(words[words.index("logits") + 1]) <= 1e-4
    m = load_manifest(d)
    assert set(m.files) == {"model.tflite", "backbone.onnx", "head.npz", "ort/head/checkpoint",
                            "ort/head/training_model.onnx", "ort/head/eval_model.onnx", "ort/head/optimizer_model.onnx"}
    # ship only what devices use: the export stays close to the size of the weights (~410k float32 = 1.6 MB)
    assert m.files["model.tflite"].size < 1.15 * 410_208 * 4


def test_a_failed_verification_exits_non_zero_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import fedge.export.verify as verify

    monkeypatch.setattr(verify, "FLOAT_TOL", -1.0)  # no artifact can be that close: every check fails
    out = tmp_path / "art"
    code = _cli("export", "--model", "mlp", "--untrained", "--input-dim", "6", "--num-classes", "3", "--out", str(out),
                "--no-ort")
    assert code != 0
    err = capsys.readouterr().err
    assert "verification" in err and "do not match the source model" in err and "FAILED" in err
    assert list(tmp_path.iterdir()) == []
    # an earlier good export in --out is kept when the new one fails
    monkeypatch.setattr(verify, "FLOAT_TOL", 1e-4)
    assert _cli("export", "--model", "mlp", "--untrained", "--input-dim", "6", "--num-classes", "3", "--out",
                str(out), "--no-ort") == 0
    before = load_manifest(out)
    monkeypatch.setattr(verify, "FLOAT_TOL", -1.0)
    assert _cli("export", "--model", "mlp", "--untrained", "--input-dim", "6", "--out", str(out), "--no-ort") != 0
    assert load_manifest(out) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match=r"out.*not an artifacts folder"):
        from fedge.export.exporter import export_model

        export_model("mlp", tmp_path / "mine", input_dim=6)


# ---- an ONNX backbone written the way PyTorch writes one ---------------------------------------------------


@pytest.fixture(scope="module")
def torch_style(tmp_path_factory: pytest.TempPathFactory) -> tuple[TorchStyleNet, Path]:
    net = TorchStyleNet(np.random.default_rng(4))
    d = tmp_path_factory.mktemp("torchstyle")
    net.save(d / "backbone.onnx")
    assert _cli("export", "--backbone", str(d / "backbone.onnx"), "--num-classes", "5", "--out", str(d / "art")) == 0
    return net, d / "art"


def test_torch_style_onnx_backbone_exports_with_the_real_features(torch_style: tuple[TorchStyleNet, Path]) -> None:
    net, art = torch_style
    m = load_manifest(art)
    assert (m.input.shape, m.input.layout, m.feature_dim, m.num_classes) == ((3, 20, 20), "NCHW", 8, 5)
    assert "model.tflite" not in m.files  # no ONNX -> LiteRT converter installs beside fedge (the export says so)
    assert {"backbone.onnx", "head.npz", "ort/head/checkpoint"} <= set(m.files)
    from fedge.runtime.trainers import available_backends, open_trainer

    x = np.random.default_rng(5).random((6, 3, 20, 20), dtype=np.float32)
    want = net.features_numpy(x)  # an independent NumPy forward pass of the same weights
    assert float(np.abs(want).max()) > 0.1
    for backend in [b for b in available_backends() if b != "litert"]:
        trainer = open_trainer(art, backend)
        np.testing.assert_allclose(trainer.features(x), want, atol=1e-4, err_msg=backend)


def test_torch_style_backbone_trains_on_the_agent_with_an_image_folder(torch_style: tuple[TorchStyleNet, Path],
                                                                      tmp_path: Path) -> None:
    from PIL import Image

    _, art = torch_style
    rng = np.random.default_rng(6)
    for c in range(5):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (25, 25, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"class{c}"
                                                                                     / f"{i}.jpg")
    for backend in ("auto", "numpy"):
        code, rep, err = run_selftest("--artifacts", str(art), "--data", str(tmp_path / "imgs"), "--backend", backend,
                                      "--steps", "20", "--lr", "0.5")
        assert code == 0, err
        assert rep["ok"] and rep["samples"] == 20 and rep["loss_last"] < rep["loss_first"]
        assert rep["backend"] == ("ort" if backend == "auto" else "numpy")


def test_onnx_backbone_errors_name_the_problem(tmp_path: Path) -> None:
    from fedge.export.exporter import export

    net = TorchStyleNet(np.random.default_rng(1))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"flatten": False}, r"head/backbone shape mismatch.*\[N, F\].*\[N, 8, 1, 1\]"),
        ({"dynamic_batch": False}, r"fixed batch size.*dynamic_axes"),
    ]
    for kwargs, pattern in cases:
        path = tmp_path / "bad.onnx"
        net.save(path, **kwargs)
        with pytest.raises(ConfigError, match=pattern):
            export(None, tmp_path / "out", backbone=path, num_classes=3)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ConfigError, match=r"backbone.*junk\.onnx"):
        export(None, tmp_path / "out", backbone=tmp_path / "junk.onnx", num_classes=3)
    with pytest.raises(ConfigError, match=r"quantize"):
        net.save(tmp_path / "ok.onnx")
        export(None, tmp_path / "out", backbone=tmp_path / "ok.onnx", num_classes=3, quantize="dynamic")
    assert not (tmp_path / "out").exists()


# ---- quantised backbones of a trained model ----------------------------------------------------------------


def test_int8_and_dynamic_backbones_of_a_trained_cnn_agree_with_the_float_model(tmp_path: Path) -> None:
    from fedge.datasets.source import load_source
    from fedge.export.exporter import export
    from fedge.export.pretrain import _train
    from fedge.runtime.trainers import open_trainer

    data = load_source("fashion-mnist")
    model = _train("cnn28", data.x_train[:3000], data.y_train[:3000], 10, seed=0, epochs=1)
    np.savez(tmp_path / "calib.npz", x=data.x_train[3000:3256])
    float_art = export(model, tmp_path / "float").manifest
    x_test, y_test = data.x_test[:500], data.y_test[:500]
    base = open_trainer(tmp_path / "float", "litert")
    float_pred = np.argmax(base.logits(base.features(x_test)), axis=1)
    float_bytes = sum(e.size for n, e in float_art.files.items() if n.endswith(".tflite"))
    for mode, calibration in (("int8", tmp_path / "calib.npz"), ("dynamic", None)):
        lines: list[str] = []
        result = export(model, tmp_path / mode, quantize=mode, calibration=calibration, report=lines.append)
        assert any("backbone.tflite" in line and "top-1 agreement" in line for line in lines)
        q = open_trainer(tmp_path / mode, "litert")
        pred = np.argmax(q.logits(q.features(x_test)), axis=1)
        assert np.mean(pred == float_pred) >= 0.95, mode
        assert abs(np.mean(pred == y_test) - np.mean(float_pred == y_test)) <= 0.02, mode
        q_bytes = sum(e.size for n, e in result.manifest.files.items() if n.endswith(".tflite"))
        assert q_bytes < 0.5 * float_bytes, (mode, q_bytes, float_bytes)
        assert result.manifest.backbone_sha256 != float_art.backbone_sha256
    with pytest.raises(ConfigError, match=r"calibration"):
        export(model, tmp_path / "nocal", quantize="int8")


def test_head_start_inside_the_backbone_and_a_non_dense_head_are_refused_clearly() -> None:
    from fedge.export.split import split_keras
    from fedge.export.testing import mobilenet_v2

    model = mobilenet_v2(size=32)
    with pytest.raises(ConfigError, match=r"no layer named 'block_16_project'.*top-level layers: image, "
                                          r"mobilenetv2_0.35_32, head0"):
        split_keras(model, "block_16_project")
    split = split_keras(model)
    assert (split.feature_dim, split.num_classes, split.input_shape) == (1280, 5, (32, 32, 3))
