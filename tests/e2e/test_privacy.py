"""Differential privacy end to end: a hub process and 5 agent processes on mosquitto, local DP, a hub budget
that refuses the third round, devices that decline by their own budget and floor, and what the broker carries."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest

from fedge.core.privacy import DpEvent, epsilon
from fedge.protocol.codec import decode
from fedge.protocol.messages import ModelUpdate, Presence, RoundStatus
from tests.e2e.fleet import Fleet

pytestmark = pytest.mark.e2e

Z, DELTA = 1.0, 1e-5


def test_local_dp_budgets_and_declines(fleet: Fleet) -> None:
    # local mode: no amplification, replacement adjacency (z/2)
    one, two, three = (epsilon([DpEvent(Z / 2)] * k, DELTA) for k in (1, 2, 3))
    fleet.write_hub_toml(
        rounds={"min_devices": 2, "deadline_s": 60.0},
        schedule={"chain_rounds": 3},
        privacy={"mode": "local", "noise_multiplier": Z, "clip": 1.0, "sample_rate": 1.0, "delta": DELTA,
                 "epsilon_budget": (two + three) / 2},
    )
    # device-00 can afford one round; device-01 wants more noise than the hub announces
    fleet.set_agent_config("device-00", privacy={"epsilon_budget": (one + two) / 2, "delta": DELTA,
                                                 "min_noise_multiplier": 0.5})
    fleet.set_agent_config("device-01", privacy={"epsilon_budget": 50.0, "min_noise_multiplier": 2.0})
    wire: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def record(topic: str, payload: bytes) -> None:
        with lock:
            wire.append((topic, payload))

    fleet.start_hub()
    spy = fleet.transport("spy")  # anyone on the broker
    spy.subscribe(fleet.topics.update_all, record)
    spy.subscribe(fleet.topics.presence_all, record)
    fleet.start_agents()
    fleet.start_round(b"{}")
    r1, r2, r3 = fleet.wait_results([1, 2, 3], timeout_s=180)

    assert r1.status is RoundStatus.COMPLETED and r2.status is RoundStatus.COMPLETED
    assert r1.seconds < 30, "a decline must not make the hub wait for the deadline"
    for r in (r1, r2):  # a DP round's published result names nobody and counts no samples
        assert r.devices == () and r.declined == () and r.n_samples == 0
    status = json.loads(fleet.hub_cli("hub", "status").stdout)  # the operator's view (the hub's store)
    rounds = {r["id"]: r for r in status["rounds"]}
    assert rounds[1]["declined"] == ["device-01"]
    assert sorted(rounds[1]["devices"]) == ["device-00", "device-02", "device-03", "device-04"]
    assert rounds[2]["declined"] == ["device-00", "device-01"]
    assert r1.epsilon == pytest.approx(one, rel=1e-6) and r2.epsilon == pytest.approx(two, rel=1e-6)
    assert r3.status is RoundStatus.REFUSED_BUDGET and r3.detail and "budget" in r3.detail
    announces = {a.round: a for a in fleet.seen.announces}
    assert announces[1].dp_mode == "local" and announces[1].dp_noise_multiplier == Z
    assert 3 not in announces, "a refused round is never announced"

    ledger = json.loads(fleet.hub_cli("hub", "privacy", "--json").stdout)
    assert [r["round"] for r in ledger["rounds"]] == [1, 2]
    assert ledger["epsilon_spent"] == pytest.approx(two, rel=1e-6) and ledger["refused"][0]["round"] == 3
    table = fleet.hub_cli("hub", "privacy")
    assert table.returncode == 0 and "refused" in table.stdout

    with lock:
        captured = list(wire)
    updates = [decode(p) for t, p in captured if "/update/" in t]
    assert len(updates) == 4 + 3
    dims = sum(int(np.prod(a.shape)) for a in updates[0].delta.values())
    for u in updates:  # nothing about a device's data in the clear: no sample count, no metrics, noised delta
        assert isinstance(u, ModelUpdate) and u.n_samples == 1 and u.metrics == {}
        norm = float(np.sqrt(sum(float(np.square(a.astype(np.float64)).sum()) for a in u.delta.values())))
        assert 0.9 * Z * math.sqrt(dims) < norm < 1.1 * Z * math.sqrt(dims) + 1.0, norm  # ~ zC*sqrt(d), C = 1
    presences = [decode(p) for t, p in captured if "/presence/" in t and p]
    private = [m for m in presences if isinstance(m, Presence) and m.device in ("device-00", "device-01")]
    assert private and all(m.n_samples is None for m in private)
