"""Fixtures of the dashboard tests: the hub tests' synthetic artifacts, and the end-to-end fleet harness
(``make_fleet``, ``fleet_data``; process logs attached to a failing test's report)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import fleet_data, make_fleet, pytest_runtest_makereport  # noqa: F401
from tests.hub.fleet import make_artifacts


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    return make_artifacts(tmp_path / "artifacts")
