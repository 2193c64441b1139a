"""Secure aggregation (SecAgg+) end to end: a hub process and agent processes on mosquitto, every round a SecAgg
round. What the hub learns is checked against what each device kept (``keep_secagg_inputs``): the stored ring
sum is exactly the sum of the included devices' quantised updates; what anyone on the broker sees of one device
is a uniform-looking vector uncorrelated with its update. Devices are SIGKILLed mid-round (above and below the
Shamir threshold), stage frames are replayed, duplicated, re-addressed and garbled from a spy client, and
distributed DP is charged as announced."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from fedge.core.privacy import DpEvent, distributed_min_cohort, epsilon
from fedge.core.secagg import SecAggConfig, dequantise
from fedge.core.secagg_session import STAGE_KEY, stage_of
from fedge.protocol.codec import decode, encode
from fedge.protocol.messages import RoundStatus, SecAggStage
from fedge.protocol.secagg_wire import (
    AdvertiseKeys,
    MaskedInput,
    ShareKeys,
    StageMessage,
    UnmaskResponse,
)
from fedge.protocol.transport_mqtt import MqttTransport
from tests.e2e.fleet import FLEET, Fleet, FleetData
from tests.helpers import Mosquitto, wait_until

pytestmark = pytest.mark.e2e

BIG_SAMPLES = 20_000
"""A victim's local data (shard 0 tiled). A victim is SIGKILLed from the spy's callback the moment its ShareKeys
is on the broker; its features and training on this many samples keep its masked input >= 2 s away from there
(measured in a 10-device fleet: 12k samples 1.5-1.9 s after ShareKeys, 300 samples 0.3-0.4 s; the relay
comes 0.05-0.2 s after ShareKeys)."""


# --------------------------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class Frame:
    """A secagg frame seen on the broker: ``inbound`` device -> hub (``secagg/<device>``), else hub -> device."""

    topic: str
    payload: bytes
    frame: SecAggStage
    msg: StageMessage
    inbound: bool


class Wire:
    """A spy subscribed to ``fedge/<fleet>/#``: every topic in arrival order and every secagg frame decoded.
    ``hooks`` run on the MQTT thread for each frame as it arrives (before it is recorded); frames the test
    injects itself (``inject``) are recorded apart."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.cond = threading.Condition()
        self.topics: list[str] = []
        self.frames: list[Frame] = []
        self.hooks: list[Callable[[Frame], None]] = []
        self._injected: set[bytes] = set()
        self.spy: MqttTransport = fleet.transport("spy")
        self.spy.subscribe(f"{fleet.topics.base}/#", self._on)

    def _on(self, topic: str, payload: bytes) -> None:
        frame: Frame | None = None
        if "/secagg" in topic and payload and payload not in self._injected:
            msg = decode(payload)
            assert isinstance(msg, SecAggStage), topic
            frame = Frame(topic, payload, msg, stage_of(msg), topic.split("/")[2] == "secagg")
            for hook in self.hooks:
                hook(frame)
        with self.cond:
            self.topics.append(topic)
            if frame is not None:
                self.frames.append(frame)
            self.cond.notify_all()

    def inject(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self._injected.add(payload)
        self.spy.publish(topic, payload, qos=1)

    def of(self, rnd: int, kind: type, device: str | None = None) -> list[Frame]:
        """Frames of round ``rnd`` whose stage message is a ``kind`` (sent by / to ``device``)."""
        with self.cond:
            return [f for f in self.frames if f.frame.round == rnd and isinstance(f.msg, kind)
                    and (device is None or f.frame.device == device)]

    def wait(self, pred: Callable[[], bool], timeout_s: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(pred, timeout_s):
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _secagg_hub(fleet: Fleet, *, min_devices: int, degree: int = 0, threshold: int = 0, grace_s: float = 3.0,
                stage_timeout_s: float = 10.0, privacy: dict[str, Any] | None = None) -> None:
    """Every round a SecAgg round (``[secagg]``), devices that keep their inputs; ``privacy``: a ``[privacy]``."""
    rounds = {"min_devices": min_devices, "deadline_s": 60.0, "offline_grace_s": grace_s, "local_epochs": 2}
    secagg = {"enabled": True, "degree": degree, "threshold": threshold, "stage_timeout_s": stage_timeout_s}
    if privacy is None:
        fleet.write_hub_toml(rounds=rounds, secagg=secagg)
    else:
        fleet.write_hub_toml(rounds=rounds, secagg=secagg, privacy=privacy)
    for dev in fleet.devices:
        fleet.set_agent_config(dev, keep_secagg_inputs=True)


def _kept(fleet: Fleet, dev: str, rnd: int) -> NDArray[np.uint64]:
    """The quantised ring vector ``dev`` masked in round ``rnd`` (its keep_secagg_inputs file)."""
    with np.load(fleet.root / "agents" / dev / "secagg" / f"round-{rnd}.npz", allow_pickle=False) as z:
        return np.asarray(z["q"], dtype=np.uint64)


def _has_kept(fleet: Fleet, dev: str, rnd: int) -> bool:
    return (fleet.root / "agents" / dev / "secagg" / f"round-{rnd}.npz").is_file()


def _stored_sum(fleet: Fleet, rnd: int) -> tuple[list[str], list[str], int, NDArray[np.uint64]]:
    """``(included, dropped, ring_bits, ring sum)`` the hub stored for round ``rnd`` (its SQLite, read-only)."""
    rows = fleet.hub_sql("SELECT included, dropped, ring_bits, total FROM secagg_sums WHERE round = ?", (rnd,))
    assert len(rows) == 1, f"no secure sum stored for round {rnd}"
    included, dropped, bits, total = rows[0]
    return json.loads(included), json.loads(dropped), int(bits), np.frombuffer(bytes(total), dtype="<u8").copy()


def _assert_exact_sum(fleet: Fleet, rnd: int, included: list[str]) -> int:
    """The stored ring sum equals the sum mod 2^ring_bits of the included devices' kept q; returns ring_bits."""
    got_included, _, bits, total = _stored_sum(fleet, rnd)
    assert sorted(got_included) == sorted(included)
    mask = np.uint64((1 << bits) - 1)
    expected = np.zeros_like(total)
    for dev in included:
        q = _kept(fleet, dev, rnd)
        assert q.shape == total.shape and not (q & ~mask).any()
        expected = (expected + q) & mask
    assert np.array_equal(total, expected), f"round {rnd}: the hub's sum is not the sum of the devices' inputs"
    assert np.count_nonzero(total) > total.size // 10  # a real sum, not zeros on both sides
    return bits


def _signed(v: NDArray[np.uint64], bits: int) -> NDArray[np.float64]:
    s = (v & np.uint64((1 << bits) - 1)).astype(np.int64)
    s[s >= 1 << (bits - 1)] -= 1 << bits
    return s.astype(np.float64)


def _big_data(fleet_data: FleetData, out: Path) -> Path:
    """A victim's local data: shard 0 tiled to BIG_SAMPLES (feature extraction and training take seconds)."""
    from fedge.datasets.partition import write_npz

    with np.load(fleet_data.shards[0], allow_pickle=False) as z:
        x, y = np.asarray(z["x"]), np.asarray(z["y"])
    reps = math.ceil(BIG_SAMPLES / len(y))
    return write_npz(out, np.concatenate([x] * reps)[:BIG_SAMPLES], np.concatenate([y] * reps)[:BIG_SAMPLES])


class Killer:
    """A Wire hook: sends ``sig`` to device d the moment its first ``plan[d]`` stage message of round ``rnd`` is
    on the broker (before the hub can have answered it); ``done`` says who, and when."""

    def __init__(self, fleet: Fleet, plan: dict[str, type], rnd: int, sig: int = signal.SIGKILL) -> None:
        self.fleet, self.plan, self.rnd, self.sig = fleet, plan, rnd, sig
        self.done: dict[str, float] = {}

    def __call__(self, f: Frame) -> None:
        dev = f.frame.device
        kind = self.plan.get(dev)
        if f.inbound and f.frame.round == self.rnd and kind is not None and isinstance(f.msg, kind) \
                and dev not in self.done:
            os.kill(self.fleet.agents[dev].pid, self.sig)
            self.done[dev] = time.monotonic()


CHI2_MAX = 380.0  # chi-square over 256 byte values (df 255): its 1 - 1e-6 quantile
KS_MAX = 2.7  # Kolmogorov-Smirnov against U[0, 1): D * sqrt(n) > 2.7 has p < 1e-6
R_SIGMAS = 6.0  # |r| of independent vectors of n coordinates is ~ N(0, 1/n)


def _exposure(raw: bytes, y: NDArray[np.uint64], q: NDArray[np.uint64], bits: int) -> tuple[float, float, float]:
    """How much a vector on the wire (``raw`` bytes, ring values ``y``) gives away of a device's ``q``: the
    chi-square of its byte histogram, its KS distance from uniform, and its correlation with q (both centred)."""
    counts = np.bincount(np.frombuffer(raw, dtype=np.uint8), minlength=256).astype(np.float64)
    expect = len(raw) / 256
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    n = y.size
    u = np.sort(y.astype(np.float64) / 2.0**bits)
    i = np.arange(1, n + 1)
    ks = float(max((i / n - u).max(), (u - (i - 1) / n).max()))
    r = float(np.corrcoef(_signed(y, bits), _signed(q, bits))[0, 1])
    return chi2, ks, r


def _status(fleet: Fleet) -> dict[str, Any]:
    """``fedge hub status`` (the operator's view of the hub's store)."""
    out = fleet.hub_cli("hub", "status")
    assert out.returncode == 0, out.stderr
    status: dict[str, Any] = json.loads(out.stdout)
    return status


# ----------------------------------------------------------------------------------------------- tests
def test_ten_devices_hub_learns_exactly_the_sum_and_sees_only_noise(
    make_fleet: Callable[..., Fleet], mosquitto: Mosquitto
) -> None:
    fleet = make_fleet(mosquitto.url, n_agents=10)
    _secagg_hub(fleet, min_devices=10)
    fleet.start_hub()
    wire = Wire(fleet)
    fleet.start_agents(ready=True)
    fleet.start_round()
    (r1,) = fleet.wait_results([1], timeout_s=120)
    assert r1.status is RoundStatus.COMPLETED, r1.detail
    bits = _assert_exact_sum(fleet, 1, fleet.devices)
    _, dropped, _, _ = _stored_sum(fleet, 1)
    assert dropped == []
    ann = fleet.announce_of(1)
    assert ann.secagg_seed and ann.secagg_degree == 8 and ann.secagg_ring_bits == bits  # 2*ceil(log2 10)

    # what the hub (and anyone on the broker) saw: no plain update, and per device only a masked vector
    with wire.cond:
        topics = list(wire.topics)
    assert not [t for t in topics if "/update/" in t], "a plain update was published in a SecAgg round"
    kinds = Counter((type(f.msg).__name__, f.inbound) for f in wire.of(1, object))
    assert kinds == {("AdvertiseKeys", True): 10, ("KeysBroadcast", False): 10, ("ShareKeys", True): 10,
                     ("SharesRelay", False): 10, ("MaskedInput", True): 10, ("UnmaskRequest", False): 10,
                     ("UnmaskResponse", True): 10}, kinds
    masked = wire.of(1, MaskedInput)
    assert sorted(f.frame.device for f in masked) == fleet.devices
    dim = _kept(fleet, fleet.devices[0], 1).size
    assert dim > 1000  # the head's ring vector: enough coordinates for the statistics below
    for f in masked:
        assert isinstance(f.msg, MaskedInput) and f.msg.ring_bits == bits == 32
        y = f.msg.values()
        q = _kept(fleet, f.frame.device, 1)
        assert y.size == q.size == dim and np.count_nonzero(q) > dim // 10
        chi2, ks, r = _exposure(f.msg.vector, y, q, bits)
        assert chi2 < CHI2_MAX, f"{f.frame.device}: masked bytes are not uniform (chi2 {chi2:.0f})"
        assert ks < KS_MAX / math.sqrt(dim), f"{f.frame.device}: masked values are not uniform (KS {ks:.4f})"
        assert abs(r) < R_SIGMAS / math.sqrt(dim), f"{f.frame.device}: masked input correlates with q (r={r})"
        # the same statistics do see an update sent in the clear (the device's own q as it would go on the wire)
        chi2, ks, r = _exposure(q.astype("<u4").tobytes(), q, q, bits)
        assert chi2 > CHI2_MAX and ks > KS_MAX / math.sqrt(dim) and r > 0.99


def test_dropouts_before_the_input_and_during_unmasking(
    make_fleet: Callable[..., Fleet], mosquitto: Mosquitto, fleet_data: FleetData, tmp_path: Path
) -> None:
    fleet = make_fleet(mosquitto.url, n_agents=10)
    victims = ["device-01", "device-02", "device-03"]  # killed after their shares, before their masked input
    late = "device-04"  # killed after its masked input, before it answered the unmask request
    big = _big_data(fleet_data, tmp_path / "big.npz")
    _secagg_hub(fleet, min_devices=5, degree=9, threshold=5, grace_s=3.0, stage_timeout_s=10.0)
    for dev in victims:
        fleet.set_agent_config(dev, data=big)
    fleet.start_hub()
    wire = Wire(fleet)
    fleet.start_agents(ready=True)
    killer = Killer(fleet, {**dict.fromkeys(victims, ShareKeys), late: MaskedInput}, rnd=1)
    wire.hooks.append(killer)
    fleet.start_round()
    (r1,) = fleet.wait_results([1], timeout_s=120)
    assert sorted(killer.done) == sorted([*victims, late]), killer.done
    assert r1.status is RoundStatus.COMPLETED, r1.detail

    survivors = [d for d in fleet.devices if d not in victims]
    included, dropped, _, _ = _stored_sum(fleet, 1)
    assert sorted(included) == survivors and sorted(dropped) == victims
    _assert_exact_sum(fleet, 1, survivors)  # the late device's input is in the sum though it never unmasked
    # the premises, as the broker saw them
    assert not [f for v in victims for f in wire.of(1, MaskedInput, v)], "a victim sent its masked input"
    assert not any(_has_kept(fleet, v, 1) for v in victims)
    assert len(wire.of(1, MaskedInput, late)) == 1 and not wire.of(1, UnmaskResponse, late)
    assert sorted(f.frame.device for f in wire.of(1, UnmaskResponse)) == sorted(set(survivors) - {late})
    status = _status(fleet)
    row = next(r for r in status["rounds"] if r["id"] == 1)
    assert row["status"] == "completed" and row["new_version"], row


def test_below_threshold_fails_cleanly_and_the_next_round_completes(
    make_fleet: Callable[..., Fleet], mosquitto: Mosquitto, fleet_data: FleetData, tmp_path: Path
) -> None:
    fleet = make_fleet(mosquitto.url, n_agents=6)
    victims = ["device-01", "device-02"]  # 6 - 2 = 4 masked inputs < t = 5
    big = _big_data(fleet_data, tmp_path / "big.npz")
    _secagg_hub(fleet, min_devices=4, degree=5, threshold=5, grace_s=2.0, stage_timeout_s=5.0)
    for dev in victims:
        fleet.set_agent_config(dev, data=big)
    fleet.start_hub()
    wire = Wire(fleet)
    fleet.start_agents(ready=True)
    killer = Killer(fleet, dict.fromkeys(victims, ShareKeys), rnd=1)
    wire.hooks.append(killer)
    versions_before = len(_status(fleet)["versions"])
    fleet.start_round()
    (r1,) = fleet.wait_results([1], timeout_s=90)
    assert sorted(killer.done) == victims
    assert r1.status is RoundStatus.FAILED_QUORUM
    assert r1.detail and "secure aggregation failed in stage mask" in r1.detail, r1.detail
    assert "below_threshold" in r1.detail and "t=5" in r1.detail, r1.detail
    status = _status(fleet)
    row = next(r for r in status["rounds"] if r["id"] == 1)
    assert row["status"] == "failed_quorum" and row["new_version"] is None, row
    assert len(status["versions"]) == versions_before
    assert not fleet.hub_sql("SELECT round FROM secagg_sums")
    assert not wire.of(1, UnmaskResponse), "no unmasking below the threshold"

    for i, dev in enumerate(fleet.devices):  # the victims come back with their usual data
        if dev in victims:
            assert fleet.agents[dev].stop() == -signal.SIGKILL  # reaped
            fleet.set_agent_config(dev, data=fleet_data.shards[i % len(fleet_data.shards)])
    fleet.start_agents(victims, ready=True)
    fleet.start_round()
    (r2,) = fleet.wait_results([2], timeout_s=90)
    assert r2.status is RoundStatus.COMPLETED, r2.detail
    _assert_exact_sum(fleet, 2, fleet.devices)
    status = _status(fleet)
    assert len(status["versions"]) == versions_before + 1


def _reject_counts(fleet: Fleet) -> Counter[tuple[int | None, str]]:
    return Counter({(rnd, reason): n for rnd, reason, n in
                    fleet.hub_sql("SELECT round, reason, COUNT(*) FROM rejects GROUP BY round, reason")})


def test_replayed_duplicated_readdressed_and_garbled_frames_are_refused(
    make_fleet: Callable[..., Fleet], mosquitto: Mosquitto
) -> None:
    fleet = make_fleet(mosquitto.url, n_agents=5)
    _secagg_hub(fleet, min_devices=5, stage_timeout_s=30.0)
    fleet.start_hub()
    wire = Wire(fleet)
    fleet.start_agents(ready=True)
    tp = fleet.topics
    held = fleet.agents["device-04"]  # stopped while the advertise stage is open: the stage waits for it
    a, b, c = "device-00", "device-01", "device-02"

    def hold_advertise_open(rnd: int) -> list[Frame]:
        os.kill(held.pid, signal.SIGSTOP)
        fleet.start_round()
        wire.wait(lambda: all(wire.of(rnd, AdvertiseKeys, d) for d in (a, b, c, "device-03")), 30,
                  f"round {rnd} adverts")
        assert not wire.of(rnd, AdvertiseKeys, "device-04") and not wire.of(rnd, ShareKeys)
        return [wire.of(rnd, AdvertiseKeys, d)[0] for d in (a, b)]

    def counted(want: Counter[tuple[int | None, str]]) -> None:
        ok = wait_until(lambda: _reject_counts(fleet) == want, timeout_s=30, interval_s=0.3)
        assert ok, f"rejects {dict(_reject_counts(fleet))} != {dict(want)}"

    # round 1: a duplicate, a frame of A re-addressed as B's, garbage, and a frame whose stage bytes are garbage
    adv_a, adv_b = hold_advertise_open(1)
    wire.inject(tp.secagg(a), adv_a.payload)  # the genuine frame again, verbatim
    wire.inject(tp.secagg(b), encode(SecAggStage(FLEET, 1, b, {STAGE_KEY: adv_a.frame.stage[STAGE_KEY]})))
    wire.inject(tp.secagg(c), b"\x00\x01 not a frame \xff" * 8)
    wire.inject(tp.secagg(c), encode(SecAggStage(FLEET, 1, c, {STAGE_KEY: np.frombuffer(
        b"\xff" * 48, dtype=np.uint8)})))
    counted(Counter({(1, "secagg_duplicate"): 1, (1, "secagg_unknown_sender"): 1, (1, "malformed"): 1,
                     (1, "secagg_malformed"): 1}))
    os.kill(held.pid, signal.SIGCONT)
    (r1,) = fleet.wait_results([1], timeout_s=60)
    assert r1.status is RoundStatus.COMPLETED, r1.detail
    _assert_exact_sum(fleet, 1, fleet.devices)
    before = _reject_counts(fleet)

    # round 2: replays of round 1: the frame as it was (a stale round), and its stage message re-framed as round 2's
    fleet.wait_for(lambda s: all(s.models.get(d) == r1.model_version for d in fleet.devices), 30, "v1 everywhere")
    hold_advertise_open(2)
    wire.inject(tp.secagg(b), adv_b.payload)
    wire.inject(tp.secagg(b), encode(SecAggStage(FLEET, 2, b, {STAGE_KEY: adv_b.frame.stage[STAGE_KEY]})))
    old_masked = wire.of(1, MaskedInput, c)[0]
    wire.inject(tp.secagg(c), encode(SecAggStage(FLEET, 2, c, {STAGE_KEY: old_masked.frame.stage[STAGE_KEY]})))
    counted(before + Counter({(2, "stale_round"): 1, (2, "secagg_wrong_round"): 2}))
    os.kill(held.pid, signal.SIGCONT)
    (r2,) = fleet.wait_results([2], timeout_s=60)
    assert r2.status is RoundStatus.COMPLETED, r2.detail
    _assert_exact_sum(fleet, 2, fleet.devices)
    assert _reject_counts(fleet) == before + Counter({(2, "stale_round"): 1, (2, "secagg_wrong_round"): 2})
    rejects = _status(fleet)["rejects"]  # the operator's view counts them too
    assert isinstance(rejects, dict) and rejects.get("secagg_wrong_round") == 2 and rejects.get("stale_round") == 1


def test_distributed_dp_under_secure_aggregation(make_fleet: Callable[..., Fleet], mosquitto: Mosquitto) -> None:
    z, clip, delta, min_devices, allowance = 1.0, 1.0, 1e-5, 4, 0.1
    fleet = make_fleet(mosquitto.url, n_agents=5)
    _secagg_hub(fleet, min_devices=min_devices, privacy={
        "mode": "distributed", "noise_multiplier": z, "clip": clip, "sample_rate": 1.0, "delta": delta,
        "dropout_allowance": allowance})
    fleet.start_hub()
    fleet.start_agents(ready=True)
    fleet.start_round()
    (r1,) = fleet.wait_results([1], timeout_s=120)
    assert r1.status is RoundStatus.COMPLETED, r1.detail
    expected_eps = epsilon([DpEvent(z)], delta)  # central, no amplification: the hub sees only the sum
    assert r1.epsilon == pytest.approx(expected_eps, rel=1e-6)
    out = fleet.hub_cli("hub", "privacy", "--json")
    assert out.returncode == 0, out.stderr
    ledger = json.loads(out.stdout)
    assert [(r["round"], r["mode"]) for r in ledger["rounds"]] == [(1, "distributed")]
    assert ledger["rounds"][0]["epsilon"] == pytest.approx(expected_eps, rel=1e-6)
    assert ledger["epsilon_spent"] == pytest.approx(expected_eps, rel=1e-6)

    # the noise is split over m = max(min_devices, ceil((1 - allowance) * cohort)) = 5 of the 5 selected
    m = distributed_min_cohort(len(fleet.devices), min_devices, allowance)
    assert m == 5
    ann = fleet.announce_of(1)
    assert ann.dp_mode == "distributed" and ann.dp_min_cohort == m and ann.secagg_seed
    bits = _assert_exact_sum(fleet, 1, fleet.devices)
    cfg = SecAggConfig(ring_bits=bits, clip=ann.secagg_clip or 1.0, scale=ann.secagg_scale or 65536.0)
    sigma = z * clip / math.sqrt(m - 1)  # split over m - 1: the sum less any one device still holds (zC)^2
    for dev in fleet.devices:
        # clipped update (norm <= C: ~C/sqrt(d) per coordinate) + N(0, (zC)^2/(m-1)) per coordinate; the sample std
        # of d = 2410 coordinates is within 1.5 % of sigma (1 s.d.), and 1/sqrt(5) would be 11 % off
        x = dequantise(_kept(fleet, dev, 1), cfg)
        assert 0.93 * sigma < float(x.std()) < 1.07 * sigma, (dev, float(x.std()), sigma)
        assert abs(float(x.mean())) < 6 * sigma / math.sqrt(x.size) + clip / math.sqrt(x.size)
        book = json.loads((fleet.root / "agents" / dev / "privacy.json").read_text())
        assert book["entries"] == [{"round": 1, "mode": "distributed", "noise_multiplier": z, "clip": clip,
                                    "noise_std": pytest.approx(sigma)}]
