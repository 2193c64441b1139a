"""Import ``onnxruntime.training.api`` without ``onnxruntime/training/__init__.py`` (which imports torch).

A bare package module is registered as ``onnxruntime.training`` (``__path__`` set to the
real folder) so its sub-modules import normally.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError

__all__ = ["ort_training_available", "training_api"]


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


def training_api() -> Any:
    """The ``onnxruntime.training.api`` module, imported without torch."""
    d = _training_dir()
    if d is None:
        raise ConfigError("backend", "ort is not installed: pip install onnxruntime-training-cpu==1.19.2")
    name = "onnxruntime.training"
    if name not in sys.modules:
        import onnxruntime

        pkg = types.ModuleType(name)
        pkg.__path__ = [str(d)]
        pkg.__package__ = name
        sys.modules[name] = pkg
        onnxruntime.training = pkg
    return importlib.import_module("onnxruntime.training.api")
