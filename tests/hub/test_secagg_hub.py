"""SecAgg rounds in the hub daemon (in-memory broker; devices are the real `DeviceSession`s on scripted
transports): the sum is aggregated into the next head, plain updates and stray frames are refused and counted,
devices that cannot do SecAgg are not selected, stages time out below the threshold, an impossible ring is
refused before anything is announced, and a hub restart fails the open SecAgg round cleanly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.core.secagg_session import DeviceSession, private_input, stage_frame
from fedge.protocol.codec import decode, encode
from fedge.protocol.manifest import load_head
from fedge.protocol.messages import Presence, Reject, RejectReason, RoundAnnounce, RoundStatus, SecAggStage
from fedge.protocol.secagg_wire import AdvertiseKeys
from fedge.protocol.transport import InMemoryTransport
from tests.hub.fleet import FLEET, SHAPES, TOPICS, Fleet, hub_config, iter_hub, zero_delta

DEVICES = ("d0", "d1", "d2", "d3")


class SaDevice:
    """A device that speaks SecAgg with the agent's own session code."""

    def __init__(self, fleet: Fleet, name: str) -> None:
        self.name = name
        self.t = InMemoryTransport(fleet.broker)
        self.session: DeviceSession | None = None
        self.mute = False  # ignores the hub's frames (a device that went quiet)
        self.t.subscribe(TOPICS.secagg_inbox(name), self._on)

    def hello(self, secagg: bool = True) -> None:
        msg = Presence(FLEET, self.name, True, n_samples=10, backends=("numpy",), dp=True, secagg=secagg)
        self.t.publish(TOPICS.presence(self.name), encode(msg), retain=True)

    def join(self, ann: RoundAnnounce) -> None:
        self.session = DeviceSession(ann, self.name)
        self.send(self.session.start())

    def _on(self, _topic: str, payload: bytes) -> None:
        msg = decode(payload)
        assert isinstance(msg, SecAggStage) and self.session is not None
        if self.mute:
            return
        self.send(self.session.on_frame(msg))

    def input(self, delta: dict[str, np.ndarray]) -> np.ndarray:
        assert self.session is not None
        q = private_input(delta, sorted(delta), self.session.setup, None, np.random.default_rng(0))
        self.send(self.session.set_input(q))
        return q

    def send(self, frames: list[bytes]) -> None:
        for f in frames:
            self.t.publish(TOPICS.secagg(self.name), f)


def settle(fleet: Fleet) -> None:
    for _ in range(30):  # frames answered on the hub's worker are queued behind the call that caused them
        fleet.hub.tick()


@pytest.fixture
def make(tmp_path: Path, artifacts: Path) -> Iterator[Any]:
    hubs: list[Any] = []

    def start(**sections: Any) -> Fleet:
        sections.setdefault("secagg", {"enabled": True, "stage_timeout_s": 5.0})
        sections.setdefault("aggregation", {"proximal_lambda": 0.0})
        gen = iter_hub(hub_config(tmp_path / "state", artifacts, **sections))
        hubs.append(gen)
        return next(gen)

    yield start
    for gen in hubs:
        gen.close()


def _devices(fleet: Fleet, names: tuple[str, ...] = DEVICES) -> dict[str, SaDevice]:
    devs = {d: SaDevice(fleet, d) for d in names}
    for d in devs.values():
        d.hello()
    return devs


def _delta(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in SHAPES.items()}


def test_secure_sum_becomes_the_next_head(make: Any, artifacts: Path) -> None:
    fleet = make()
    devs = _devices(fleet)
    ann = fleet.start_round()
    assert ann.secagg_seed is not None and ann.selected == DEVICES and ann.secagg_threshold is not None
    for d in devs.values():
        d.join(ann)
    settle(fleet)
    qs = [devs[d].input(_delta(i)) for i, d in enumerate(DEVICES)]
    settle(fleet)
    assert fleet.results and fleet.results[-1].status is RoundStatus.COMPLETED, fleet.results
    included, dropped, bits, scale, raw = fleet.hub.store.secagg_sum(1)  # type: ignore[misc]
    assert included == list(DEVICES) and dropped == [] and bits == 32
    total = np.frombuffer(raw, dtype="<u8")
    assert np.array_equal(total, sum(q for q in qs) & np.uint64(2**32 - 1))  # type: ignore[operator]
    # the new head is v0 + the mean of the deltas (quantised: within 1/scale), array names matched
    v0 = load_head(artifacts / "head.npz")
    new = fleet.heads[-1]
    for k in SHAPES:
        mean = np.mean([_delta(i)[k] for i in range(len(DEVICES))], axis=0)
        np.testing.assert_allclose(new.head[k], v0[k] + mean, atol=2.0 / scale)


def test_plain_updates_and_stray_frames_are_refused_and_counted(make: Any) -> None:
    fleet = make()
    devs = _devices(fleet)
    ann = fleet.start_round()
    spy = fleet.device("d0")  # the plain-update fake device of tests/hub/fleet.py, same id
    spy.update(ann, zero_delta(SHAPES))
    rejects = [m for m in spy.inbox if isinstance(m, Reject)]
    assert rejects and rejects[-1].reason is RejectReason.WRONG_TYPE and "secure-aggregation" in rejects[-1].detail
    for d in devs.values():
        d.join(ann)
    settle(fleet)
    t = InMemoryTransport(fleet.broker)
    adv = AdvertiseKeys(f"{FLEET}:{ann.round}:{ann.secagg_seed[:32]}", "d1", b"\1" * 32, b"\2" * 32, b"\3" * 32)  # type: ignore[index]
    t.publish(TOPICS.secagg("d1"), stage_frame(FLEET, ann.round, "d1", adv))  # a second advertise, stage passed
    t.publish(TOPICS.secagg("d2"), stage_frame(FLEET, ann.round, "d2", adv))  # d1's message on d2's topic
    t.publish(TOPICS.secagg("d3"), stage_frame(FLEET, ann.round + 5, "d3", adv))  # another round
    t.publish(TOPICS.secagg("d3"), b"garbage")
    bad = SecAggStage(FLEET, ann.round, "d3", {"fsa": np.frombuffer(b"FSA\x01\x01", dtype=np.uint8)})
    t.publish(TOPICS.secagg("d3"), encode(bad))  # truncated stage bytes
    settle(fleet)
    counts = fleet.hub.store.reject_counts(ann.round)
    assert counts.get("secagg_out_of_order") == 1 and counts.get("secagg_unknown_sender") == 1
    assert counts.get("stale_round") == 1 and counts.get("secagg_malformed") == 1
    assert counts.get("malformed") == 1 and counts.get("wrong_type") == 1
    for i, d in enumerate(DEVICES):  # none of it changed the round
        devs[d].input(_delta(i))
    settle(fleet)
    assert fleet.results[-1].status is RoundStatus.COMPLETED


def test_devices_without_secagg_are_not_selected(make: Any) -> None:
    fleet = make()
    devs = _devices(fleet, ("d0", "d1", "d2"))
    devs["d2"].hello(secagg=False)
    old = fleet.device("old")
    old.hello()  # an older agent: no secagg in its presence
    ann = fleet.start_round()
    assert set(ann.selected) == {"d0", "d1"}


def test_a_stage_below_the_threshold_fails_the_round_and_the_next_works(make: Any) -> None:
    fleet = make(secagg={"enabled": True, "stage_timeout_s": 5.0, "degree": 3, "threshold": 3},
                 rounds={"min_devices": 2})
    devs = _devices(fleet)
    ann = fleet.start_round()
    devs["d0"].join(ann)
    devs["d1"].join(ann)  # 2 advertise < t = 3
    settle(fleet)
    assert not fleet.results
    fleet.advance(6.0)
    settle(fleet)
    res = fleet.results[-1]
    assert res.status is RoundStatus.FAILED_QUORUM and res.model_version is None
    assert res.detail and "below_threshold" in res.detail and "advertise" in res.detail
    ann2 = fleet.start_round()
    assert ann2.round == ann.round + 1
    for d in devs.values():
        d.join(ann2)
    settle(fleet)
    for i, d in enumerate(DEVICES):
        devs[d].input(_delta(i))
    settle(fleet)
    assert fleet.results[-1].status is RoundStatus.COMPLETED and fleet.results[-1].round == ann2.round


def test_a_ring_the_cohort_would_overflow_is_refused_before_announcing(make: Any) -> None:
    fleet = make(secagg={"enabled": True, "ring_bits": 16, "scale": 10000.0})  # fits 2 devices, not 4
    _devices(fleet)
    fleet.control(b"{}")
    settle(fleet)
    assert fleet.retained(TOPICS.announce) is None
    res = fleet.results[-1]
    assert res.status is RoundStatus.FAILED_QUORUM and res.detail and "overflow" in res.detail


def test_a_hub_restart_fails_the_open_secagg_round_cleanly(tmp_path: Path, artifacts: Path) -> None:
    cfg = hub_config(tmp_path / "state", artifacts, secagg={"enabled": True, "stage_timeout_s": 5.0})
    first = iter_hub(cfg)
    fleet = next(first)
    devs = _devices(fleet)
    ann = fleet.start_round()
    for d in devs.values():
        d.join(ann)
    settle(fleet)
    fleet.hub.halt()  # a crash: stage state and secrets gone
    second = iter_hub(cfg, broker=fleet.broker)
    fleet2 = next(second)
    try:
        settle(fleet2)
        res = fleet2.results[-1]
        assert res.round == ann.round and res.status is RoundStatus.FAILED_QUORUM
        assert res.detail and "restarted" in res.detail
        devs2 = {d: SaDevice(fleet2, d) for d in DEVICES}
        ann2 = fleet2.start_round()
        for d in devs2.values():
            d.join(ann2)
        settle(fleet2)
        for i, d in enumerate(DEVICES):
            devs2[d].input(_delta(i))
        settle(fleet2)
        assert fleet2.results[-1].status is RoundStatus.COMPLETED
    finally:
        second.close()


def test_distributed_dp_splits_noise_over_the_cohort_and_never_releases_a_thinner_sum(make: Any) -> None:
    names = tuple(f"d{i}" for i in range(10))
    fleet = make(privacy={"mode": "distributed", "noise_multiplier": 1.0, "clip": 1.0, "sample_rate": 1.0,
                          "dropout_allowance": 0.1},
                 secagg={"enabled": True, "stage_timeout_s": 5.0, "degree": 9, "threshold": 5},
                 rounds={"min_devices": 3})
    devs = _devices(fleet, names)
    ann = fleet.start_round()
    assert ann.dp_mode == "distributed" and ann.dp_min_cohort == 9  # max(3, ceil(0.9 * 10))
    assert ann.secagg_clip is not None and ann.secagg_clip >= 1.0 + 6.0 / 8 ** 0.5  # C + 6 zC/sqrt(m - 1)
    for d in devs.values():
        d.join(ann)
    settle(fleet)
    for i, d in enumerate(names[:8]):  # 8 masked inputs < m = 9: their noise is not enough
        devs[d].input(_delta(i))
    fleet.advance(31.0)  # the round's deadline closes the masked-input stage; unmasking works
    settle(fleet)
    res = fleet.results[-1]
    assert res.status is RoundStatus.FAILED_QUORUM and res.model_version is None
    assert res.detail and "8 devices finished mask < the 9 inputs the sum needs" in res.detail
    # refused before anything was unmasked: no unmask request went out, the hub holds no sum of the 8
    assert fleet.hub.store.secagg_sum(ann.round) is None
    assert not any(d.session is not None and d.session.finished for d in devs.values())


def test_late_key_stages_still_leave_the_masked_inputs_a_stage_timeout(make: Any) -> None:
    fleet = make(secagg={"enabled": True, "stage_timeout_s": 35.0, "degree": 3, "threshold": 2},
                 rounds={"min_devices": 2, "deadline_s": 30})
    devs = _devices(fleet)
    ann = fleet.start_round()
    devs["d3"].mute = True  # advertises, never shares: the share stage waits its whole timeout
    for d in devs.values():
        d.join(ann)
    settle(fleet)
    fleet.advance(36.0)  # the share stage closes after the round's 30 s deadline
    settle(fleet)
    assert not fleet.results, "the masked-input stage must not close with the share stage"
    for i, d in enumerate(DEVICES[:3]):
        devs[d].input(_delta(i))
    settle(fleet)
    assert fleet.results[-1].status is RoundStatus.COMPLETED


def test_a_failure_while_closing_ends_the_round_instead_of_leaving_it_open(make: Any) -> None:
    fleet = make()
    devs = _devices(fleet)
    ann = fleet.start_round()
    for d in devs.values():
        d.join(ann)
    settle(fleet)
    real = fleet.hub.registry.write_head

    def broken(*args: Any, **kwargs: Any) -> Any:
        fleet.hub.registry.write_head = real  # type: ignore[method-assign]
        raise OSError("disk full")

    fleet.hub.registry.write_head = broken  # type: ignore[method-assign]
    for i, d in enumerate(DEVICES):
        devs[d].input(_delta(i))
    settle(fleet)
    res = fleet.results[-1]
    assert res.status is RoundStatus.FAILED_QUORUM and res.detail and "disk full" in res.detail
    assert fleet.hub.round is None


def test_stage_frames_larger_than_the_round_can_need_are_refused_unread(make: Any) -> None:
    fleet = make()
    _devices(fleet)
    ann = fleet.start_round()
    big = SecAggStage(FLEET, ann.round, "d0", {"fsa": np.zeros(1 << 20, dtype=np.uint8)})  # 1 MiB < max_update_bytes
    InMemoryTransport(fleet.broker).publish(TOPICS.secagg("d0"), encode(big))
    settle(fleet)
    assert fleet.hub.store.reject_counts(ann.round).get("too_large") == 1


def test_the_operator_and_hub_accounts_are_never_devices(make: Any) -> None:
    """The broker ACL's %u device patterns match every account: the operator could publish presence and updates
    under its own name. The hub treats those topics as having no device (tests/devices checks the names)."""
    from fedge.devices.fleet import RESERVED_USERS
    from fedge.protocol.topics import RESERVED_IDS

    assert RESERVED_USERS <= RESERVED_IDS
    fleet = make(secagg={"enabled": False})
    _devices(fleet, ("d0", "d1"))
    for name in sorted(RESERVED_IDS):
        fake = SaDevice(fleet, name)
        fake.hello()
    ann = fleet.start_round()
    assert set(ann.selected) == {"d0", "d1"}
    assert not set(fleet.hub.known) & RESERVED_IDS


def test_a_store_from_before_the_silent_column_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    from fedge.hub.store import Store

    db = tmp_path / "hub.sqlite"
    with sqlite3.connect(db) as con:  # the table as the first SecAgg release created it
        con.execute("CREATE TABLE secagg_sums (round INTEGER PRIMARY KEY, included TEXT NOT NULL, dropped TEXT NOT "
                    "NULL, ring_bits INTEGER NOT NULL, scale REAL NOT NULL, total BLOB NOT NULL, ts REAL NOT NULL)")
        con.execute("INSERT INTO secagg_sums VALUES (1, '[\"a\"]', '[]', 32, 65536.0, x'00', 0)")
    store = Store(db)
    try:
        assert store.secagg_silent(1) == []
        store.add_secagg_sum(2, ("a", "b"), (), 32, 65536.0, b"\0" * 8, ("b",))
        assert store.secagg_silent(2) == ["b"]
    finally:
        store.close()


def test_a_distributed_round_every_device_would_decline_is_refused_unannounced(make: Any) -> None:
    fleet = make(privacy={"mode": "distributed", "noise_multiplier": 0.5, "clip": 0.001, "sample_rate": 1.0},
                 secagg={"enabled": True, "stage_timeout_s": 5.0, "scale": 1024.0}, rounds={"min_devices": 2})
    _devices(fleet)
    fleet.control(b"{}")
    settle(fleet)
    assert fleet.retained(TOPICS.announce) is None
    res = fleet.results[-1]
    assert res.status is RoundStatus.FAILED_QUORUM and res.detail and "quantisation step" in res.detail
    assert fleet.hub.store.ledger() == [], "refused before it was announced: no privacy spent"
