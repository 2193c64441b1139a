"""A whole round over TLS with the files of ``fedge fleet init`` (issue 11, items 1 and 4): mosquitto started from
the generated config (TLS only, no anonymous access, ACLs), the hub process on its generated account, two agent
processes with provisioned credentials, and the round started by ``fedge round start --broker-config`` with the
generated operator login."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedge.devices.profiles import get_profile
from fedge.devices.provision import Provisioning, provision
from fedge.protocol.tomlfile import read_toml
from tests.devices.secure_broker import SecureBroker
from tests.e2e.fleet import FLEET, ROOT, Fleet, FleetData

DEVICES = ["device-00", "device-01"]


def test_a_round_runs_over_tls_with_the_generated_files(request: pytest.FixtureRequest, tmp_path: Path,
                                                         fleet_data: FleetData) -> None:
    broker = SecureBroker(tmp_path / "broker", FLEET, [])
    accounts: dict[str, dict[str, Any]] = {"hub": broker.table("hub"), "watcher": broker.add_watcher()}
    for dev in DEVICES:  # what `fedge devices provision --fleet-dir` gives each device
        p = Provisioning(dev, FLEET, broker.dir.read()["broker_url"], "/unused.npz")
        bundle = provision(p, get_profile("x86-dev"), tmp_path / "bundles", fleet_dir=broker.dir.root)
        accounts[dev] = read_toml(bundle / "agent.toml")["broker"]
        accounts[dev]["ca_file"] = str(bundle / accounts[dev]["ca_file"])
    broker.start()
    fleet = Fleet(tmp_path / "fleet", fleet_data, broker.url, n_agents=len(DEVICES), accounts=accounts)
    request.node._e2e_fleets = [fleet]  # logs on failure (tests/e2e/conftest.py)
    try:
        fleet.write_hub_toml()
        fleet.start_hub()
        fleet.start_agents(ready=True)
        cmd = [sys.executable, "-m", "fedge.cli", "round", "start", "--fleet", FLEET,
               "--broker-config", str(broker.dir.operator_toml), "--wait", "--json", "--timeout", "120"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = json.loads(proc.stdout.splitlines()[-1])
        assert out["status"] == "completed" and sorted(out["devices"]) == DEVICES and out["rejected"] == 0, out
        assert out["model_version"] == "v1"
        (result,) = fleet.wait_results([out["round"]])
        assert result.model_version == "v1" and sorted(result.devices) == DEVICES
        assert {a.device for a in fleet.seen.acks} == set(DEVICES)
    finally:
        fleet.close()
        broker.stop()
