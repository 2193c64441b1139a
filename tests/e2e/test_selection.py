"""Source-model selection end to end: a hub process, 5 agent processes, a real mosquitto.

Two candidates are registered with ``fedge hub models add``: a backbone pre-trained on Fashion-MNIST (good) and a
deliberately poor one whose feature layer is all zeros (every image gets the same features, so no head can do
better than a class prior). ``fedge round select --wait`` runs the selection round; the hub must pick the good
one, deploy it as a new version over its backbone, and the next federated round must train from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedge.protocol.manifest import verify_artifacts
from fedge.protocol.messages import RoundStatus
from tests.e2e.fleet import FLEET, ROOT, Fleet

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def candidates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``good``: cnn28 trained one epoch on source images; ``poor``: cnn28 with a zeroed feature layer."""
    from fedge.export.exporter import export_model
    from fedge.export.testing import export_small
    from fedge.export.zoo import build_zoo_model, init_weights

    root = tmp_path_factory.mktemp("candidates")
    export_small(root / "good", "cnn28", seed=3, trained=True)
    poor = build_zoo_model("cnn28", 10)
    init_weights(poor, np.random.default_rng(5))
    layer = poor.get_layer("features")
    layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    export_model(poor, root / "poor", None, 32)
    return {"good": root / "good", "poor": root / "poor"}


def _cli(*args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_selection_picks_the_good_candidate_and_the_next_round_trains_on_it(
        fleet: Fleet, candidates: dict[str, Path]) -> None:
    fleet.write_hub_toml(rounds={"local_epochs": 2})
    fleet.start_hub()
    for name, folder in candidates.items():
        added = fleet.hub_cli("hub", "models", "add", name, str(folder))
        assert added.returncode == 0, added.stderr
    listed = fleet.hub_cli("hub", "models", "list", "--json")
    assert [c["name"] for c in json.loads(listed.stdout)["candidates"]] == ["good", "poor"]
    fleet.start_agents(ready=True)

    sel = _cli("round", "select", "--fleet", FLEET, "--broker", fleet.broker_url, "--candidates", "poor,good",
               "--local-epochs", "3", "--lr", "0.1", "--wait", "--json", "--timeout", "240")
    assert sel.returncode == 0, (sel.stdout, sel.stderr, fleet.logs_text())
    out = json.loads(sel.stdout)
    assert out["status"] == "completed", out
    assert out["ranking"] == ["good", "poor"], out
    scores = out["federated"]
    assert scores["val_acc_good"] > scores["val_acc_poor"] + 0.1, scores
    assert sorted(out["devices"]) == fleet.devices, "every device reported"
    new_version = out["model_version"]
    good_sha = verify_artifacts(candidates["good"]).backbone_sha256
    rid = out["round"]

    status = json.loads(fleet.hub_cli("hub", "status").stdout)
    assert status["current_version"] == new_version
    (recorded,) = status["selections"]
    assert recorded["winner"] == "good" and recorded["new_version"] == new_version
    assert [r["name"] for r in recorded["ranking"]] == ["good", "poor"]
    assert next(v for v in status["versions"] if v["version"] == new_version)["backbone_sha256"] == good_sha

    # every agent takes the new w0 (model/full of the new backbone, then model/head) ...
    fleet.wait_for(lambda s: all(s.models.get(d) == new_version for d in fleet.devices), 120,
                   f"every agent holding {new_version}")
    # ... and the following federated round trains from it
    fleet.start_round(b'{"local_epochs": 2, "lr": 0.1}')
    ann = fleet.announce_of(rid + 1)
    assert ann.model_version == new_version and ann.backbone_sha256 == good_sha and not ann.candidates
    (res,) = fleet.wait_results([rid + 1], timeout_s=180)
    assert res.status is RoundStatus.COMPLETED and sorted(res.devices) == fleet.devices, res
    after = json.loads(fleet.hub_cli("hub", "status").stdout)
    trained = next(v for v in after["versions"] if v["version"] == res.model_version)
    assert (trained["parent"], trained["backbone_sha256"]) == (new_version, good_sha)


def test_the_federated_gate_validates_each_new_version_on_the_devices(fleet: Fleet) -> None:
    """``[aggregation] federated_gate``: after round 1 the same devices score v1 on their validation data (an
    evaluation round, 2); v1 is deployed iff that score is within the tolerance of the deployed head's, and the chain
    goes on (round 3) from whatever is deployed."""
    tol = 0.05
    fleet.write_hub_toml(rounds={"local_epochs": 2}, schedule={"chain_rounds": 2},
                         aggregation={"federated_gate": True, "deploy_tolerance": tol})
    fleet.start_hub()
    fleet.start_agents(ready=True)
    fleet.start_round(b"{}")
    first, gate, third = fleet.wait_results([1, 2, 3], timeout_s=240)
    assert first.status is RoundStatus.COMPLETED and first.model_version == "v1"
    assert first.detail is not None and first.detail.startswith("v1 kept as a candidate until"), first.detail
    assert gate.status is RoundStatus.COMPLETED and sorted(gate.devices) == fleet.devices, gate
    validated, baseline = gate.federated["val_acc_v1"], first.federated["val_acc_global"]
    deployed = validated >= baseline - tol
    assert (gate.model_version == "v1") is deployed, (gate, baseline)
    assert fleet.announce_of(3).model_version == ("v1" if deployed else "v0")
    assert third.status is RoundStatus.COMPLETED
