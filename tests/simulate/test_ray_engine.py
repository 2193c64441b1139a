"""``fedge simulate --engine ray``: the virtual devices train on Ray actors (a local cluster here) and the run ends
with the same global heads, bit for bit, as the in-process engine: only where the devices train differs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.demo import DemoPaths
from fedge.simulate import SimSettings, load_fleet, run_rounds
from fedge.simulate_engines import RayEngine


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    from fedge.export.testing import export_small

    paths = DemoPaths(tmp_path_factory.mktemp("ray"))
    export_small(paths.artifacts, trained=True)
    paths.source_model.write_bytes(b"")
    return paths


@pytest.mark.slow  # a local Ray cluster starts (~10-60 s)
def test_the_ray_engine_gives_the_in_process_heads(work: DemoPaths, tmp_path: Path) -> None:
    from fedge.core.device import DeviceData

    settings = SimSettings(devices=6, rounds=2, seed=4, validation_fraction=0.2, personalization="auto",
                           deploy_tolerance=0.05)
    fleet = load_fleet(work, 6, seed=0, backend="numpy")  # fresh: the actors compute every local-only head
    data = [DeviceData(f, y, k) for f, y, k in zip(fleet.feats, fleet.labels, fleet.keys, strict=True)]
    engine = RayEngine(work.artifacts, fleet.trainer.name, data, actors=2)
    try:
        remote = run_rounds(fleet, settings, engine=engine)
    finally:
        engine.close()
    local = run_rounds(load_fleet(work, 6, seed=0, backend="numpy"), settings)  # a fresh fleet: computed here
    assert [r.devices for r in remote.results] == [r.devices for r in local.results]
    assert remote.deployed == local.deployed and any(local.deployed)
    for a, b in zip(remote.versions, local.versions, strict=True):
        assert (a is None) == (b is None)
        for k in b or {}:
            np.testing.assert_array_equal(a[k], b[k])  # type: ignore[index]
    assert remote.final == local.final  # the personal and local-only heads came back from the actors too
