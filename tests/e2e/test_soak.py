"""Soak: 10,000 hostile messages of every kind against a running hub and agents on mosquitto.

Loopback only, bounded in count and time. Nobody dies, every message addressed to the hub is rejected or
ignored with a reason and counted (``fedge hub status``), memory stays flat, and a round started afterwards
completes with every agent.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedge.protocol.codec import encode
from fedge.protocol.manifest import load_manifest
from fedge.protocol.messages import (
    Ack,
    Arrays,
    Decline,
    DeclineReason,
    ModelUpdate,
    Presence,
    Reject,
    RejectReason,
    RoundStatus,
)
from tests.e2e.fleet import FLEET, Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_MESSAGES = 10_000
N_AGENTS = 3
WARMUP = 2_000  # memory is compared between the end of the warm-up and the end of the flood
MAX_RSS_GROWTH_MB = 25.0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class Flood:
    """Builds the hostile messages: (topic, payload, what the hub counts it as: 'reject' | 'control' | None).

    Garbage on the hub's own topics (announce, model/head, model/full) reaches the agents, which ignore it, and
    the hub's watchdog, which counts it as an ``impersonation`` reject."""

    def __init__(self, fleet: Fleet, limit: int, rng: random.Random) -> None:
        self.fleet, self.tp, self.rng, self.limit = fleet, fleet.topics, rng, limit
        manifest = load_manifest(fleet.data.artifacts)
        self.zeros: Arrays = {p.name: np.zeros(p.shape, np.float32) for p in manifest.head}
        self.devices = fleet.devices

    def _update(self, device: str, **over: object) -> bytes:
        kw: dict[str, object] = {"fleet": FLEET, "round": 1, "device": device, "model_version": "v0000",
                                 "n_samples": 10, "delta": self.zeros, "metrics": {"loss": 1.0}}
        kw.update(over)
        return encode(ModelUpdate(**kw))  # type: ignore[arg-type]

    def _garbage(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def kinds(self) -> list[tuple[str, list[tuple[str, bytes, str | None]]]]:
        """One small batch per kind; the flood cycles through them."""
        r, tp, dev = self.rng, self.tp, self.devices
        first = next(iter(self.zeros))
        nan = {**self.zeros, first: np.full(self.zeros[first].shape, np.nan, np.float32)}
        huge = {**self.zeros, first: np.full(self.zeros[first].shape, 3e38, np.float32)}
        wrong = {**self.zeros, first: np.zeros((2, 2), np.float32)}
        big = {**self.zeros, "pad": np.zeros(self.limit // 4 + 64, np.float32)}
        valid = self._update(dev[0])
        d = r.choice(dev)
        intruder = f"intruder-{r.randrange(10_000):04d}"
        return [
            ("update: random bytes", [(tp.update(d), self._garbage(r.randrange(1, 400)), "reject")]),
            ("update: truncated frame", [(tp.update(d), valid[: r.randrange(1, len(valid))], "reject")]),
            ("update: too large", [(tp.update(d), self._update(d, delta=big), "reject")]),
            ("update: not finite", [(tp.update(d), self._update(d, delta=nan), "reject")]),
            ("update: overflowing", [(tp.update(d), self._update(d, delta=huge, n_samples=10**9), "reject")]),
            ("update: wrong shape", [(tp.update(d), self._update(d, delta=wrong), "reject")]),
            ("update: stale round", [(tp.update(d), self._update(d, round=r.randrange(2, 10**6)), "reject")]),
            ("update: unknown device", [(tp.update(intruder), self._update(intruder), "reject")]),
            ("update: names another device", [(tp.update(intruder), self._update(d), "reject")]),
            ("update: wrong type", [(tp.update(d), encode(Ack(FLEET, 1, d, "x" * 8)), "reject")]),
            ("update: other fleet", [(tp.update(d), self._update(d, fleet="elsewhere"), "reject")]),
            ("decline: random bytes", [(tp.decline(d), self._garbage(r.randrange(1, 200)), "reject")]),
            ("decline: stale", [(tp.decline(d), encode(Decline(FLEET, r.randrange(2, 999), d,
                                                               DeclineReason.DATA_ERROR, "soak")), "reject")]),
            ("control: not json", [(tp.control_round_start, self._garbage(r.randrange(1, 100)), "control")]),
            ("control: not an object", [(tp.control_round_start, b"[1, 2, 3]", "control")]),
            ("control: unknown key", [(tp.control_round_start, b'{"lr": 0.1, "rm -rf": 1}', "control")]),
            ("control: wrong type", [(tp.control_round_start, b'{"local_epochs": "many"}', "control")]),
            ("control: out of range", [(tp.control_round_start, json.dumps(
                r.choice([{"lr": 1e300}, {"local_epochs": 10**12}, {"deadline_s": 1e300},
                          {"min_devices": 10**9}])).encode(), "control")]),
            ("control: oversized", [(tp.control_round_start, b'{"lr": 0.1, "x": "' + b"a" * 300_000 + b'"}',
                                     "control")]),
            ("presence: random bytes", [(tp.presence(intruder), self._garbage(r.randrange(1, 200)), None)]),
            ("presence: another device", [(tp.presence(intruder), encode(Presence(FLEET, d, True)), None)]),
            # garbage on the hub's own topics: the hub's watchdog counts it (impersonation)
            ("agents: garbage announce", [(tp.announce, self._garbage(r.randrange(1, 300)), "reject")]),
            ("agents: garbage head", [(tp.model_head, self._garbage(r.randrange(1, 300)), "reject")]),
            ("agents: garbage model", [(tp.model_full, self._garbage(r.randrange(1, 3000)), "reject")]),
            ("agents: garbage inbox", [(f"{tp.base}/device/{d}/ack", self._garbage(r.randrange(1, 100)), None)]),
            ("agents: foreign ack", [(tp.ack(d), encode(Ack(FLEET, r.randrange(1, 99), d, "f" * 16)), None)]),
            ("agents: foreign reject", [(tp.reject(d), encode(Reject(FLEET, 1, d, RejectReason.MALFORMED,
                                                                     "soak", ref_nonce="f" * 16)), None)]),
        ]

    def messages(self, n: int) -> list[tuple[str, str, bytes, str | None]]:
        out: list[tuple[str, str, bytes, str | None]] = []
        while len(out) < n:
            for kind, batch in self.kinds():
                out.extend((kind, t, p, c) for t, p, c in batch)
        return out[:n]


def _counted(fleet: Fleet) -> tuple[int, int]:
    status = fleet.hub_cli("hub", "status")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    return sum(st["rejects"].values()), sum(st["control"].values())


def test_ten_thousand_hostile_messages_leave_the_fleet_working(make_fleet, mosquitto) -> None:  # type: ignore[no-untyped-def]
    fleet: Fleet = make_fleet(mosquitto.url, n_agents=N_AGENTS)
    manifest = load_manifest(fleet.data.artifacts)
    zeros: Arrays = {p.name: np.zeros(p.shape, np.float32) for p in manifest.head}
    limit = 2 * len(encode(ModelUpdate(FLEET, 1, "device-00", "v0000", 300, zeros, {"loss": 1.0}))) + 4096
    fleet.write_hub_toml(devices=fleet.devices, rounds={"max_update_bytes": limit, "deadline_s": 120.0})
    fleet.start_hub()
    fleet.start_agents(ready=True)
    procs = {"hub": fleet.hub, **fleet.agents}

    msgs = Flood(fleet, limit, random.Random(1234)).messages(N_MESSAGES)
    kinds = Counter(k for k, *_ in msgs)
    assert len(kinds) >= 25, kinds
    attacker = fleet.transport("attacker")
    expected_rejects = sum(1 for *_, c in msgs if c == "reject")
    expected_controls = sum(1 for *_, c in msgs if c == "control")
    rejects0, controls0 = _counted(fleet)

    started = time.monotonic()
    rss: dict[str, float] = {}
    for i, (_kind, topic, payload, _c) in enumerate(msgs):
        attacker.publish(topic, payload, qos=1)
        if i == WARMUP:
            time.sleep(2)
            rss = {name: _rss_mb(p.pid) for name, p in procs.items()}
    deadline = time.monotonic() + 240
    while True:  # the flood is bounded in time: the hub must have worked through it within minutes
        rejects, controls = _counted(fleet)
        if (rejects - rejects0, controls - controls0) == (expected_rejects, expected_controls):
            break
        assert time.monotonic() < deadline, (
            f"after the flood the hub counted {rejects - rejects0}/{expected_rejects} rejects and "
            f"{controls - controls0}/{expected_controls} refused controls")
        time.sleep(2)
    elapsed = time.monotonic() - started
    print(f"soak: {N_MESSAGES} messages ({len(kinds)} kinds) handled in {elapsed:.1f} s")

    dead = [name for name, p in procs.items() if not p.alive]
    assert dead == [], f"processes died: {dead}"
    grown = {name: _rss_mb(p.pid) - rss[name] for name, p in procs.items()}
    assert max(grown.values()) < MAX_RSS_GROWTH_MB, f"RSS growth (MB) after the warm-up: {grown}"
    with fleet.cond:
        assert fleet.seen.results == {}, "no hostile control started a round"

    fleet.start_round()
    (res,) = fleet.wait_results([1], timeout_s=120)
    assert res.status is RoundStatus.COMPLETED, res
    assert sorted(res.devices) == fleet.devices
    assert os.path.getsize(fleet.state_dir / "hub.sqlite") < 64 << 20, "the store did not balloon"
