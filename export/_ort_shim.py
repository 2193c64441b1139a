"""Import ``onnxruntime.training.artifacts`` / ``.api`` without torch.

``import onnxruntime.training`` runs its ``__init__``, which imports torch (not installed).
The sub-modules we need do not: register a bare package module for ``onnxruntime.training``
(``__path__`` set to its folder) before importing them.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from protocol.errors import ArtifactError

__all__ = ["import_training"]


def import_training(submodule: str) -> Any:
    """``onnxruntime.training.<submodule>`` (``"artifacts"`` or ``"api"``), torch-free."""
    name = "onnxruntime.training"
    if name not in sys.modules:
        spec = find_spec("onnxruntime")
        if spec is None or spec.origin is None:
            raise ArtifactError("onnxruntime is not installed (pip install onnxruntime-training-cpu)")
        folder = Path(spec.origin).parent / "training"
        if not folder.is_dir():
            raise ArtifactError(
                f"{folder} does not exist: this onnxruntime has no training support "
                "(install onnxruntime-training-cpu, not onnxruntime)"
            )
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)]
        pkg.__package__ = name
        sys.modules[name] = pkg
    return import_module(f"{name}.{submodule}")
