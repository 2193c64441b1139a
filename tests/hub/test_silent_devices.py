"""Silent devices cost nothing (issue 21, item 5): rounds close once all but the over-selected share sent a valid
update, devices that miss rounds are selected less often, and a device that stalls rounds is excluded until an
operator readmits it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from fedge.core.conduct import Record, reliability
from fedge.core.rounds import select_devices
from fedge.core.stragglers import round_target, straggler_grace
from fedge.hub.conduct import readmit
from fedge.protocol.messages import RoundStatus
from tests.hub.fleet import SHAPES, hub_config, run_hub, zero_delta
from tests.hub.test_secagg_hub import SaDevice, settle

ROOT = Path(__file__).resolve().parents[2]


def test_straggler_grace() -> None:
    assert straggler_grace(100.0, 100.1) == 0.5 and straggler_grace(100.0, 103.0) == 3.0


def test_round_target() -> None:
    assert round_target(5, 1, 0.25) == 4 and round_target(10, 1, 0.25) == 8
    assert round_target(5, 5, 0.25) == 0  # the quorum is everyone: nothing to save
    assert round_target(3, 1, 0.25) == 0 and round_target(5, 1, 0.0) == 0


def test_a_silent_device_does_not_hold_the_round_to_its_deadline(tmp_path: Path, artifacts: Path) -> None:
    cfg = hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 2, "deadline_s": 60},
                     devices=["a", "b", "c", "d", "silent"])
    for fleet in run_hub(cfg):
        rnd = fleet.start_round()
        assert len(rnd.selected) == 5
        for d in ("a", "b", "c"):
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), n=10)
        assert fleet.results == []  # 3 of the 4 it needs
        fleet.device("d").update(rnd, zero_delta(SHAPES, 0.01), n=10)
        assert fleet.results == []  # the target is there: "silent" gets its grace (as long again, at least 0.5 s)
        fleet.advance(0.5)
        [res] = fleet.results  # closed after the grace, without waiting 60 s for "silent"
        assert res.status is RoundStatus.COMPLETED and res.devices == ("a", "b", "c", "d")
        assert fleet.hub.store.records()["silent"] == Record(1, 0)
        assert fleet.hub.store.standing("silent").strikes == 0  # cut off by an early close: nobody's fault


def test_devices_that_miss_rounds_are_selected_less_often() -> None:
    devices = frozenset(f"d{i}" for i in range(10))
    records = {d: Record(20, 20) for d in devices} | {"d0": Record(20, 0)}
    weights = reliability(records, devices)
    assert weights["d1"] == 1.0 and weights["d0"] == 1 / 21
    picked = Counter(d for rid in range(400) for d in select_devices(devices, 0.5, 1, 0, rid, weights))
    assert picked["d0"] < 0.25 * min(picked[d] for d in devices - {"d0"})
    # nobody missed anything: exactly the unweighted draw (the simulator's)
    same = reliability({d: Record(3, 3) for d in devices}, devices)
    assert select_devices(devices, 0.5, 1, 0, 7, same) == select_devices(devices, 0.5, 1, 0, 7)


def test_a_device_that_keeps_stalling_rounds_is_excluded_and_readmitted(tmp_path: Path, artifacts: Path) -> None:
    cfg = hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 2, "deadline_s": 30, "over_select": 0.0},
                     conduct={"strikes": 2, "exclude_rounds": 3})
    for fleet in run_hub(cfg):
        for d in ("a", "b", "mute"):
            fleet.device(d).hello()
        for _ in range(2):  # mute is online, selected, and never answers: each round waits for its deadline
            rnd = fleet.start_round()
            assert "mute" in rnd.selected
            for d in ("a", "b"):
                fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), n=10)
            fleet.advance(31)
        standing = fleet.hub.store.standing("mute")
        assert standing.until == 6 and standing.reason.startswith("stalled")  # rounds 3, 4, 5 without it
        kinds = [a["kind"] for a in fleet.hub.store.alerts()]
        assert kinds[:2] == ["excluded", "stalled"]
        rnd = fleet.start_round()
        assert rnd.selected == ("a", "b")  # excluded: not selected, the round does not wait for it
        for d in ("a", "b"):
            fleet.device(d).update(rnd, zero_delta(SHAPES, 0.01), n=10)
        assert fleet.results[-1].round == rnd.round and fleet.results[-1].status is RoundStatus.COMPLETED
        readmit(fleet.hub.store, "mute")  # what `fedge hub devices readmit mute` does to the store
        assert "mute" in fleet.start_round().selected


def test_the_readmit_command(tmp_path: Path, artifacts: Path, hub_toml: object) -> None:
    from fedge.core.conduct import Standing
    from fedge.hub.config import load_config
    from fedge.hub.store import Store

    path = hub_toml()  # type: ignore[operator]
    cfg = load_config(path)
    store = Store(cfg.state_dir / "hub.sqlite")
    store.set_standing("evil", Standing(0, 4, 0, True, "bad_shares: accused by 4 peers"))
    store.close()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedge.cli", "hub", "devices", *args, "--config", str(path)],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)

    listed = json.loads(cli("list").stdout)
    [evil] = listed["devices"]
    assert evil["device"] == "evil" and evil["excluded"] and evil["permanent"]
    done = cli("readmit", "evil")
    assert done.returncode == 0 and "readmitted" in done.stdout, done.stderr
    again = cli("readmit", "evil")
    assert again.returncode != 0 and "not excluded" in again.stderr
    [evil] = json.loads(cli("list").stdout)["devices"]
    assert not evil["excluded"] and evil["exclusions"] == 4  # it is excluded for good sooner if it goes on


def test_a_withheld_masked_input_does_not_hold_the_secagg_round(tmp_path: Path, artifacts: Path) -> None:
    names = ("d0", "d1", "d2", "d3", "d4")
    cfg = hub_config(tmp_path / "state", artifacts, rounds={"min_devices": 3, "deadline_s": 60},
                     secagg={"enabled": True, "stage_timeout_s": 5.0})
    for fleet in run_hub(cfg):
        devs = {d: SaDevice(fleet, d) for d in names}
        for d in devs.values():
            d.hello()
        ann = fleet.start_round()
        for d in devs.values():
            d.join(ann)
        settle(fleet)
        for d in names[:4]:  # d4 shared its keys and never sends its masked input
            devs[d].input({k: np.full(s, 0.01, np.float32) for k, s in SHAPES.items()})
        settle(fleet)
        assert fleet.results == []  # 4 inputs: d4 gets its grace
        fleet.clock.t += 0.5
        settle(fleet)
        [res] = fleet.results  # half a second later, not at the deadline (60 s)
        assert res.status is RoundStatus.COMPLETED and res.model_version == "v1"
        included, dropped, *_ = fleet.hub.store.secagg_sum(ann.round)  # type: ignore[misc]
        assert included == list(names[:4]) and dropped == ["d4"]
