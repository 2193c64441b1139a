"""Check that the agent's requirements resolve to wheels only on a Raspberry Pi (Pi OS 64-bit, Python 3.11).

Reads ``fedge[agent]`` (the core dependencies plus the ``agent`` extra) from pyproject.toml and runs
``pip download --only-binary=:all:`` for linux aarch64 with every manylinux tag Pi OS bookworm (glibc 2.36)
accepts: pip does not widen ``--platform`` to older tags by itself. Fails when anything would need a build.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEEDED = ("ai_edge_litert", "numpy", "pillow")  # the runtime, the arrays, image decoding (image-folder data)
TAGS = ["manylinux_2_36_aarch64", "manylinux_2_34_aarch64", "manylinux_2_28_aarch64", "manylinux_2_27_aarch64",
        "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"]


def requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["agent"])
    return sorted(set(reqs))


def main() -> int:
    reqs = requirements()
    with tempfile.TemporaryDirectory(prefix="fedge-aarch64-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
               "--implementation", "cp", "--abi", "cp311", "-d", tmp]
        for tag in TAGS:
            cmd += ["--platform", tag]
        proc = subprocess.run([*cmd, *reqs], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"fedge[agent] does not resolve to aarch64 wheels:\n{proc.stderr[-4000:]}", file=sys.stderr)
            return 1
        wheels = sorted(p.name for p in Path(tmp).iterdir())
        size = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
    for needed in NEEDED:  # must come as wheels, not be silently dropped by a marker
        if not any(w.lower().startswith(needed + "-") and w.endswith(".whl") for w in wheels):
            print(f"fedge[agent] on aarch64 / Python 3.11: no {needed} wheel among {wheels}", file=sys.stderr)
            return 1
    print(f"fedge[agent] on aarch64 / Python 3.11: {len(wheels)} wheels, {size:.0f} MB, no builds")
    for name in wheels:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
