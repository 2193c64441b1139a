"""Devices and the hub come and go mid-round: late agents still count, a SIGKILLed hub resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedge.protocol.messages import RoundStatus
from tests.e2e.fleet import Fleet

pytestmark = pytest.mark.e2e


def test_an_agent_that_connects_after_the_announce_takes_part(fleet: Fleet) -> None:
    late = fleet.devices[-1]
    fleet.write_hub_toml(devices=fleet.devices, rounds={"deadline_s": 120.0})
    fleet.start_hub()
    fleet.start_agents([late], ready=True)  # known to the broker (persistent session) and the hub (presence)
    fleet.stop_agent(late)
    fleet.start_agents(fleet.devices[:-1])
    fleet.start_round()
    announce = fleet.announce_of(1)
    assert late in announce.selected
    fleet.wait_for(lambda s: len({a.device for a in s.acks}) == len(fleet.devices) - 1, 60,
                   "the four running agents' updates acked")
    assert 1 not in fleet.seen.results, "the round waits for the late device (deadline 120 s)"
    fleet.start_agents([late])
    (res,) = fleet.wait_results([1], timeout_s=60)
    assert res.status is RoundStatus.COMPLETED
    assert late in res.devices
    assert sorted(res.devices) == fleet.devices
    assert res.seconds < 100, "closed because everyone answered, not at the deadline"


def test_a_hub_killed_mid_round_resumes_and_counts_every_device_once(fleet: Fleet) -> None:
    first, rest = fleet.devices[:3], fleet.devices[3:]
    fleet.write_hub_toml(devices=fleet.devices, rounds={"deadline_s": 120.0, "min_devices": len(fleet.devices)})
    fleet.start_hub()
    fleet.start_agents(first)
    fleet.start_round()
    fleet.announce_of(1)
    fleet.wait_for(lambda s: len(s.acks) >= 1, 60, "a first update accepted")
    fleet.kill_hub()
    assert fleet.hub.popen is not None and fleet.hub.popen.returncode == -9
    with fleet.cond:
        acked_before = {a.device for a in fleet.seen.acks}
    fleet.start_agents(rest)  # they train and publish while the hub is down; the broker queues for the hub
    fleet.start_hub()
    (res,) = fleet.wait_results([1], timeout_s=90)
    assert res.status is RoundStatus.COMPLETED
    assert len(res.devices) == len(set(res.devices)), f"duplicates in {res.devices}"
    assert sorted(res.devices) == fleet.devices
    assert acked_before <= set(res.devices)
    assert res.n_samples == fleet.data.train_total, "every device's samples counted exactly once"
    assert res.seconds < 110, "closed because everyone answered, not at the deadline"
    rounds = [line for line in (fleet.state_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    assert len(rounds) == 1, rounds


def test_an_agent_stopped_right_after_it_comes_online_ends_offline(fleet: Fleet) -> None:
    """SIGTERM while the retained model is still arriving: the last retained presence must say offline."""
    dev = fleet.devices[0]
    fleet.write_hub_toml()
    fleet.start_hub()
    fleet.start_agents([dev])  # online, the retained model/full + model/head are on their way
    fleet.stop_agent(dev)  # waits (20 s) for the offline presence
    late = fleet.retained(fleet.topics.presence(dev))
    assert getattr(late, "online", None) is False, late


def test_a_device_with_a_bad_label_declines_and_the_round_closes_without_it(fleet: Fleet, tmp_path: Path) -> None:
    import numpy as np

    bad = tmp_path / "bad-label.npz"
    with np.load(fleet.data.shards[0]) as z:
        x, y = z["x"], z["y"].copy()
    y[3] = 99  # the model has 10 classes: passes the file checks, fails against the model
    np.savez(bad, x=x, y=y)
    fleet.set_agent_config("device-00", data=str(bad))
    fleet.write_hub_toml(devices=fleet.devices, rounds={"deadline_s": 90.0, "min_devices": 4})
    fleet.start_hub()
    fleet.start_agents(ready=True)
    fleet.start_round()
    (res,) = fleet.wait_results([1], timeout_s=60)
    assert res.status is RoundStatus.COMPLETED and res.declined == ("device-00",)
    assert sorted(res.devices) == fleet.devices[1:]
    assert res.seconds < 30, f"the hub waited {res.seconds:.1f} s: it must not wait for the deadline (90 s)"
    status = json.loads(fleet.hub_cli("hub", "status").stdout)
    assert status["declines"] == {"data_error": 1}
    assert "label 99" in (fleet.logs / "device-00.log").read_text()  # the details stay on the device
