"""A broker restarted WITHOUT persistence mid-round (issue 12, item 7): it forgets every session, queued message
and retained message. Agents publish their unacknowledged updates again, the hub publishes its retained state
again, so no update is lost or counted twice, and a device that joins afterwards gets the model and takes part."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fedge.protocol.messages import RoundStatus
from tests.e2e.fleet import Fleet
from tests.helpers import Mosquitto, wait_until

pytestmark = pytest.mark.e2e


def _completed(fleet: Fleet, dev: str) -> int:
    path = fleet.root / "agents" / dev / "state.json"
    try:
        return int(json.loads(path.read_text()).get("last_completed_round", 0))
    except (OSError, ValueError):
        return 0


def test_a_broker_restart_without_persistence_loses_no_update_and_no_retained_state(
    make_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    broker = Mosquitto(tmp_path / "mosquitto", persistence=False).start()
    try:
        fleet = make_fleet(broker.url, n_agents=4)
        first, late = fleet.devices[:3], fleet.devices[3]
        fleet.write_hub_toml(rounds={"min_devices": 3, "deadline_s": 600.0})
        fleet.start_hub()
        fleet.start_agents(first, ready=True)
        fleet.start_round()
        fleet.announce_of(1)
        broker.stop()  # mid-round: the agents train and publish while the broker is down
        assert wait_until(lambda: all(_completed(fleet, d) >= 1 for d in first), 120, 0.1), \
            "the agents did not finish round 1 while the broker was down"
        broker.start()  # same port, empty: no sessions, no queued messages, no retained messages
        (res,) = fleet.wait_results([1], timeout_s=120)
        assert res.status is RoundStatus.COMPLETED, res
        assert sorted(res.devices) == first and len(res.devices) == len(set(res.devices))
        train = [n - round(0.2 * n) for n in fleet.data.shard_sizes[:3]]
        assert res.n_samples == sum(train), "every update counted exactly once"
        assert res.seconds < 500, "closed because everyone answered, not at the deadline"
        # a device that joins after the restart gets model/full and model/head (republished by the hub) ...
        fleet.start_agents([late], ready=True, timeout_s=120)
        fleet.start_round(json.dumps({"min_devices": 4, "deadline_s": 600.0}).encode())
        (res2,) = fleet.wait_results([2], timeout_s=180)
        # ... and takes part in the next round
        assert res2.status is RoundStatus.COMPLETED and sorted(res2.devices) == fleet.devices, res2
        status = json.loads(fleet.hub_cli("hub", "status").stdout)
        assert [r["status"] for r in status["rounds"]] == ["completed", "completed"]
    finally:
        broker.stop()
