"""A buffered asynchronous round on the wire (issue 22 item 3), with real processes on mosquitto: the hub makes a
version every buffer_k updates and re-announces the round on it; the agents train again on each newer version,
one update per device and model version."""

from __future__ import annotations

from collections import Counter

import pytest

from fedge.protocol.messages import RejectReason, RoundStatus
from tests.e2e.fleet import Fleet

pytestmark = pytest.mark.e2e


def test_a_buffered_round_makes_versions_and_agents_train_on_each(fleet: Fleet) -> None:
    fleet.devices = fleet.devices[:3]
    fleet.write_hub_toml(
        devices=fleet.devices,
        rounds={"mode": "buffered", "buffer_k": 2, "max_staleness": 2, "max_versions": 3, "min_devices": 1,
                "deadline_s": 240.0, "local_epochs": 1},
        # every version deploys (a held-back one would leave the devices on the version they already answered)
        aggregation={"deploy_tolerance": 1.0})
    fleet.start_hub()
    fleet.start_agents(fleet.devices, ready=True)
    fleet.start_round()
    first = fleet.announce_of(1)
    assert first.buffer_k == 2 and first.max_staleness == 2

    (res,) = fleet.wait_results([1], timeout_s=240)
    assert res.status is RoundStatus.COMPLETED, res.detail
    made = fleet.hub_sql("SELECT version, parent FROM versions WHERE round = 1 ORDER BY idx")
    assert len(made) == 3, made  # max_versions: the round closed once it made them
    assert res.model_version == made[-1][0]
    assert [p for _, p in made] == [first.model_version, made[0][0], made[1][0]]  # a chain, each deployed
    with fleet.cond:
        announced = [a.model_version for a in fleet.seen.announces if a.round == 1]
        heads = {h.version for h in fleet.seen.heads}
        dup = [r for _, r in fleet.seen.rejects if r.reason is RejectReason.DUPLICATE]
    # the round was re-announced on each new version before the last (then it closed) and each head published
    assert set(announced) >= {first.model_version, made[0][0], made[1][0]}
    assert {v for v, _ in made} <= heads
    rows = fleet.hub_sql("SELECT device, model_version FROM buffered_updates WHERE round = 1")
    per_device = Counter(d for d, _ in rows)
    assert len(rows) >= 6 and max(per_device.values()) >= 2, rows  # devices trained again on newer versions
    # never twice on one version; a device whose update (sent while the hub was a version further on than the one it
    # trained on) is in the buffer being filled may be refused another one in it: K distinct devices make a version
    assert all("buffer of the next version" in (r.detail or "") for r in dup), dup
