"""Eligibility end to end (issue 11, items 5 and 7): an agent process whose sysfs shows a battery at 10%,
discharging, declines the round with ``not_eligible``; the hub records the decline and the round completes with
the other devices, over a real mosquitto."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedge.edge_agent.eligibility import SYSFS_ENV
from fedge.protocol.messages import RoundStatus
from tests.e2e.fleet import Fleet

pytestmark = pytest.mark.e2e


def test_a_device_on_a_low_battery_declines_and_the_round_goes_on(fleet: Fleet, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sysfs = tmp_path / "sys"  # what /sys shows on a laptop off its charger
    for name, files in {"AC": {"type": "Mains", "online": "0"},
                        "BAT0": {"type": "Battery", "capacity": "10", "status": "Discharging"}}.items():
        folder = sysfs / "class" / "power_supply" / name
        folder.mkdir(parents=True)
        for key, value in files.items():
            (folder / key).write_text(value + "\n")
    low, others = fleet.devices[0], fleet.devices[1:]
    fleet.set_agent_config(low, eligibility={"min_battery_pct": 50})
    fleet.set_agent_config(others[0], eligibility={"min_battery_pct": 50})  # reads the real /sys: no battery here
    fleet.write_hub_toml(rounds={"min_devices": 2})
    fleet.start_hub()
    monkeypatch.setenv(SYSFS_ENV, str(sysfs))  # inherited by the one agent process started now
    fleet.start_agents([low])
    monkeypatch.delenv(SYSFS_ENV)
    fleet.start_agents(others, ready=True)
    fleet.wait_for(lambda s: bool(s.models.get(low)), 60, f"{low} holding a model")
    fleet.start_round(b"{}")
    (result,) = fleet.wait_results([1], timeout_s=120)

    assert result.status is RoundStatus.COMPLETED
    assert result.declined == (low,) and sorted(result.devices) == sorted(others)
    assert result.seconds < 45, "a decline must not make the hub wait for the deadline"
    status = json.loads(fleet.hub_cli("hub", "status").stdout)
    assert status["declines"] == {"not_eligible": 1}
    assert {r["id"]: r["declined"] for r in status["rounds"]}[1] == [low]
    log = (fleet.logs / f"{low}.log").read_text()
    assert "declining round 1: not_eligible (battery 10% < 50%)" in log
