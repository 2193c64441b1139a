"""``export``: a source model (Keras model, ``.keras`` file, zoo name, or ONNX backbone) -> the artifacts folder.

Writes only what devices use (see :data:`ROLES`, also recorded per file in ``manifest.json``): ``model.tflite``,
``backbone.tflite`` (``quantize`` only), ``backbone.onnx``, ``ort/head/``, ``head.npz`` and, last,
``manifest.json``. Everything is written into a temporary folder beside ``out_dir``, verified against the
source (:mod:`fedge.export.verify`) and only then moved to ``out_dir``: a failed export leaves nothing there.
An existing ``out_dir`` is replaced only when it is empty or an earlier export (it holds ``manifest.json``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedge.export.split import Split, split_keras
from fedge.export.tfenv import import_tensorflow
from fedge.export.verify import Check, sample_inputs, verify_export
from fedge.export.zoo import ZOO, build_zoo_model, init_weights
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

__all__ = ["ROLES", "ExportResult", "export", "export_model", "load_keras_model", "ort_training_available"]

log = logging.getLogger(__name__)

#: What each file is for (written into the manifest's ``files`` entries as ``role``).
ROLES: dict[str, str] = {
    "model.tflite": "LiteRT trainer: features, train_head, get_head, set_head signatures",
    "model.tflite+q": "LiteRT trainer: train_head, get_head, set_head signatures (features: backbone.tflite)",
    "backbone.tflite": "LiteRT trainer: features signature of the {mode}-quantised backbone",
    "backbone.onnx": "ONNX Runtime and NumPy trainers: backbone features (onnxruntime)",
    "ort/head/training_model.onnx": "ONNX Runtime training trainer: head training graph",
    "ort/head/eval_model.onnx": "ONNX Runtime training trainer: head evaluation graph",
    "ort/head/optimizer_model.onnx": "ONNX Runtime training trainer: SGD optimizer graph",
    "ort/head/checkpoint": "ONNX Runtime training trainer: initial head parameters",
    HEAD_FILE: "initial head (NumPy trainer, hub registry)",
}


@dataclass(frozen=True)
class ExportResult:
    manifest: Manifest
    checks: tuple[Check, ...]
    notes: tuple[str, ...]


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


def load_calibration(path: str | Path, input_shape: tuple[int, ...]) -> NDArray[np.float32]:
    """The ``x`` array of a calibration ``.npz`` as float32 ``[N, *input_shape]`` (``[N, H, W]`` gains a channel)."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            if "x" not in z.files:
                raise ConfigError("calibration", f"{str(p)!r} has no array 'x' (has: {', '.join(z.files)})")
            x = np.asarray(z["x"], dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError("calibration", f"cannot read {str(p)!r}: {exc}") from exc
    if tuple(x.shape[1:]) != input_shape and (*tuple(x.shape[1:]), 1) == input_shape:
        x = x[..., None]
    if tuple(x.shape[1:]) != input_shape or len(x) == 0:
        raise ConfigError("calibration", f"{str(p)!r}: x is {list(x.shape)}, the model takes [N, "
                          f"{', '.join(map(str, input_shape))}]")
    return np.ascontiguousarray(x)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_artifacts(split: Split, d: Path, train_batch: int, with_ort: bool, quantize: str | None,
                     calibration: NDArray[np.float32] | None) -> tuple[dict[str, Path], list[NDArray[Any]]]:
    """Every artifact file in ``d``: ``{relative name: path}`` and the arrays ``backbone_sha256`` hashes."""
    written: dict[str, Path] = {}
    digest_parts: list[NDArray[Any]] = list(split.backbone_weights)
    if split.keras_backbone is not None:
        from fedge.export.onnx_graphs import keras_backbone_onnx
        from fedge.export.tflite import convert_backbone, convert_model

        (d / "model.tflite").write_bytes(convert_model(split, train_batch, with_features=quantize is None))
        written["model.tflite"] = d / "model.tflite"
        if quantize is not None:
            data = convert_backbone(split, train_batch, quantize, calibration)
            (d / "backbone.tflite").write_bytes(data)
            written["backbone.tflite"] = d / "backbone.tflite"
            digest_parts.append(np.frombuffer(data, dtype=np.uint8))  # a quantised backbone is a new version
        onnx_model = keras_backbone_onnx(split)
    else:
        onnx_model = split.onnx_backbone
    (d / "backbone.onnx").write_bytes(onnx_model.SerializeToString())
    written["backbone.onnx"] = d / "backbone.onnx"
    if with_ort:
        from fedge.export.ort_artifacts import write_ort_artifacts

        for p in write_ort_artifacts(split, d / "ort"):
            written[p.relative_to(d).as_posix()] = p
    save_head(d / HEAD_FILE, split.head)
    written[HEAD_FILE] = d / HEAD_FILE
    return written, digest_parts


def _role(name: str, quantize: str | None) -> str:
    if name == "model.tflite" and quantize is not None:
        return ROLES["model.tflite+q"]
    return ROLES[name].format(mode=quantize or "")


def _write_manifest(split: Split, d: Path, train_batch: int, written: dict[str, Path],
                    digest_parts: list[NDArray[Any]], quantize: str | None) -> None:
    files = {name: FileEntry(sha256_file(p), p.stat().st_size, _role(name, quantize))
             for name, p in written.items()}
    manifest = Manifest(
        model=split.name,
        input=InputSpec("x", split.input_shape, "float32", split.layout),
        feature_dim=split.feature_dim,
        feature_shape=split.features if len(split.features) > 1 else (),
        num_classes=split.num_classes,
        train_batch=train_batch,
        head=tuple(HeadParam(n, tuple(int(s) for s in a.shape), "float32") for n, a in split.head.items()),
        head_activations=split.head_activations,
        backbone_sha256=backbone_digest(digest_parts),
        files=files,
        created=_utc_now(),
        format=FORMAT,
    )
    (d / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        raise ConfigError("out", f"{str(out)!r} exists and is not an artifacts folder (no {MANIFEST_FILE}): "
                          "choose a new or empty folder")


def export_split(
    split: Split,
    out_dir: str | Path,
    train_batch: int = 32,
    with_ort: bool | None = None,
    *,
    quantize: str | None = None,
    calibration: NDArray[np.float32] | None = None,
    report: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write, verify and publish every artifact of ``split`` in ``out_dir``."""
    if train_batch < 1:
        raise ConfigError("train_batch", "must be >= 1")
    if quantize is not None and split.keras_backbone is None:
        raise ConfigError("quantize", "quantisation needs a Keras model (the LiteRT converter quantises the "
                          "backbone); an ONNX backbone is exported in float")
    out = Path(out_dir)
    _check_out(out)
    notes: list[str] = []
    if with_ort is None:
        with_ort = ort_training_available()
        if not with_ort:
            notes.append("onnxruntime-training is not installed: no ort/ artifacts (LiteRT and NumPy trainers only)")
    if split.keras_backbone is None:
        notes.append("LiteRT: no model.tflite for an ONNX backbone (onnx2tf, the ONNX -> LiteRT converter, pins "
                     "onnx 1.19, plain onnxruntime 1.23 and TensorFlow 2.19, which cannot install beside fedge's "
                     "ONNX Runtime training pins); devices train it with ONNX Runtime training, or the NumPy head "
                     "over onnxruntime (pip install onnxruntime where onnxruntime-training-cpu has no wheel)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        written, digest_parts = _write_artifacts(split, tmp, train_batch, with_ort, quantize, calibration)
        _write_manifest(split, tmp, train_batch, written, digest_parts, quantize)
        verify_artifacts(tmp)
        checks = verify_export(tmp, split, sample_inputs(split, calibration), quantized=quantize is not None,
                               report=report)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for note in notes:
        log.warning("%s", note)
    return ExportResult(verify_artifacts(out), tuple(checks), tuple(notes))


def export(
    model: Any,
    out_dir: str | Path,
    head_start: str | None = None,
    train_batch: int = 32,
    num_classes: int = 10,
    *,
    input_dim: int = 64,
    seed: int = 0,
    with_ort: bool | None = None,
    backbone: str | Path | None = None,
    hidden: int = 0,
    quantize: str | None = None,
    calibration: str | Path | None = None,
    report: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a Keras model / ``.keras`` file / zoo name, or (``backbone``) an ONNX feature extractor.

    With ``backbone`` the head is new: ``num_classes`` outputs (``hidden`` > 0: one ReLU layer first), seeded
    by ``seed``; ``model`` is ignored. ``quantize`` (``int8`` needs ``calibration``, an ``.npz`` with ``x``)
    adds ``backbone.tflite``. ``report`` receives the verification lines.
    """
    start = time.perf_counter()
    if backbone is not None:
        from fedge.export.onnx_source import split_onnx

        split = split_onnx(backbone, num_classes, hidden, seed)
    else:
        keras_model, name = load_keras_model(model, num_classes, input_dim, seed)
        split = split_keras(keras_model, head_start, name=name)
    calib = load_calibration(calibration, split.input_shape) if calibration is not None else None
    result = export_split(split, out_dir, train_batch, with_ort, quantize=quantize, calibration=calib, report=report)
    log.info("exported %s to %s in %.1f s", split.name, out_dir, time.perf_counter() - start)
    return result


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
    """:func:`export` of a Keras model, ``.keras`` file or zoo name; returns the verified manifest."""
    return export(model, out_dir, head_start, train_batch, num_classes, input_dim=input_dim, seed=seed,
                  with_ort=with_ort).manifest
