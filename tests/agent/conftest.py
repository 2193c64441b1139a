"""Shared fixtures of the agent tests.

``artifacts_dir``: ``$FEDGE_ARTIFACTS`` when set (CI's agent-only venv: no TensorFlow there),
else a small cnn28 export made once per session with ``export.testing.export_small``.
Marker ``full_env``: tests that only hold in the full venv (deselected in the agent venv).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "full_env: needs the full venv (every back-end installed); CI deselects it in the agent venv"
    )


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("FEDGE_ARTIFACTS")
    if env:
        d = Path(env)
        assert (d / "manifest.json").is_file(), f"FEDGE_ARTIFACTS={env} has no manifest.json"
        return d
    from export.testing import export_small

    d = tmp_path_factory.mktemp("artifacts") / "cnn28"
    export_small(d, model="cnn28")
    return d
