"""Import ``onnxruntime.training.api`` without ``onnxruntime/training/__init__.py`` (which imports torch).

A bare package module is registered as ``onnxruntime.training`` (``__path__`` set to the
real folder) so its sub-modules import normally. It is registered *before* ``onnxruntime``
itself is imported: in the training wheel ``import onnxruntime`` otherwise runs the real
``onnxruntime.training`` package (its version check imports ``ortmodule``), which pulls in
``onnx`` (and torch when installed). Use ``import_onnxruntime()`` everywhere (agent and exporter).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

from fedge.protocol.errors import ArtifactError, ConfigError

__all__ = ["import_onnxruntime", "import_training", "ort_training_available", "training_api"]


def _training_dir() -> Path | None:
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "training"
        if (d / "api" / "module.py").is_file():
            return d
    return None


def ort_training_available() -> bool:
    """True when onnxruntime with the on-device training API is installed (nothing is imported)."""
    return _training_dir() is not None


def _register_bare_training(d: Path) -> None:
    name = "onnxruntime.training"
    if name in sys.modules:
        return
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(d)]
    pkg.__package__ = name
    sys.modules[name] = pkg
    parent = sys.modules.get("onnxruntime")
    if parent is not None:
        setattr(parent, "training", pkg)  # noqa: B010


def import_onnxruntime() -> Any:
    """``import onnxruntime`` without running ``onnxruntime.training/__init__`` (no onnx, no torch)."""
    if "onnxruntime" not in sys.modules:
        d = _training_dir()
        if d is not None:
            _register_bare_training(d)
    return importlib.import_module("onnxruntime")


def import_training(submodule: str) -> Any:
    """``onnxruntime.training.<submodule>`` (``"api"`` or ``"artifacts"``), imported without torch.

    Raises :class:`ArtifactError` when no onnxruntime with training support is installed.
    """
    d = _training_dir()
    if d is None:
        raise ArtifactError(
            "onnxruntime with training support is not installed (pip install onnxruntime-training-cpu==1.19.2; "
            "plain onnxruntime has no training API)"
        )
    _register_bare_training(d)
    ort = import_onnxruntime()
    if not hasattr(ort, "training"):
        setattr(ort, "training", sys.modules["onnxruntime.training"])  # noqa: B010
    return importlib.import_module(f"onnxruntime.training.{submodule}")


def training_api() -> Any:
    """The ``onnxruntime.training.api`` module, imported without torch (``ConfigError`` on ``backend``
    when the ORT training wheel is missing)."""
    if _training_dir() is None:
        raise ConfigError("backend", "ort is not installed: pip install onnxruntime-training-cpu==1.19.2")
    return import_training("api")
