"""Bring your own model, on the device: a Keras MobileNetV2 export (float and int8) trains through
``fedge-agent selftest`` on whatever runtime the venv has (the agent-only venv: LiteRT, no TensorFlow), and an
image folder (class sub-folders, or a CSV of file,label) is decoded with Pillow at the model's input size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.protocol.errors import DataError
from fedge.protocol.manifest import load_manifest
from fedge.runtime.data import conform, load_local
from tests.agent.test_selftest import run_selftest


def _tflite_bytes(d: Path) -> int:
    return sum(e.size for name, e in load_manifest(d).files.items() if name.endswith(".tflite"))


@pytest.mark.slow  # a MobileNetV2 export (~30 s): make test, not the fast lane
def test_mobilenet_export_trains_on_the_device(mobilenet_export: tuple[Path, str]) -> None:
    d, _ = mobilenet_export
    m = load_manifest(d)
    assert (m.input.shape, m.input.layout, m.feature_dim, m.num_classes) == ((96, 96, 3), "NHWC", 1280, 5)
    code, rep, err = run_selftest("--artifacts", str(d), "--steps", "10")
    assert code == 0, err
    assert rep["ok"] and rep["loss_last"] < rep["loss_first"]
    assert rep["peak_rss_mb"] < 300


@pytest.mark.slow  # a MobileNetV2 export (~30 s): make test, not the fast lane
def test_int8_mobilenet_is_at_most_40_percent_and_trains(mobilenet_export: tuple[Path, str],
                                                         mobilenet_int8_export: tuple[Path, str]) -> None:
    d, _ = mobilenet_int8_export
    m = load_manifest(d)
    assert "backbone.tflite" in m.files and "int8" in m.files["backbone.tflite"].role
    assert m.backbone_sha256 != load_manifest(mobilenet_export[0]).backbone_sha256  # a new backbone version
    ratio = _tflite_bytes(d) / _tflite_bytes(mobilenet_export[0])
    assert ratio <= 0.40, ratio
    code, rep, err = run_selftest("--artifacts", str(d), "--steps", "10", "--backend", "litert")
    assert code == 0, err
    assert rep["ok"] and rep["backend"] == "litert" and rep["loss_last"] < rep["loss_first"]


def _write_images(root: Path, classes: dict[str, int], size: tuple[int, int], mode: str = "RGB") -> None:
    from PIL import Image

    rng = np.random.default_rng(3)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")


@pytest.mark.slow  # a MobileNetV2 export (~30 s): make test, not the fast lane
def test_image_folder_is_decoded_at_the_model_size_and_trains(mobilenet_export: tuple[Path, str],
                                                              tmp_path: Path) -> None:
    d, _ = mobilenet_export
    _write_images(tmp_path / "photos", {"cat": 5, "dog": 4, "owl": 3}, (40, 30))
    data = load_local(tmp_path / "photos", (96, 96, 3), "NHWC")
    assert data.x.shape == (12, 96, 96, 3) and data.x.dtype == np.float32
    assert float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.0 and float(data.x.std()) > 0.1
    assert data.y.tolist() == [0] * 5 + [1] * 4 + [2] * 3  # sorted class names
    code, rep, err = run_selftest("--artifacts", str(d), "--data", str(tmp_path / "photos"), "--steps", "10")
    assert code == 0, err
    assert rep["ok"] and rep["samples"] == 12


def test_image_csv_numeric_folders_layouts_and_the_cache_key(tmp_path: Path) -> None:
    from PIL import Image

    _write_images(tmp_path / "digits", {"7": 2, "3": 1}, (8, 6), mode="L")
    numeric = load_local(tmp_path / "digits", (6, 8, 1), "NHWC")
    assert sorted(numeric.y.tolist()) == [3, 7, 7]  # integer folder names are the labels
    first = numeric.images[0]
    pixels = np.asarray(Image.open(first), dtype=np.float32) / 255.0
    np.testing.assert_allclose(numeric.x[0, :, :, 0], pixels, atol=1e-6)  # same size: no resampling
    rows = ["file,label", *(f"{p.relative_to(tmp_path).as_posix()},{y}" for p, y in zip(numeric.images,
                                                                                          numeric.y, strict=True))]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    nchw = load_local(tmp_path / "list.csv", (3, 12, 16), "NCHW")
    assert nchw.x.shape == (3, 3, 12, 16) and nchw.y.tolist() == numeric.y.tolist()
    assert nchw.sha256 == numeric.sha256  # the same files and labels: the same feature-cache key
    # loaded without a model, then fitted to one: the agent's path
    plain = load_local(tmp_path / "digits")
    assert plain.x.shape == (3, 6, 8, 3)
    np.testing.assert_allclose(conform(plain, (3, 12, 16), "NCHW"), nchw.x, atol=1e-6)
    (tmp_path / "bad.csv").write_text("file,label\nmissing.png,1\n")
    with pytest.raises(DataError, match=r"missing\.png.*not an image file"):
        load_local(tmp_path / "bad.csv")


def test_predict_reads_images_at_the_model_size(tmp_path: Path) -> None:
    from fedge.runtime.data import load_inputs  # what fedge-agent predict reads its input with

    _write_images(tmp_path / "new", {"a": 2, "b": 1}, (10, 7))
    x = load_inputs(tmp_path / "new", (3, 14, 20), "NCHW")
    assert x.shape == (3, 3, 14, 20)
    np.testing.assert_array_equal(x, load_local(tmp_path / "new", (3, 14, 20), "NCHW").x)
    with pytest.raises(DataError, match=r"nothing\.csv"):
        load_inputs(tmp_path / "nothing.csv", (4,))
