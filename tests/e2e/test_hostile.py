"""Hostile updates published by the test into a round of real agents: each is rejected with its reason."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from fedge.protocol.codec import encode
from fedge.protocol.manifest import load_manifest
from fedge.protocol.messages import Arrays, ModelUpdate, RejectReason, RoundStatus
from tests.e2e.fleet import FLEET, Fleet

pytestmark = pytest.mark.e2e

GHOST = "ghost-01"  # on the allow-list, no agent: the test speaks for it
INTRUDER = "intruder-07"  # never seen by the hub


def test_hostile_updates_are_rejected_and_the_round_completes(fleet: Fleet) -> None:
    manifest = load_manifest(fleet.data.artifacts)
    zeros: Arrays = {p.name: np.zeros(p.shape, np.float32) for p in manifest.head}
    real_size = len(encode(ModelUpdate(FLEET, 1, GHOST, "v0000", 300, zeros, {"loss": 1.0, "train_seconds": 0.1})))
    limit = 2 * real_size + 4096  # well above a real update (agents' metrics are a few more bytes)
    fleet.write_hub_toml(devices=[*fleet.devices, GHOST],
                         rounds={"max_update_bytes": limit, "deadline_s": 120.0, "min_devices": len(fleet.devices)})
    fleet.start_hub()
    fleet.start_agents()
    fleet.start_round()
    ann = fleet.announce_of(1)
    assert GHOST in ann.selected

    def update(**over: Any) -> bytes:
        kw: dict[str, Any] = {"fleet": FLEET, "round": ann.round, "device": GHOST, "model_version": ann.model_version,
                              "n_samples": 50, "delta": zeros, "metrics": {"loss": 1.0}}
        kw.update(over)
        return encode(ModelUpdate(**kw))

    nan = {k: v.copy() for k, v in zeros.items()}
    first = next(iter(nan))
    nan[first].flat[0] = np.nan
    wrong = {**zeros, first: np.zeros((3, 3), np.float32)}
    big = {**zeros, "h9_padding": np.zeros(limit // 4 + 16, np.float32)}
    hostile = [
        (GHOST, b"\x00this is not a fedge frame" * 4, RejectReason.MALFORMED),
        (GHOST, update(delta=big), RejectReason.TOO_LARGE),
        (GHOST, update(delta=nan), RejectReason.NOT_FINITE),
        (GHOST, update(delta=wrong), RejectReason.WRONG_SHAPE),
        (GHOST, update(round=ann.round + 41), RejectReason.STALE_ROUND),
        (INTRUDER, update(device=INTRUDER), RejectReason.UNKNOWN_DEVICE),
    ]
    assert len(hostile[1][1]) > limit
    attacker = fleet.transport("attacker")
    for device, payload, _ in hostile:
        attacker.publish(fleet.topics.update(device), payload, qos=1)

    expected = {(f"{fleet.topics.base}/device/{d}/reject", str(reason)) for d, _, reason in hostile}
    fleet.wait_for(lambda s: expected <= {(t, str(r.reason)) for t, r in s.rejects}, 30,
                   f"rejects {sorted(expected)}")
    fleet.wait_for(lambda s: {a.device for a in s.acks} >= set(fleet.devices), 60, "the five agents acked")
    assert 1 not in fleet.seen.results, "the ghost is still awaited"

    good = update(delta={k: np.full(v.shape, 1e-3, np.float32) for k, v in zeros.items()})
    attacker.publish(fleet.topics.update(GHOST), good, qos=1)
    (res,) = fleet.wait_results([1], timeout_s=30)
    assert res.status is RoundStatus.COMPLETED
    assert sorted(res.devices) == sorted([*fleet.devices, GHOST]), "the good agents (and the ghost's valid update)"
    assert res.n_samples == fleet.data.train_total + 50
    assert res.rejected >= len(hostile)
    with fleet.cond:
        real_rejects = [r for t, r in fleet.seen.rejects if r.device in fleet.devices]
    assert real_rejects == [], f"no real agent was rejected: {real_rejects}"
    assert fleet.hub.alive, "the hub survived"

    status = fleet.hub_cli("hub", "status")
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)["rejects"]
    for _, _, reason in hostile:
        assert counts.get(str(reason), 0) >= 1, (reason, counts)
