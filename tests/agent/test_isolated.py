"""The isolating trainer and the back-end probe: a back-end runs in a worker process, and whatever it does there (a
real SIGSEGV, a hang, wrong numbers) becomes a ``TrainerCrash`` or a verdict with the reason, never a dead caller.
Runs in the agent-only venv too (and so on the emulated Pi of ``make test-aarch64``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fedge.protocol.errors import ArtifactError, ConfigError, TrainerCrash
from fedge.protocol.manifest import load_head, load_manifest
from fedge.runtime.trainers import available_backends, open_trainer
from fedge.runtime.trainers.isolated import IsolatedTrainer
from fedge.runtime.trainers.probe import probe_backend


def _batch(artifacts_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    m = load_manifest(artifacts_dir)
    rng = np.random.default_rng(5)
    return (rng.random((m.train_batch + 7, *m.input.shape), dtype=np.float32),
            rng.integers(0, m.num_classes, m.train_batch + 7))


@pytest.mark.parametrize("backend", available_backends())
def test_the_isolated_trainer_computes_what_the_back_end_computes_in_process(artifacts_dir: Path,
                                                                             backend: str) -> None:
    x, y = _batch(artifacts_dir)
    direct = open_trainer(artifacts_dir, backend)
    head = load_head(artifacts_dir)
    direct.set_head(head)
    with IsolatedTrainer(artifacts_dir, backend) as iso:
        assert iso.name == backend and iso.batch_size == direct.batch_size and iso.alive
        iso.set_head(head)
        f_iso, f_dir = iso.features(x), direct.features(x)
        np.testing.assert_allclose(f_iso, f_dir, rtol=1e-6, atol=1e-6)
        b = iso.batch_size
        for s in (0, b):  # a full batch, then a short one (padded and masked by the back-end)
            assert iso.train_step(f_iso[s : s + b], y[s : s + b], 0.05) == pytest.approx(
                direct.train_step(f_dir[s : s + b], y[s : s + b], 0.05), rel=1e-5)
        for name, value in direct.get_head().items():
            np.testing.assert_allclose(iso.get_head()[name], value, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(iso.logits(f_iso), direct.logits(f_dir), rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="rows"):  # the back-end's own errors keep their type
            iso.train_step(f_iso[:0], y[:0], 0.05)
        pid = iso.pid
    assert not iso.alive and not Path(f"/proc/{pid}").exists(), "the worker goes with the trainer"


def test_a_segfault_in_the_back_end_is_a_trainer_crash_naming_signal_and_call(artifacts_dir: Path) -> None:
    backend = available_backends()[0]
    x, y = _batch(artifacts_dir)
    iso = IsolatedTrainer(artifacts_dir, backend, env={"FEDGE_WORKER_FAULT": f"{backend}:segv:train_step:2"})
    f = iso.features(x)
    b = iso.batch_size
    iso.train_step(f[:b], y[:b], 0.05)
    with pytest.raises(TrainerCrash) as err:
        iso.train_step(f[:b], y[:b], 0.05)
    assert (err.value.backend, err.value.reason) == (backend, "crashed with SIGSEGV in train_step")
    assert not iso.alive
    with pytest.raises(TrainerCrash):  # every later call says the same, without a worker to ask
        iso.get_head()
    iso.close()


def test_a_hung_back_end_is_killed_after_the_timeout(artifacts_dir: Path) -> None:
    backend = available_backends()[0]
    iso = IsolatedTrainer(artifacts_dir, backend, timeout_s=3, env={"FEDGE_WORKER_FAULT": f"{backend}:hang:get_head"})
    t0 = time.monotonic()
    with pytest.raises(TrainerCrash, match="did not answer get_head within 3 s"):
        iso.get_head()
    assert time.monotonic() - t0 < 20 and not iso.alive
    iso.close()


def test_errors_opening_the_back_end_keep_their_type_and_stop_the_worker(artifacts_dir: Path, tmp_path: Path) -> None:
    missing = [b for b in ("litert", "ort", "numpy") if b not in available_backends()]
    with pytest.raises(ConfigError) as err:  # not installed here (or not a back-end at all)
        IsolatedTrainer(artifacts_dir, (missing or ["nonesuch"])[0])
    assert err.value.field == "backend"
    with pytest.raises(ArtifactError):  # no artifacts there
        IsolatedTrainer(tmp_path, available_backends()[0])
    assert not [c for c in child_cmdlines() if "fedge.runtime.trainers.worker" in c], "no worker left behind"


def child_cmdlines() -> list[str]:
    """Command lines of this process's children (from /proc)."""
    import os

    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid():
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    out.append(fh.read().replace(b"\0", b" ").decode())
        except (OSError, ValueError, IndexError):
            continue
    return out


def test_the_probe_passes_each_installed_back_end_and_fails_a_broken_one_with_its_reason(artifacts_dir: Path) -> None:
    for backend in available_backends():
        verdict = probe_backend(artifacts_dir, backend)
        assert verdict.ok and verdict.reason is None, verdict
    backend = available_backends()[0]
    crashed = probe_backend(artifacts_dir, backend, env={"FEDGE_WORKER_FAULT": f"{backend}:segv:features"})
    assert not crashed.ok and crashed.reason == "crashed with SIGSEGV in features"
    skewed = probe_backend(artifacts_dir, backend, env={"FEDGE_WORKER_FAULT": f"{backend}:skew:train_step:3"})
    assert not skewed.ok and skewed.reason is not None and "differs from the NumPy reference" in skewed.reason
