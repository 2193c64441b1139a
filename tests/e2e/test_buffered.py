"""A buffered asynchronous round on the wire (issue 22 item 3), with real processes on mosquitto: the hub makes a
version every buffer_k updates and re-announces the round on it; the agents train again on each newer version,
one update per device and model version."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
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
        # every version deploys (a held-back one gives its devices another attempt on the same version instead:
        # the test below), so the round makes a chain of three
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


def v0_labelled_eval(fleet: Fleet) -> Path:
    """The hub's eval set relabelled with the source head's own predictions, on the rows where they are clear (a
    margin of 0.01 between the two top logits): v0 scores 1.0 on it, so with deploy_tolerance 0 the gate holds back
    any version that changes one of those predictions, which a round of training on the devices' shards does."""
    from fedge.datasets.partition import write_npz
    from fedge.protocol.manifest import load_head
    from fedge.runtime.data import load_local
    from fedge.runtime.trainers import open_trainer

    trainer = open_trainer(fleet.data.artifacts, backend="auto")
    trainer.set_head(load_head(fleet.data.artifacts))
    data = load_local(fleet.data.eval_file, (28, 28, 1))
    logits = trainer.logits(trainer.features(data.x))
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.01
    assert clear.sum() >= 100, clear.sum()
    return write_npz(fleet.root / "eval-v0.npz", np.asarray(data.x)[clear], np.argmax(logits, axis=1)[clear])


def test_a_held_back_version_gives_its_devices_another_turn_and_a_later_version_deploys(fleet: Fleet) -> None:
    """The gate holds back the round's first version (its devices had sent their one update on v0): the hub
    re-announces the round on v0 in its next buffer_attempt, the same devices train on v0 again, and once the hub
    restarts (SIGKILL) with a gate that lets versions through, on the same attempt, a later version from them
    deploys."""
    fleet.devices = fleet.devices[:2]
    fleet.data = replace(fleet.data, eval_file=v0_labelled_eval(fleet))
    rounds = {"mode": "buffered", "buffer_k": 2, "max_staleness": 2, "max_versions": 4, "min_devices": 1,
              "deadline_s": 240.0, "local_epochs": 1}
    fleet.write_hub_toml(devices=fleet.devices, rounds=rounds, aggregation={"deploy_tolerance": 0.0})
    fleet.start_hub()
    fleet.start_agents(fleet.devices, ready=True)
    fleet.start_round()
    first = fleet.announce_of(1)
    assert first.buffer_attempt == 0
    fleet.wait_for(lambda s: any(a.round == 1 and a.buffer_attempt >= 1 for a in s.announces), 120,
                   "the round re-announced on its version in a new attempt (its first version held back)")
    fleet.kill_hub()
    made = fleet.hub_sql("SELECT version, parent, accuracy FROM versions WHERE round = 1 ORDER BY idx")
    assert made and made[0][1] == first.model_version and made[0][2] < 1.0, made  # held back: below v0's 1.0
    with fleet.cond:
        attempt = max(a.buffer_attempt for a in fleet.seen.announces if a.round == 1)
        seen = len(fleet.seen.announces)
        assert all(a.model_version == first.model_version for a in fleet.seen.announces if a.round == 1)

    fleet.write_hub_toml(devices=fleet.devices, rounds=rounds, aggregation={"deploy_tolerance": 1.0})  # all deploy
    fleet.start_hub()
    (res,) = fleet.wait_results([1], timeout_s=240)
    assert res.status is RoundStatus.COMPLETED, res.detail
    assert fleet.hub_sql("SELECT value FROM meta WHERE key = 'current_version'") == [(res.model_version,)]
    versions = fleet.hub_sql("SELECT version, parent FROM versions WHERE round = 1 ORDER BY idx")
    assert len(versions) == 4 and res.model_version == versions[-1][0], versions
    deployed = [v for v, p in versions if v == res.model_version or any(p2 == v for _, p2 in versions)]
    assert versions[0][0] not in deployed and deployed, versions  # the held-back one is nobody's parent
    with fleet.cond:
        later = [a for a in fleet.seen.announces[seen:] if a.round == 1]
    assert later and all(a.buffer_attempt >= attempt for a in later), later  # the restart kept the count
    assert any(a.model_version != first.model_version for a in later)  # re-announced on a deployed version
    rows = fleet.hub_sql("SELECT device, model_version, attempt FROM buffered_updates WHERE round = 1")
    on_v0 = Counter(d for d, v, _ in rows if v == first.model_version)
    assert set(on_v0) == set(fleet.devices) and min(on_v0.values()) >= 2, rows  # each trained on v0 again
    assert len({(d, v, a) for d, v, a in rows}) == len(rows)  # one per device, version and attempt
