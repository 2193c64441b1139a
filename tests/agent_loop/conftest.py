"""Fixtures of the agent-loop tests: real exported artifacts and helpers building the hub's messages.

``artifacts_dir``: ``$FEDGE_ARTIFACTS`` when set (the agent-only venv has no TensorFlow), else a small
cnn28 export made once per session with ``export.testing.export_small``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.protocol.manifest import Manifest, load_head


@pytest.fixture(scope="session")
def manifest(artifacts_dir: Path) -> Manifest:
    return Manifest.from_json((artifacts_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def initial_head(artifacts_dir: Path) -> dict[str, np.ndarray]:
    return load_head(artifacts_dir)
