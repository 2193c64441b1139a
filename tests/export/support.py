"""Helpers shared by the export tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Exported:
    dir: Path
    keras_model: Any
    manifest: Any


def randomize(model: Any, rng: np.random.Generator) -> Any:
    """Seeded Glorot kernels and small non-zero biases (zero biases would hide bias bugs)."""
    from fedge.export.zoo import init_weights

    init_weights(model, rng)
    for layer in model.layers:
        ws = layer.get_weights()
        if ws:
            layer.set_weights([w if w.ndim > 1 else rng.normal(0, 0.1, w.shape).astype(np.float32) for w in ws])
    return model
