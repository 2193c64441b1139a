"""The ``fedge-agent`` command: version, a clear error for bad data, and ``run`` against a real mosquitto
(presence online, republished after a broker restart, offline on SIGTERM with exit code 0)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedge.protocol.codec import decode
from fedge.protocol.messages import Presence
from fedge.protocol.mqtt_config import BrokerConfig
from fedge.protocol.topics import Topics
from fedge.protocol.transport_mqtt import MqttTransport
from tests.helpers import Mosquitto, wait_until

ROOT = Path(__file__).resolve().parents[2]


def _agent(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedge.edge_agent", *args], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def _config(tmp_path: Path, url: str, data: str = "data.npz") -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "dev-cli"\nfleet = "clitest"\ndata = "{data}"\nstate_dir = "state"\nbackend = "numpy"\n\n'
        f'[broker]\nurl = "{url}"\n'
    )
    return cfg


def test_version_prints_agent_and_protocol_version() -> None:
    proc = _agent("version")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out.startswith("fedge-agent ") and "protocol 1" in out


def test_agent_modules_import_without_heavy_frameworks() -> None:
    code = (
        "import sys, fedge.edge_agent.__main__, fedge.edge_agent.agent, fedge.edge_agent.artifacts;"
        "import fedge.edge_agent.config;"
        "heavy = [m for m in ('tensorflow', 'torch', 'onnx', 'sklearn', 'matplotlib', 'keras') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.e2e  # runs `fedge-agent run` as a process (tests/lanes.py)
def test_bad_data_file_exits_nonzero_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "data.npz").write_bytes(b"not a zip")
    proc = _agent("run", "--config", str(_config(tmp_path, "mqtt://127.0.0.1:1")))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "data.npz" in out and "error" in out


@pytest.mark.e2e  # runs `fedge-agent run` as a process (tests/lanes.py)
def test_bad_config_exits_nonzero_naming_the_field(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "mqtt://127.0.0.1:1")
    cfg.write_text(cfg.read_text().replace('backend = "numpy"', 'backend = "cuda"'))
    proc = _agent("run", "--config", str(cfg))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "'backend'" in out


def test_run_presence_survives_broker_restart_and_sigterm_says_offline(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.random((12, 28, 28, 1), dtype=np.float32), y=rng.integers(0, 10, 12))
    topic = Topics("clitest").presence("dev-cli")
    seen: list[Presence] = []
    lock = threading.Lock()

    def on_presence(_t: str, payload: bytes) -> None:
        if payload:
            msg = decode(payload)
            assert isinstance(msg, Presence)
            with lock:
                seen.append(msg)

    def onlines() -> int:
        with lock:
            return len({m.nonce for m in seen if m.online})

    watcher = MqttTransport(BrokerConfig(url=mosquitto.url), "cli-watcher")
    watcher.subscribe(topic, on_presence)
    watcher.connect()
    proc = _agent("run", "--config", str(_config(tmp_path, mosquitto.url)))
    try:
        assert wait_until(lambda: onlines() >= 1, 30), "no online presence"
        first = seen[-1]
        assert first.device == "dev-cli" and first.n_samples == 12 and "numpy" in first.backends
        mosquitto.restart()
        # the agent reconnects by itself and republishes a fresh online presence
        assert wait_until(lambda: onlines() >= 2, 30), "presence not republished after the broker restart"
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert wait_until(lambda: bool(seen) and not seen[-1].online, 10), "no offline presence"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        watcher.close()
    # retained: a newcomer sees the device offline
    seen.clear()
    newcomer = MqttTransport(BrokerConfig(url=mosquitto.url), "cli-newcomer")
    newcomer.subscribe(topic, on_presence)
    newcomer.connect()
    try:
        assert wait_until(lambda: bool(seen), 10)
        assert seen[-1].online is False
    finally:
        newcomer.close()


def test_selftest_is_delegated() -> None:
    proc = _agent("selftest", "--help")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "selftest" in out


def test_run_trains_a_round_over_mqtt(tmp_path: Path, mosquitto: Mosquitto, artifacts_dir: Path) -> None:
    """The hub's retained model/full + model/head and an announce over a real broker → one update."""
    from fedge.protocol.codec import encode
    from fedge.protocol.manifest import Manifest, load_head
    from fedge.protocol.messages import ModelFull, ModelHead, ModelUpdate, RoundAnnounce

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.random((20, 28, 28, 1), dtype=np.float32), y=rng.integers(0, 10, 20))
    t = Topics("clitest")
    man = Manifest.from_json((artifacts_dir / "manifest.json").read_text())
    files = {n: np.frombuffer((artifacts_dir / n).read_bytes(), dtype=np.uint8) for n in man.files}
    full = ModelFull("clitest", man.backbone_sha256, (artifacts_dir / "manifest.json").read_text(), dict(files))
    head = ModelHead("clitest", "v1", None, man.backbone_sha256, None, dict(load_head(artifacts_dir)))
    updates: list[ModelUpdate] = []
    online = threading.Event()

    def on_msg(_t: str, payload: bytes) -> None:
        msg = decode(payload) if payload else None
        if isinstance(msg, ModelUpdate):
            updates.append(msg)
        elif isinstance(msg, Presence) and msg.online:
            online.set()

    hub = MqttTransport(BrokerConfig(url=mosquitto.url), "cli-hub")
    hub.subscribe(t.update_all, on_msg)
    hub.subscribe(t.presence_all, on_msg)
    hub.connect()
    hub.publish(t.model_full, encode(full), retain=True)
    hub.publish(t.model_head, encode(head), retain=True)
    proc = _agent("run", "--config", str(_config(tmp_path, mosquitto.url)))
    try:
        assert online.wait(30), "agent did not come online"
        ann = RoundAnnounce("clitest", 1, "v1", man.backbone_sha256, time.time() + 60, 1, ("dev-cli",), 1, 0.05)
        hub.publish(t.announce, encode(ann), retain=True)
        assert wait_until(lambda: len(updates) >= 1, 60), "no update"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        hub.close()
    (upd,) = updates
    assert upd.round == 1 and upd.device == "dev-cli" and upd.n_samples == 16  # 4 of 20 held out for validation
    assert set(upd.delta) == set(head.head)
