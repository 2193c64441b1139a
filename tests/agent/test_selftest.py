"""``selftest`` run as a device would: a subprocess printing one JSON object."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.protocol.manifest import load_manifest
from fedge.runtime.trainers import available_backends

KEYS = {"ok", "backend", "steps", "loss_first", "loss_last", "ms_per_step", "peak_rss_mb"}


def run_selftest(*args: str) -> tuple[int, dict[str, Any], str]:
    out = subprocess.run(
        [sys.executable, "-m", "fedge.edge_agent.selftest", *args], capture_output=True, text=True, timeout=120
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout + out.stderr
    return out.returncode, json.loads(lines[0]), out.stderr


@pytest.mark.parametrize("backend", ["auto", *available_backends()])
def test_selftest_trains_and_reports(backend: str, artifacts_dir: Path) -> None:
    code, rep, err = run_selftest("--artifacts", str(artifacts_dir), "--backend", backend, "--steps", "15")
    assert code == 0, err
    assert set(rep) >= KEYS
    assert rep["ok"] is True
    assert rep["backend"] == ("litert" if backend == "auto" else backend)
    assert rep["steps"] == 15
    assert rep["loss_last"] < rep["loss_first"]
    assert 0 < rep["ms_per_step"] < 1000
    assert 10 < rep["peak_rss_mb"] < 300  # an agent process, not TensorFlow-sized


def test_selftest_with_local_data(artifacts_dir: Path, tmp_path: Path) -> None:
    m = load_manifest(artifacts_dir)
    rng = np.random.default_rng(1)
    data = tmp_path / "local.npz"
    np.savez(data, x=rng.random((100, *m.input.shape), dtype=np.float32), y=rng.integers(0, m.num_classes, 100))
    code, rep, err = run_selftest("--artifacts", str(artifacts_dir), "--data", str(data), "--steps", "24")
    assert code == 0, err
    assert rep["ok"] and rep["data"] == str(data) and rep["samples"] == 100
    assert rep["loss_last"] < rep["loss_first"]


def test_selftest_fails_on_a_tampered_artifact(artifacts_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "artifacts"
    shutil.copytree(artifacts_dir, bad)
    tfl = bad / "model.tflite"
    raw = bytearray(tfl.read_bytes())
    raw[-1] ^= 0xFF
    tfl.write_bytes(bytes(raw))
    code, rep, err = run_selftest("--artifacts", str(bad))
    assert code == 1
    assert rep["ok"] is False and "model.tflite" in rep["error"]
    assert "FAILED" in err and "model.tflite" in err


def test_selftest_fails_on_bad_data(artifacts_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "broken.npz"
    data.write_bytes(b"nope")
    code, rep, _ = run_selftest("--artifacts", str(artifacts_dir), "--data", str(data))
    assert code == 1 and rep["ok"] is False and "broken.npz" in rep["error"]
