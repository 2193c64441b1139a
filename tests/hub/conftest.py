"""Hub test fixtures: a synthetic artifacts folder (manifest + head.npz + a stand-in backbone file)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hub.fleet import make_artifacts


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
