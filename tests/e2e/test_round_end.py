"""Rounds that end when they should, with real processes on mosquitto (issue 12, items 1 and 8): selected agents
killed mid-round count as failed at their last will, an operator cancels a round that would wait for its deadline,
and ``fedge round start`` shows why a request over the hub's limits was refused."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from fedge.protocol.messages import RoundStatus
from tests.e2e.fleet import FLEET, ROOT, Fleet

pytestmark = pytest.mark.e2e

EPOCHS = 10**6  # hours of training: only a device's time limit ends it


def _cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", "round", *args, "--fleet", FLEET,
                           "--broker", fleet.broker_url], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_killed_agents_fail_the_round_at_their_will_and_a_cancel_ends_the_next(fleet: Fleet) -> None:
    fleet.devices = fleet.devices[:4]
    fast, slow = fleet.devices[:2], fleet.devices[2:]
    for dev in fast:
        fleet.set_agent_config(dev, max_epochs=EPOCHS, max_round_s=3.0)  # stop after 3 s, send what they have
    for dev in slow:
        fleet.set_agent_config(dev, max_epochs=EPOCHS, max_round_s=3000.0)
    fleet.write_hub_toml(devices=fleet.devices, rounds={"min_devices": 2, "deadline_s": 600.0},
                         limits={"max_local_epochs": EPOCHS})
    fleet.start_hub()
    fleet.start_agents(fleet.devices, ready=True)

    refused = _cli(fleet, "start", "--lr", "1e9")
    assert refused.returncode == 1, refused
    assert "over_limits" in refused.stdout and "limits.max_lr" in refused.stdout

    fleet.start_round(b'{"local_epochs": %d}' % EPOCHS)
    assert sorted(fleet.announce_of(1).selected) == fleet.devices
    fleet.wait_for(lambda s: {a.device for a in s.acks} >= set(fast), 120, "the fast agents' updates acked")
    assert 1 not in fleet.seen.results, "the slow agents are still training"
    for dev in slow:
        fleet.agents[dev].stop(signal.SIGKILL)  # their last wills say offline
    (res,) = fleet.wait_results([1], timeout_s=120)
    assert res.status is RoundStatus.COMPLETED and sorted(res.devices) == fast
    assert res.seconds < 300, f"the hub waited {res.seconds:.0f} s: the wills must close the round"

    fleet.start_round(b'{"local_epochs": 1}')  # the allow-listed slow devices are selected and awaited
    assert sorted(fleet.announce_of(2).selected) == fleet.devices
    fleet.wait_for(lambda s: {a.device for a in s.acks if a.round == 2} >= set(fast), 120, "round 2 updates")
    out = _cli(fleet, "cancel", "--reason", "the slow devices are gone", "--round", "2")
    assert out.returncode == 0, out
    assert "round 2 cancelled" in out.stdout
    (res2,) = fleet.wait_results([2], timeout_s=60)
    assert res2.status is RoundStatus.CANCELLED and res2.model_version is None
    assert "the slow devices are gone" in (res2.detail or "")
    again = _cli(fleet, "cancel")
    assert again.returncode == 1 and "no_open_round" in again.stdout
