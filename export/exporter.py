"""``export_model``: a Keras model (object, ``.keras`` path or zoo name) -> the artifacts directory.

Writes ``model.tflite``, ``backbone.onnx``, ``model.onnx``, ``ort/head/``, ``ort/full/``,
``head.npz`` and, last, ``manifest.json`` (sha256 and size of every file, relative paths with
``/``). The old ``manifest.json`` is removed first, so a half-written export never verifies.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedge.export.onnx_builder import backbone_graph, full_graph
from fedge.export.tfenv import import_tensorflow
from fedge.export.zoo import ZOO, SplitModel, build_zoo_model, init_weights, split_model
from fedge.protocol.errors import ArtifactError, ConfigError
from fedge.protocol.manifest import (
    FORMAT,
    HEAD_FILE,
    MANIFEST_FILE,
    FileEntry,
    HeadParam,
    InputSpec,
    Manifest,
    backbone_digest,
    save_head,
    sha256_file,
    verify_artifacts,
)

__all__ = ["export_model", "export_split", "load_keras_model", "ort_training_available"]

log = logging.getLogger(__name__)


def ort_training_available() -> bool:
    """True when ``onnxruntime.training`` (onnxruntime-training-cpu) can be imported without torch."""
    try:
        from fedge.runtime.trainers.ort_shim import import_training

        import_training("artifacts")
    except (ImportError, ArtifactError):
        return False
    return True


def load_keras_model(
    model: Any, num_classes: int = 10, input_dim: int = 64, seed: int = 0
) -> tuple[Any, str]:
    """``(keras_model, name)`` from a Keras model, a ``.keras`` path, or a zoo name (fresh weights)."""
    if not isinstance(model, (str, Path)):
        return model, str(model.name)
    text = str(model)
    if text in ZOO and not Path(text).exists():
        keras_model = build_zoo_model(text, num_classes, input_dim)
        init_weights(keras_model, np.random.default_rng(seed))
        return keras_model, text
    path = Path(text)
    if not path.is_file():
        raise ConfigError("model", f"{text!r} is neither a zoo model ({', '.join(ZOO)}) nor a model file")
    import_tensorflow()
    import keras

    try:
        keras_model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors, ...
        raise ConfigError("model", f"cannot load Keras model {str(path)!r}: {exc}") from exc
    return keras_model, str(keras_model.name)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def export_split(
    split: SplitModel, out_dir: str | Path, train_batch: int = 32, with_ort: bool | None = None
) -> Manifest:
    """Write every artifact of ``split`` into ``out_dir`` and return the verified manifest."""
    from fedge.export.tflite import export_tflite

    if train_batch < 1:
        raise ConfigError("train_batch", "must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    written: list[Path] = []

    export_tflite(split, out / "model.tflite", train_batch)
    written.append(out / "model.tflite")
    for name, graph in (("backbone.onnx", backbone_graph(split)), ("model.onnx", full_graph(split))):
        (out / name).write_bytes(graph.SerializeToString())
        written.append(out / name)
    if with_ort is None:
        with_ort = ort_training_available()
        if not with_ort:
            log.warning("onnxruntime-training is not installed: no ort/ artifacts (LiteRT and NumPy trainers only)")
    if with_ort:
        from fedge.export.ort_artifacts import write_ort_artifacts

        written.extend(write_ort_artifacts(split, out / "ort"))
    save_head(out / HEAD_FILE, split.head)
    written.append(out / HEAD_FILE)

    files = {p.relative_to(out).as_posix(): FileEntry(sha256_file(p), p.stat().st_size) for p in written}
    manifest = Manifest(
        model=split.name,
        input=InputSpec("x", split.input_shape, "float32"),
        feature_dim=split.feature_dim,
        num_classes=split.num_classes,
        train_batch=train_batch,
        head=tuple(HeadParam(n, tuple(int(d) for d in a.shape), "float32") for n, a in split.head.items()),
        head_activations=split.head_activations,
        backbone_sha256=backbone_digest(split.backbone_weights),
        files=files,
        created=_utc_now(),
        format=FORMAT,
    )
    tmp = out / (MANIFEST_FILE + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    tmp.replace(out / MANIFEST_FILE)
    return verify_artifacts(out)


def export_model(
    model: Any,
    out_dir: str | Path,
    head_start: str | None = None,
    train_batch: int = 32,
    num_classes: int = 10,
    *,
    input_dim: int = 64,
    seed: int = 0,
    with_ort: bool | None = None,
) -> Manifest:
    """Export a Keras model, a ``.keras`` file, or a zoo name (fresh, untrained weights from ``seed``).

    ``num_classes``/``input_dim`` only matter for a zoo name. ``head_start`` names the first head
    layer (default: ``head0`` when present, else the last layer). ``with_ort=None`` writes
    ``ort/`` when onnxruntime-training is installed.
    """
    start = time.perf_counter()
    keras_model, name = load_keras_model(model, num_classes, input_dim, seed)
    split = split_model(keras_model, head_start, name=name)
    manifest = export_split(split, out_dir, train_batch, with_ort)
    log.info("exported %s to %s in %.1f s", name, out_dir, time.perf_counter() - start)
    return manifest
