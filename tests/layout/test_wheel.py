"""A wheel built from the tree installs one top-level import name, ``fedge``, with its package data."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources it builds
    src = tmp_path_factory.mktemp("src") / "fedge"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".*_cache", "demo-out", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=600)
    (whl,) = out.glob("fedge-*.whl")
    return whl


def test_wheel_holds_only_the_fedge_namespace(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top_level).decode().split() == ["fedge"]
        (record,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        roots = {line.split("/", 1)[0] for line in z.read(record).decode().splitlines() if line}
    assert {r for r in roots if not r.endswith(".dist-info")} == {"fedge"}
    for must in ("fedge/hub/daemon.py", "fedge/edge_agent/agent.py", "fedge/protocol/codec.py", "fedge/cli.py",
                 "fedge/datasets/partition.py", "fedge/devices/profiles/rpi5.toml",
                 "fedge/devices/templates/fedge-agent.service", "fedge/hub/dashboard/static/app.js", "fedge/py.typed"):
        assert must in names, must


def test_installed_wheel_has_no_hub_module(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    probe = ("import importlib.util as u, fedge; "
             "print([m for m in ('hub', 'export', 'protocol', 'devices', 'edge_agent') if u.find_spec(m)], "
             "fedge.__version__, bool(u.find_spec('fedge.hub.daemon')))")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "0.1.0", "True"]
