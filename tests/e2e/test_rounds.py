"""Federated rounds end to end: a hub process, 5 agent processes, real data, a real broker."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedge.protocol.messages import ModelHead, RoundResult, RoundStatus
from tests.e2e.fleet import FLEET, Fleet

pytestmark = pytest.mark.e2e


def _check_chain(fleet: Fleet, results: list[RoundResult], v0_accuracy: float) -> None:
    versions = []
    for res in results:
        assert res.status is RoundStatus.COMPLETED, res
        assert len(res.devices) >= len(fleet.devices), res
        assert sorted(res.devices) == fleet.devices
        assert res.n_samples == fleet.data.train_total
        # federated evaluation: validation-weighted scores of every head, over all five devices' held-out rows
        assert res.federated["val_n"] == sum(fleet.data.shard_sizes) - fleet.data.train_total
        for name in ("source", "global", "trained", "personal", "local_only"):
            assert 0 <= res.federated[f"val_acc_{name}"] <= 1
        assert res.model_version is not None and res.accuracy is not None
        versions.append(res.model_version)
    assert len(set(versions)) == len(versions), f"every round makes a new version: {versions}"
    with fleet.cond:
        head_versions = {h.version: h for h in fleet.seen.heads}
    for res in results:  # each new version was published on model/head, tagged with its round
        assert res.model_version in head_versions, (res.model_version, sorted(head_versions))
        assert head_versions[res.model_version].round == res.round
    late = fleet.retained(fleet.topics.model_head)
    assert isinstance(late, ModelHead)
    assert late.version == results[-1].model_version, "a late subscriber gets the newest head"
    assert results[-1].accuracy is not None
    assert results[-1].accuracy > v0_accuracy + 0.1, (
        f"federated accuracy {[r.accuracy for r in results]} does not beat the source head's {v0_accuracy:.3f}")


def test_three_chained_rounds_complete_and_accuracy_rises(fleet: Fleet, v0_accuracy: float) -> None:
    fleet.write_hub_toml(schedule={"chain_rounds": 3})
    fleet.start_hub()
    fleet.start_agents()
    fleet.start_round(b"{}")
    results = fleet.wait_results([1, 2, 3], timeout_s=120)
    _check_chain(fleet, results, v0_accuracy)
    assert fleet.hub.alive
    assert 4 not in fleet.seen.results, "chain_rounds = 3 stops after three rounds"


def test_three_rounds_over_the_embedded_broker(embedded_fleet: Fleet, v0_accuracy: float) -> None:
    fleet = embedded_fleet
    fleet.write_hub_toml(schedule={"chain_rounds": 3})
    fleet.start_hub()
    fleet.start_agents()
    fleet.start_round(b"{}")
    results = fleet.wait_results([1, 2, 3], timeout_s=120)
    _check_chain(fleet, results, v0_accuracy)


def _mosquitto_pub(fleet: Fleet, payload: str) -> None:
    host, port = fleet.broker_url.removeprefix("mqtt://").split(":")
    subprocess.run(["mosquitto_pub", "-h", host, "-p", port, "-q", "1", "-i", "e2e-pub",
                    "-t", fleet.topics.control_round_start, "-m", payload], check=True, timeout=10)


def test_rounds_started_by_a_raw_mqtt_publish(fleet: Fleet) -> None:
    fleet.write_hub_toml(rounds={"min_devices": 5, "local_epochs": 2})
    fleet.start_hub()
    fleet.start_agents()
    _mosquitto_pub(fleet, "{}")
    first = fleet.announce_of(1)
    assert (first.min_devices, first.local_epochs) == (5, 2), "hub.toml defaults"
    (r1,) = fleet.wait_results([1])
    assert r1.status is RoundStatus.COMPLETED and len(r1.devices) == 5

    _mosquitto_pub(fleet, json.dumps({"min_devices": 2, "local_epochs": 1}))
    second = fleet.announce_of(2)
    assert (second.min_devices, second.local_epochs) == (2, 1), "the JSON overrides reach the announce"
    (r2,) = fleet.wait_results([2])
    assert r2.status is RoundStatus.COMPLETED and len(r2.devices) >= 2
    assert r2.model_version != r1.model_version


def _round_start(fleet: Fleet, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", "round", "start", "--fleet", FLEET,
                           "--broker", fleet.broker_url, *args], capture_output=True, text=True, timeout=timeout_s)


def test_round_start_prints_the_round_id_and_waits_for_its_result(fleet: Fleet) -> None:
    fleet.write_hub_toml(devices=[*fleet.devices, "ghost-01"], rounds={"min_devices": 5, "deadline_s": 60.0})
    fleet.start_hub()
    fleet.start_agents(ready=True)
    done = _round_start(fleet, "--wait", "--json", "--deadline-s", "20")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["round"] == 1 and result["status"] == "completed" and len(result["devices"]) == 5
    assert result["model_version"] and result["accuracy"] is not None
    assert fleet.wait_results([1])[0].model_version == result["model_version"]

    # the ghost never answers: round 2 stays open, and a second request is refused with a reason
    started = _round_start(fleet, "--deadline-s", "8")
    assert started.returncode == 0 and started.stdout.strip() == "round 2 started (fleet 'e2e')"
    refused = _round_start(fleet, "--json")
    assert refused.returncode == 1
    assert json.loads(refused.stdout) == {"fleet": FLEET, "accepted": False, "round": None, "reason": "round_open",
                                          "detail": "round 2 is open"}
    # waiting on a round that fails (quorum 6 of 5 reachable devices) exits non-zero
    fleet.wait_results([2], timeout_s=60)
    failed = _round_start(fleet, "--wait", "--min-devices", "6", "--deadline-s", "3")
    assert failed.returncode == 1 and "round 3 failed_quorum" in failed.stdout, failed.stdout + failed.stderr


def test_round_start_without_a_hub_says_so(fleet: Fleet) -> None:
    out = _round_start(fleet, "--reply-timeout", "2", timeout_s=60)
    assert out.returncode == 2 and "no reply from the hub" in out.stderr and "Traceback" not in out.stderr
