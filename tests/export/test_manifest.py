"""fedge.protocol.manifest: parsing names the bad field, verification names the bad file, head.npz round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.protocol.errors import ArtifactError
from fedge.protocol.manifest import Manifest, backbone_digest, load_head, load_manifest, save_head, verify_artifacts
from tests.export.support import Exported


@pytest.fixture
def copy(cnn28_export: Exported, tmp_path: Path) -> Path:
    d = tmp_path / "art"
    shutil.copytree(cnn28_export.dir, d)
    return d


@pytest.mark.parametrize("name", ["model.tflite", "ort/head/checkpoint", "head.npz", "backbone.onnx"])
def test_a_flipped_byte_makes_verify_name_the_file(copy: Path, name: str) -> None:
    verify_artifacts(copy)
    path = copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"'{name}'.*sha256"):
        verify_artifacts(copy)


def test_a_missing_or_resized_file_is_named(copy: Path) -> None:
    (copy / "ort" / "head" / "eval_model.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"'ort/head/eval_model\.onnx' is missing"):
        verify_artifacts(copy)
    with open(copy / "backbone.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match=r"'backbone\.onnx': .* bytes"):
        verify_artifacts(copy)


def test_no_manifest_is_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"manifest"):
        verify_artifacts(tmp_path)


def _mutated(copy: Path, change: Any) -> None:
    raw = json.loads((copy / "manifest.json").read_text())
    change(raw)
    (copy / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.pop("feature_dim"), "feature_dim"),
        (lambda r: r.update(num_classes="10"), "num_classes"),
        (lambda r: r.update(format=2), "format"),
        (lambda r: r["input"].pop("shape"), "input.shape"),
        (lambda r: r["input"].update(shape=[28, 0, 1]), "input.shape"),
        (lambda r: r["head"][1].update(name="bias0"), "head[1].name"),
        (lambda r: r["head"][0].pop("shape"), "head[0].shape"),
        (lambda r: r.update(head_activations=["relu"]), "head_activations"),
        (lambda r: r.update(backbone_sha256="abc"), "backbone_sha256"),
        (lambda r: r["files"]["model.tflite"].pop("size"), "files['model.tflite'].size"),
        (lambda r: r["files"].update({"../evil": {"sha256": "0" * 64, "size": 1}}), "files"),
        (lambda r: r.update(train_batch=True), "train_batch"),
        (lambda r: r["input"].update(layout="CHWN"), "input.layout"),
        (lambda r: r["files"]["model.tflite"].update(role=3), "files['model.tflite'].role"),
    ],
)
def test_invalid_manifest_fields_are_named(copy: Path, change: Any, field: str) -> None:
    _mutated(copy, change)
    with pytest.raises(ArtifactError) as info:
        load_manifest(copy)
    assert field in str(info.value)


def test_manifest_json_round_trip(cnn28_export: Exported) -> None:
    m = load_manifest(cnn28_export.dir)
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert json.loads(m.to_json()) == json.loads((cnn28_export.dir / "manifest.json").read_text())
    with pytest.raises(ArtifactError, match=r"not valid JSON"):
        Manifest.from_json("{")


def test_head_npz_round_trip_keeps_head_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    head = {"h1_bias": rng.normal(size=3), "h0_kernel": rng.normal(size=(4, 5)), "h1_kernel": rng.normal(size=(5, 3)),
            "h0_bias": rng.normal(size=5), "h10_bias": rng.normal(size=2)}
    save_head(tmp_path / "h.npz", head)
    back = load_head(tmp_path / "h.npz")
    assert list(back) == ["h0_kernel", "h0_bias", "h1_kernel", "h1_bias", "h10_bias"]
    for k, v in head.items():
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], v.astype(np.float32))


def test_head_npz_rejects_pickles_bad_names_and_dtypes(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", h0_kernel=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ArtifactError, match=r"obj\.npz"):
        load_head(tmp_path / "obj.npz")
    np.savez(tmp_path / "name.npz", weights=np.zeros(3, np.float32))
    with pytest.raises(ArtifactError, match=r"weights"):
        load_head(tmp_path / "name.npz")
    np.savez(tmp_path / "dtype.npz", h0_kernel=np.zeros((2, 2)))
    with pytest.raises(ArtifactError, match=r"float64"):
        load_head(tmp_path / "dtype.npz")
    with pytest.raises(ArtifactError, match=r"missing\.npz"):
        load_head(tmp_path / "missing.npz")


def test_backbone_digest_is_float32_little_endian_bytes_in_order() -> None:
    import hashlib

    a, b = np.arange(6, dtype=np.float64).reshape(2, 3), np.ones(2, dtype=">f4")
    want = hashlib.sha256(a.astype("<f4").tobytes() + b.astype("<f4").tobytes()).hexdigest()
    assert backbone_digest([a, b]) == want
    assert backbone_digest([b, a]) != want
