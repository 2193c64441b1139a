"""The simulator is the fleet: ``fedge simulate`` and a real in-process fleet (the hub daemon and agents, over the
in-memory transport) run the same round core, so with the same task, seed and settings every round registers the
same global head, bit for bit, and makes the same deploy decision.

The fleet's agents are configured as the simulator's virtual devices are: device ``i`` holds the shard file
``device-<i>.npz`` and has ``seed = device_seed(seed, i)``. Both sides use the same trainer back-end and the same
held-out evaluator. What differs is everything the round core leaves out: the wire (frames, signatures off, acks),
the files (heads, caches, outbox), threads and clocks.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.demo import DemoPaths
from fedge.edge_agent.agent import Agent
from fedge.edge_agent.config import config_from_mapping as agent_config
from fedge.hub.config import config_from_mapping as hub_config
from fedge.hub.daemon import HubDaemon
from fedge.protocol.codec import decode, encode_control
from fedge.protocol.messages import RoundOverrides, RoundResult
from fedge.protocol.topics import Topics
from fedge.protocol.transport import InMemoryBroker, InMemoryTransport
from fedge.runtime.evaluate import Evaluator
from fedge.simulate import SimSettings, device_seed, load_fleet, run_rounds

DEVICES, ROUNDS, SEED, FLEET = 4, 3, 5, "sim-vs-fleet"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    from fedge.export.testing import export_small

    paths = DemoPaths(tmp_path_factory.mktemp("matches"))
    export_small(paths.artifacts, trained=True)
    paths.source_model.write_bytes(b"")  # present: demo.prepare keeps these artifacts and writes shards + eval set
    return paths


def _run_fleet(work: DemoPaths, tmp: Path, settings: SimSettings, backend: str) -> tuple[HubDaemon, list[RoundResult]]:
    cfg = hub_config({
        "fleet": FLEET, "state_dir": str(tmp / "hub"), "artifacts": str(work.artifacts),
        "eval_data": str(work.data / "eval.npz"), "broker": {"url": "mqtt://127.0.0.1:1"},
        "rounds": {"min_devices": 1, "deadline_s": 120, "fraction": settings.fraction,
                   "local_epochs": settings.local_epochs, "lr": settings.lr, "seed": settings.seed,
                   "over_select": 0.0},  # the simulator waits for every selected device (no stragglers to drop)
        "aggregation": {"proximal_lambda": settings.proximal_lambda,
                        "deploy_tolerance": settings.deploy_tolerance},
        "schedule": {"chain_rounds": settings.rounds},
    }, tmp)
    broker = InMemoryBroker()
    hub = HubDaemon(cfg, InMemoryTransport(broker), evaluator=Evaluator(cfg.eval_data, backend))
    results: dict[int, RoundResult] = {}
    done = threading.Condition()

    def on_result(_topic: str, payload: bytes) -> None:
        msg = decode(payload) if payload else None
        if isinstance(msg, RoundResult):
            with done:
                results[msg.round] = msg
                done.notify_all()

    InMemoryTransport(broker).subscribe(Topics(FLEET).control_round_result, on_result)  # the full result
    hub.start()
    agents = []
    for i in range(DEVICES):
        table: dict[str, Any] = {
            "device_id": f"device-{i:02d}", "fleet": FLEET, "data": str(work.data / f"device-{i:02d}.npz"),
            "state_dir": str(tmp / f"agent-{i}"), "backend": backend, "seed": device_seed(settings.seed, i),
            "validation_fraction": settings.validation_fraction, "local_only_epochs": settings.local_only_epochs,
            "personalization": settings.personalization, "broker": {"url": "mqtt://127.0.0.1:1"},
        }
        agent = Agent(agent_config(table, tmp), InMemoryTransport(broker))
        agent.start()
        agents.append(agent)
    try:
        InMemoryTransport(broker).publish(Topics(FLEET).control_round_start, encode_control(RoundOverrides()))
        with done:
            assert done.wait_for(lambda: len(results) >= settings.rounds, timeout=240), results
    finally:
        for agent in agents:
            agent.stop()
    return hub, [results[r] for r in sorted(results)]


@pytest.mark.parametrize("fraction", [1.0, 0.75])
def test_simulate_matches_fleet(work: DemoPaths, tmp_path: Path, fraction: float) -> None:
    settings = SimSettings(devices=DEVICES, rounds=ROUNDS, seed=SEED, local_epochs=2, lr=0.05, proximal_lambda=0.01,
                           fraction=fraction, validation_fraction=0.2, local_only_epochs=3, deploy_tolerance=0.0)
    fleet = load_fleet(work, DEVICES, seed=0, backend="numpy")
    sim = run_rounds(fleet, settings)
    hub, results = _run_fleet(work, tmp_path, settings, "numpy")
    try:
        # not vacuous: every round registers a version, at least one deploys, and the model moved from w0
        assert all(v is not None for v in sim.versions) and any(sim.deployed)
        assert any(not np.array_equal(sim.head[k], fleet.w0[k]) for k in fleet.w0)
        assert [r.round for r in results] == list(range(1, ROUNDS + 1))
        for res, version, made, sim_res in zip(results, sim.versions, sim.deployed, sim.results, strict=True):
            assert res.devices == sim_res.devices, res.round  # the same cohort (the hub's seeded selection)
            assert res.n_samples == sim_res.n_samples
            assert (res.model_version is None) == (version is None), res.round
            if version is None:
                continue
            head = hub.registry.load_head(res.model_version)
            for k in version:  # bit for bit: the same core, trainer, data, seeds and arithmetic
                np.testing.assert_array_equal(head[k], version[k], err_msg=f"round {res.round}: {k}")
            assert res.accuracy == pytest.approx(sim_res.accuracy, abs=1e-12)
            assert ("kept as a candidate" in (res.detail or "")) == (not made), res.detail  # the same deploy gate
            for key in ("val_acc_global", "val_acc_trained", "val_acc_local_only"):  # federated evaluation too
                assert res.federated[key] == pytest.approx(sim_res.federated[key], abs=1e-9), key
        final = hub.registry.load_head(hub.registry.current().version)
        for k, v in sim.head.items():
            np.testing.assert_array_equal(final[k], v)
    finally:
        hub.stop()
