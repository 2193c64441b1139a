"""Hub test fixtures: a synthetic artifacts folder (manifest + head.npz + a stand-in backbone file)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol.manifest import save_head

F, H, C = 6, 4, 3
SHAPES = {"h0_kernel": (F, H), "h0_bias": (H,), "h1_kernel": (H, C), "h1_bias": (C,)}


def make_artifacts(folder: Path, seed: int = 0, backbone_bytes: bytes = b"not really onnx") -> Path:
    """A manifest-valid artifacts folder with a small 2-layer head and one opaque backbone file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    save_head(folder / "head.npz", head)
    (folder / "backbone.onnx").write_bytes(backbone_bytes)
    files = {}
    for name in ("backbone.onnx", "head.npz"):
        data = (folder / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest: dict[str, Any] = {
        "format": 1, "model": "synthetic", "input": {"name": "x", "shape": [F], "dtype": "float32"},
        "feature_dim": F, "num_classes": C, "train_batch": 8,
        "head": [{"name": k, "shape": list(s), "dtype": "float32"} for k, s in SHAPES.items()],
        "head_activations": ["relu", "linear"],
        "backbone_sha256": hashlib.sha256(backbone_bytes).hexdigest(),
        "files": files, "created": "2026-01-01T00:00:00Z",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    return make_artifacts(tmp_path / "artifacts")


@pytest.fixture
def hub_toml(tmp_path: Path, artifacts: Path) -> Callable[..., Path]:
    """Write a hub.toml (extra TOML appended) and return its path."""

    def write(extra: str = "", rounds: str = "min_devices = 2\ndeadline_s = 30\n") -> Path:
        path = tmp_path / "hub.toml"
        path.write_text(
            f'fleet = "f1"\nstate_dir = "state"\nartifacts = "{artifacts}"\n{extra}\n'
            f'[broker]\nurl = "mqtt://127.0.0.1:1883"\n\n[rounds]\n{rounds}'
        )
        return path

    return write
