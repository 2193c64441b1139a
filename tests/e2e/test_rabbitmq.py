"""The same rounds on RabbitMQ's MQTT plugin (Debian's rabbitmq-server 3.10: MQTT 3.1.1 only, retained messages only
through exact-topic subscriptions): a hub process and agent processes as on mosquitto, plain, local-DP and SecAgg
rounds, a broker restart mid-round and a device that is killed and comes back, and a round across a two-node
RabbitMQ cluster. One RabbitMQ node serves the session; each test has a virtual host of its own (tests/conftest.py,
``rabbitmq``); the cluster test starts its own two nodes."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedge.core.privacy import DpEvent, epsilon
from fedge.hub.rabbitmq import cluster as rabbitmq_cluster
from fedge.protocol.codec import decode
from fedge.protocol.messages import ModelHead, ModelUpdate, RoundStatus
from tests.conftest import RabbitVhost
from tests.e2e.fleet import Fleet
from tests.e2e.test_rounds import _check_chain
from tests.e2e.test_secagg import _assert_exact_sum, _secagg_hub
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e

N = 5


def _fleet(make_fleet: Callable[..., Fleet], rabbitmq: RabbitVhost, n_agents: int = N) -> Fleet:
    """A Fleet whose hub, agents and watcher log in on the test's virtual host (RabbitMQ authenticates every user
    name it is given: fedge's transport would otherwise present its client id)."""
    account = rabbitmq.account()
    names = ["hub", "watcher", *(f"device-{i:02d}" for i in range(n_agents))]
    return make_fleet(rabbitmq.url, n_agents=n_agents, accounts=dict.fromkeys(names, account))


def _completed(fleet: Fleet, dev: str) -> int:
    try:
        return int(json.loads((fleet.root / "agents" / dev / "state.json").read_text()).get("last_completed_round", 0))
    except (OSError, ValueError):
        return 0


def test_chained_rounds_on_rabbitmq(make_fleet: Callable[..., Fleet], rabbitmq: RabbitVhost,
                                    v0_accuracy: float) -> None:
    fleet = _fleet(make_fleet, rabbitmq)
    fleet.write_hub_toml(schedule={"chain_rounds": 3})
    t0 = time.monotonic()
    fleet.start_hub()
    assert time.monotonic() - t0 < 45, "the hub falls back from MQTT 5 at once (RabbitMQ closes, no CONNACK)"
    fleet.start_agents()
    fleet.start_round(b"{}")
    results = fleet.wait_results([1, 2, 3], timeout_s=180)
    _check_chain(fleet, results, v0_accuracy)  # incl. the newest head retained for a late (exact) subscriber
    hub_log = (fleet.logs / "hub.log").read_text()
    assert "trying MQTT 3.1.1" in hub_log, "the hub tried MQTT 5 first (protocol auto) and fell back"


def test_a_hub_started_after_its_devices_learns_them_on_rabbitmq(make_fleet: Callable[..., Fleet],
                                                                 rabbitmq: RabbitVhost) -> None:
    """RabbitMQ keeps the devices' retained presences from the hub's presence/+ subscription: the devices say they
    are online again when the hub's status comes up, so a hub started (or restarted) after them selects them."""
    fleet = _fleet(make_fleet, rabbitmq, n_agents=3)
    fleet.write_hub_toml()
    fleet.connect_watcher()
    fleet.start_agents()  # no hub yet
    time.sleep(1.0)
    fleet.start_hub()

    def known_online() -> set[str]:
        return {str(d) for (d,) in fleet.hub_sql("SELECT device FROM devices WHERE online = 1")}

    assert wait_until(lambda: known_online() == set(fleet.devices), 60, 0.2), known_online()
    fleet.start_round()
    (res,) = fleet.wait_results([1], timeout_s=120)
    assert res.status is RoundStatus.COMPLETED and sorted(res.devices) == fleet.devices, res


def test_local_dp_round_on_rabbitmq(make_fleet: Callable[..., Fleet], rabbitmq: RabbitVhost) -> None:
    z, delta = 1.0, 1e-5
    fleet = _fleet(make_fleet, rabbitmq)
    fleet.write_hub_toml(rounds={"min_devices": N, "deadline_s": 90.0},
                         privacy={"mode": "local", "noise_multiplier": z, "clip": 1.0, "sample_rate": 1.0,
                                  "delta": delta, "epsilon_budget": 100.0})
    wire: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def record(topic: str, payload: bytes) -> None:
        with lock:
            wire.append((topic, payload))

    fleet.start_hub()
    spy = fleet.transport("spy")  # anyone on the broker (live messages do pass through wildcards)
    spy.subscribe(fleet.topics.update_all, record)
    fleet.start_agents()
    fleet.start_round(b"{}")
    (r1,) = fleet.wait_results([1], timeout_s=150)
    assert r1.status is RoundStatus.COMPLETED, r1
    assert r1.devices == () and r1.n_samples == 0, "a DP round's result names nobody"
    assert r1.epsilon == pytest.approx(epsilon([DpEvent(z / 2)], delta), rel=1e-6)
    status = json.loads(fleet.hub_cli("hub", "status").stdout)
    assert sorted(status["rounds"][0]["devices"]) == fleet.devices
    with lock:
        updates = [decode(p) for t, p in wire if "/update/" in t]
    assert len(updates) == N
    dims = sum(int(np.prod(a.shape)) for a in updates[0].delta.values())
    for u in updates:  # noised, no sample count, no metrics
        assert isinstance(u, ModelUpdate) and u.n_samples == 1 and u.metrics == {}
        norm = float(np.sqrt(sum(float(np.square(a.astype(np.float64)).sum()) for a in u.delta.values())))
        assert 0.9 * z * math.sqrt(dims) < norm < 1.1 * z * math.sqrt(dims) + 1.0, norm


def test_secagg_round_on_rabbitmq_sums_exactly(make_fleet: Callable[..., Fleet], rabbitmq: RabbitVhost) -> None:
    fleet = _fleet(make_fleet, rabbitmq)
    _secagg_hub(fleet, min_devices=4)
    fleet.start_hub()
    fleet.start_agents(ready=True)
    fleet.start_round()
    (r1,) = fleet.wait_results([1], timeout_s=150)
    assert r1.status is RoundStatus.COMPLETED, r1.detail
    assert sorted(r1.devices) == fleet.devices
    _assert_exact_sum(fleet, 1, fleet.devices)


def test_a_rabbitmq_restart_mid_round_loses_no_update(make_fleet: Callable[..., Fleet],
                                                      rabbitmq: RabbitVhost) -> None:
    """The node stops mid-round and comes back with its state (durable sessions, the retained-message store): the
    agents publish their updates again, the hub counts each once, and a device that joins afterwards gets the model
    from the retained messages and takes part."""
    fleet = _fleet(make_fleet, rabbitmq, n_agents=4)
    first, late = fleet.devices[:3], fleet.devices[3]
    fleet.write_hub_toml(rounds={"min_devices": 3, "deadline_s": 600.0})
    fleet.start_hub()
    fleet.start_agents(first, ready=True)
    fleet.start_round()
    fleet.announce_of(1)

    def received(dev: str) -> bool:  # each agent holds the announce before the broker goes (a loaded CI machine)
        log = fleet.logs / f"{dev}.log"
        return log.is_file() and "round 1 announced" in log.read_text(errors="replace")

    assert wait_until(lambda: all(received(d) for d in first), 60, 0.1), "the agents did not get round 1's announce"
    rabbitmq.stop()  # mid-round: the agents train and publish while the broker is down
    try:
        assert wait_until(lambda: all(_completed(fleet, d) >= 1 for d in first), 180, 0.2), \
            "the agents did not finish round 1 while the broker was down"
    finally:
        rabbitmq.start()
    (res,) = fleet.wait_results([1], timeout_s=180)
    assert res.status is RoundStatus.COMPLETED, res
    assert sorted(res.devices) == first and len(res.devices) == len(set(res.devices))
    assert res.n_samples == sum(n - round(0.2 * n) for n in fleet.data.shard_sizes[:3]), "each update once"
    assert res.seconds < 500, "closed because everyone answered, not at the deadline"
    fleet.start_agents([late], ready=True, timeout_s=180)  # model/full and model/head by exact topics
    fleet.start_round(json.dumps({"min_devices": 4, "deadline_s": 600.0}).encode())
    (res2,) = fleet.wait_results([2], timeout_s=240)
    assert res2.status is RoundStatus.COMPLETED and sorted(res2.devices) == fleet.devices, res2
    head = fleet.retained(fleet.topics.model_head)
    assert isinstance(head, ModelHead) and head.version == res2.model_version


def test_a_device_killed_and_back_takes_part_on_rabbitmq(make_fleet: Callable[..., Fleet],
                                                         rabbitmq: RabbitVhost) -> None:
    """SIGKILL: the broker publishes the device's will (offline, retained); the next round selects it anyway (an
    allow-list); it comes back on its persistent session, gets the round's announce and answers."""
    fleet = _fleet(make_fleet, rabbitmq)
    victim = fleet.devices[-1]
    fleet.write_hub_toml(devices=fleet.devices, rounds={"deadline_s": 180.0})
    fleet.start_hub()
    fleet.start_agents(ready=True)
    fleet.start_round()
    (r1,) = fleet.wait_results([1], timeout_s=120)
    assert r1.status is RoundStatus.COMPLETED and sorted(r1.devices) == fleet.devices
    fleet.agents[victim].stop(signal.SIGKILL)
    fleet.wait_for(lambda s: victim not in s.online, 90, f"{victim}'s will (offline)")
    fleet.start_round()
    assert victim in fleet.announce_of(2).selected
    fleet.wait_for(lambda s: len({a.device for a in s.acks if a.round == 2}) == N - 1, 120,
                   "the other devices' updates acked")
    assert 2 not in fleet.seen.results, "the round waits for the killed device"
    fleet.start_agents([victim])
    (r2,) = fleet.wait_results([2], timeout_s=150)
    assert r2.status is RoundStatus.COMPLETED and sorted(r2.devices) == fleet.devices, r2
    assert r2.n_samples == fleet.data.train_total, "every device's samples counted once"


def test_a_round_across_a_rabbitmq_cluster(make_fleet: Callable[..., Fleet], tmp_path: Path) -> None:
    """Two clustered RabbitMQ nodes: the hub on one, devices on both. Live messages cross the cluster; retained
    ones do not (RabbitMQ keeps them per node), so the hub also publishes its retained messages on the other node
    (``[broker] retain_on``): a device that joins on that node gets the model and takes part."""
    a, b = rabbitmq_cluster(tmp_path / "rabbit", 2)
    a.start()
    fleet: Fleet | None = None
    try:
        b.start()
        on_a, on_b = a.account(), b.account()
        devices = [f"device-{i:02d}" for i in range(N)]
        accounts = {"hub": {**on_a, "retain_on": [b.url]}, "watcher": on_b,
                    **{d: (on_a if i < 2 else on_b) for i, d in enumerate(devices)}}
        fleet = make_fleet(a.url, n_agents=N, accounts=accounts)
        first, late = fleet.devices[:-1], fleet.devices[-1]  # the late one connects to node b
        fleet.write_hub_toml(rounds={"min_devices": len(first), "deadline_s": 120.0})
        fleet.start_hub()
        fleet.start_agents(first, ready=True)  # the ones on b get model/full and model/head retained on b
        fleet.start_round()
        (r1,) = fleet.wait_results([1], timeout_s=150)
        assert r1.status is RoundStatus.COMPLETED and sorted(r1.devices) == first, r1
        fleet.start_agents([late], ready=True, timeout_s=120)
        fleet.start_round(json.dumps({"min_devices": N}).encode())
        (r2,) = fleet.wait_results([2], timeout_s=150)
        assert r2.status is RoundStatus.COMPLETED and sorted(r2.devices) == fleet.devices, r2
        head = fleet.retained(fleet.topics.model_head)  # a late subscriber on node b: the newest head
        assert isinstance(head, ModelHead) and head.version == r2.model_version
    finally:
        if fleet is not None:
            fleet.close()
        b.stop()
        a.stop()
