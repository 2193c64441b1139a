"""`fedge hub serve` as a real process on mosquitto: a round with real evaluation, kill -9 mid-round, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.protocol.codec import decode, encode
from fedge.protocol.manifest import Manifest
from fedge.protocol.messages import (
    Ack,
    Arrays,
    HubStatus,
    Message,
    ModelHead,
    ModelUpdate,
    Presence,
    RoundAnnounce,
    RoundResult,
    RoundStatus,
)
from fedge.protocol.mqtt_config import BrokerConfig
from fedge.protocol.topics import Topics
from fedge.protocol.transport_mqtt import MqttTransport
from tests.helpers import Mosquitto, wait_until

pytestmark = pytest.mark.e2e
FLEET = "e2e"
T = Topics(FLEET)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest, Path]:
    from fedge.export.testing import export_small

    root = tmp_path_factory.mktemp("export")
    manifest = export_small(root / "artifacts", "mlp", num_classes=4, input_dim=16)
    rng = np.random.default_rng(0)
    np.savez(root / "eval.npz", x=rng.normal(size=(64, 16)).astype(np.float32), y=rng.integers(0, 4, 64))
    return root / "artifacts", manifest, root / "eval.npz"


class Watcher:
    def __init__(self, url: str) -> None:
        self.retained: dict[str, Message] = {}
        self.inbox: list[Message] = []
        self.cond = threading.Condition()
        self.t = MqttTransport(BrokerConfig(url=url), "watcher", session_expiry_s=0)
        for topic in (T.announce, T.result, T.control_round_result, T.model_head, T.hub_status):
            self.t.subscribe(topic, self._on)
        for dev in "abc":
            self.t.subscribe(T.device_inbox(dev), self._on_inbox)
        self.t.connect()

    def _on(self, topic: str, payload: bytes) -> None:
        with self.cond:
            if payload:
                self.retained[topic] = decode(payload)
            else:
                self.retained.pop(topic, None)
            self.cond.notify_all()

    def _on_inbox(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.inbox.append(decode(payload))
            self.cond.notify_all()

    def wait(self, pred: Any, timeout: float = 30) -> None:
        with self.cond:
            assert self.cond.wait_for(pred, timeout), f"timed out; retained: {sorted(self.retained)}"


def _hub(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fedge.cli", "hub", "serve", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "fedge.cli", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture
def setup(
    tmp_path: Path, mosquitto: Mosquitto, exported: tuple[Path, Manifest, Path]
) -> Iterator[tuple[Path, Watcher]]:
    artifacts, _, eval_data = exported
    config = tmp_path / "hub.toml"
    config.write_text(
        f'fleet = "{FLEET}"\nstate_dir = "state"\nartifacts = "{artifacts}"\neval_data = "{eval_data}"\n'
        f'[broker]\nurl = "{mosquitto.url}"\n[rounds]\nmin_devices = 2\ndeadline_s = 120\n'
    )
    watcher = Watcher(mosquitto.url)
    yield config, watcher
    watcher.t.close()


def test_round_survives_kill_9(setup: tuple[Path, Watcher], exported: tuple[Path, Manifest, Path],
                               mosquitto: Mosquitto, tmp_path: Path) -> None:
    config, w = setup
    _, manifest, _ = exported
    log = tmp_path / "hub.log"
    hub = _hub(config, log)
    try:
        w.wait(lambda: isinstance(w.retained.get(T.model_head), ModelHead))
        dev = MqttTransport(BrokerConfig(url=mosquitto.url), "devices", session_expiry_s=0)
        dev.connect()
        for name in "abc":
            dev.publish(T.presence(name), encode(Presence(fleet=FLEET, device=name, online=True, n_samples=100)),
                        retain=True)
        wait_until(lambda: b"device c online" in log.read_bytes(), 20)
        _cli("round", "start", "--fleet", FLEET, "--broker", mosquitto.url, "--deadline-s", "120")
        w.wait(lambda: isinstance(w.retained.get(T.announce), RoundAnnounce))
        rnd = w.retained[T.announce]
        assert isinstance(rnd, RoundAnnounce) and rnd.selected == ("a", "b", "c")

        def send(name: str, value: float, n: int) -> None:
            delta: Arrays = {p.name: np.full(p.shape, value, np.float32) for p in manifest.head}
            msg = ModelUpdate(fleet=FLEET, round=rnd.round, device=name, model_version=rnd.model_version,
                              n_samples=n, delta=delta)
            dev.publish(T.update(name), encode(msg))

        send("a", 0.1, 10)
        send("b", 0.2, 30)
        w.wait(lambda: sum(isinstance(m, Ack) for m in w.inbox) == 2)
        hub.send_signal(signal.SIGKILL)
        hub.wait(10)
        hub = _hub(config, log)
        assert wait_until(lambda: b"round 1 resumed: 2 updates" in log.read_bytes(), 30), log.read_text()
        send("c", 0.3, 60)
        w.wait(lambda: isinstance(w.retained.get(T.result), RoundResult))
        w.wait(lambda: isinstance(w.retained.get(T.control_round_result), RoundResult))
        res = w.retained[T.control_round_result]  # the operators' copy
        assert isinstance(res, RoundResult)
        assert res.status is RoundStatus.COMPLETED and res.devices == ("a", "b", "c") and res.n_samples == 100
        public = w.retained[T.result]  # what every device reads: no cohort, no sample total
        assert isinstance(public, RoundResult) and public.round == res.round and public.model_version == "v1"
        assert public.devices == () and public.n_samples == 0 and public.status is RoundStatus.COMPLETED
        assert res.accuracy is not None and 0.0 <= res.accuracy <= 1.0
        w.wait(lambda: getattr(w.retained.get(T.model_head), "version", None) == "v1")
        w.wait(lambda: T.announce not in w.retained)  # cleared after the new head
        lines = (config.parent / "state" / "rounds.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["n_samples"] == 100
        status = json.loads(_cli("hub", "status", "--config", str(config)))
        assert status["current_version"] == "v1" and status["rounds"][0]["status"] == "completed"
        dev.close()
    finally:
        hub.send_signal(signal.SIGTERM)
        assert hub.wait(30) == 0
    w.wait(lambda: getattr(w.retained.get(T.hub_status), "online", None) is False)
    assert isinstance(w.retained[T.hub_status], HubStatus)


@pytest.mark.parametrize("fleet", ["a b", "a/b", "x" * 65])
def test_round_start_with_an_invalid_fleet_is_a_clear_error(fleet: str) -> None:
    out = subprocess.run([sys.executable, "-m", "fedge.cli", "round", "start", "--fleet", fleet,
                          "--broker", "mqtt://127.0.0.1:1"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "fleet" in out.stderr and "[A-Za-z0-9_-]" in out.stderr
