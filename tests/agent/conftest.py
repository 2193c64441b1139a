"""Shared fixtures of the agent tests.

``artifacts_dir``: ``$FEDGE_ARTIFACTS`` when set (CI's agent-only venv: no TensorFlow there),
else a small cnn28 export made once per session with ``export.testing.export_small``.
Marker ``full_env``: tests that only hold in the full venv (deselected in the agent venv).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "full_env: needs the full venv (every back-end installed); CI deselects it in the agent venv"
    )
