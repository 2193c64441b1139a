"""On-device trainers: LiteRT, ONNX Runtime training and a NumPy head over a runtime backbone.

``open_trainer(dir, backend="auto")`` tries litert → ort → numpy (the first installed one
that opens the artifacts); a named back-end that is not installed raises ``ConfigError``.
Runtimes are imported lazily, inside the functions.
"""

from __future__ import annotations

from pathlib import Path

from fedge.core.trainer import BACKENDS, Trainer
from fedge.protocol.errors import ArtifactError, ConfigError, FedgeError

__all__ = ["BACKENDS", "Trainer", "available_backends", "install_hint", "open_trainer"]

_INSTALL = {
    "litert": "pip install ai-edge-litert (or tflite-runtime)",
    "ort": "pip install onnxruntime-training-cpu==1.19.2",
    "numpy": "pip install onnxruntime or ai-edge-litert (the NumPy head needs a backbone runtime)",
}


def install_hint(backend: str) -> str:
    """How to install ``backend`` here (ONNX Runtime training has wheels for x86_64, macOS and Windows only)."""
    import platform

    if backend == "ort" and platform.machine().lower() not in ("x86_64", "amd64"):
        return (f"onnxruntime-training-cpu (deprecated upstream, last release 1.19.2) has no wheels for "
                f"{platform.machine()}: use litert or numpy")
    return _INSTALL[backend]


def available_backends() -> list[str]:
    """Installed back-ends, in auto order (checked without importing the runtimes)."""
    from fedge.runtime.trainers._litert import litert_available
    from fedge.runtime.trainers.backbone import onnxruntime_available
    from fedge.runtime.trainers.ort_shim import ort_training_available

    out: list[str] = []
    if litert_available():
        out.append("litert")
    if ort_training_available():
        out.append("ort")
    if litert_available() or onnxruntime_available():
        out.append("numpy")
    return out


def _open(artifacts_dir: Path, backend: str) -> Trainer:
    if backend == "litert":
        from fedge.runtime.trainers.litert import LiteRTTrainer

        return LiteRTTrainer.open(artifacts_dir)
    if backend == "ort":
        from fedge.runtime.trainers.ort import OrtTrainer

        return OrtTrainer.open(artifacts_dir)
    from fedge.runtime.trainers.numpy_head import NumpyTrainer

    return NumpyTrainer.open(artifacts_dir)


def open_trainer(artifacts_dir: str | Path, backend: str = "auto") -> Trainer:
    """A trainer over the artifacts in ``artifacts_dir`` (``backend``: auto|litert|ort|numpy)."""
    d = Path(artifacts_dir)
    if backend not in ("auto", *BACKENDS):
        raise ConfigError("backend", f"unknown back-end {backend!r} (choose auto, {', '.join(BACKENDS)})")
    have = available_backends()
    if backend != "auto":
        if backend not in have:
            raise ConfigError("backend", f"{backend} is not installed on this device: {install_hint(backend)}")
        return _open(d, backend)
    if not have:
        raise ConfigError("backend", "no training runtime installed: pip install ai-edge-litert")
    errors: list[str] = []
    for name in have:
        try:
            return _open(d, name)
        except FedgeError as exc:
            errors.append(f"{name}: {exc}")
    raise ArtifactError(f"{d}: no back-end could open the artifacts ({'; '.join(errors)})")
