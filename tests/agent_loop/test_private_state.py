"""The agent's state is private and bounded (issue 12, item 5): folders 0700 and files 0600, old heads and
backbones pruned (the current and the previous kept). Synthetic model/full frames: installing needs no trainer."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedge.edge_agent.agent import Agent
from fedge.edge_agent.config import AgentConfig, config_from_mapping
from fedge.protocol.codec import encode
from fedge.protocol.messages import ModelHead, ModelUpdate
from fedge.protocol.topics import Topics
from fedge.protocol.transport import InMemoryBroker
from tests.agent_loop.test_model_full_memory import synthetic_model_full

FLEET = "priv"
T = Topics(FLEET)


def backbone(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


@pytest.fixture
def config(tmp_path: Path) -> AgentConfig:
    data = tmp_path / "local.npz"
    np.savez(data, x=np.zeros((4, 4), np.float32), y=np.array([0, 1, 0, 1]))
    return config_from_mapping({"device_id": "d1", "fleet": FLEET, "data": str(data), "state_dir": "state",
                                "backend": "numpy", "broker": {"url": "mqtt://127.0.0.1:1"}}, tmp_path)


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker()


@pytest.fixture
def agent(config: AgentConfig, broker: InMemoryBroker) -> Iterator[Agent]:
    from fedge.protocol.transport import InMemoryTransport

    a = Agent(config, transport=InMemoryTransport(broker))
    yield a
    a.stop()


def send_full(broker: InMemoryBroker, tag: str) -> None:
    broker.publish(T.model_full, encode(synthetic_model_full(4096, FLEET, tag.encode())), False)


def send_head(broker: InMemoryBroker, version: str, tag: str) -> None:
    head = {"h0_kernel": np.full((4, 2), float(version[1:]), np.float32), "h0_bias": np.zeros(2, np.float32)}
    broker.publish(T.model_head, encode(ModelHead(FLEET, version, None, backbone(tag), None, head)), False)


def modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = Path(folder) / name
            out[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return out


def test_the_state_directory_is_private(config: AgentConfig, broker: InMemoryBroker, agent: Agent) -> None:
    state = config.state_dir
    (state / "heads").mkdir(parents=True, mode=0o755)  # what an older agent (or a umask of 022) left behind
    os.chmod(state, 0o755)
    (state / "state.json").write_text(json.dumps({"last_completed_round": 0}))
    os.chmod(state / "state.json", 0o644)
    agent.start()
    send_full(broker, "bb1")
    send_head(broker, "v1", "bb1")
    update = ModelUpdate(FLEET, 1, "d1", "v1", 4, {"h0_kernel": np.ones((4, 2), np.float32)})
    agent.worker._publish_update(1, encode(update), None, {"h0_kernel": np.ones((4, 2), np.float32)})
    got = modes(state)
    assert any(p.startswith("artifacts/") and p.endswith("model.tflite") for p in got), got
    assert "heads/v1.npz" in got and "personal_head.npz" in got, got
    wrong = {p: oct(m) for p, m in got.items() if m != (0o700 if (state / p).is_dir() else 0o600)}
    assert not wrong, f"not private: {wrong}"


def test_only_the_current_and_previous_heads_and_backbones_are_kept(
        config: AgentConfig, broker: InMemoryBroker, agent: Agent) -> None:
    agent.start()
    artifacts, heads = config.state_dir / "artifacts", config.state_dir / "heads"
    send_full(broker, "bb1")
    for v in ("v1", "v2", "v3"):
        send_head(broker, v, "bb1")
    assert sorted(p.name for p in heads.iterdir()) == ["v2.npz", "v3.npz"]
    assert set(agent.state.versions) == {"v2", "v3"}
    send_full(broker, "bb2")  # a new backbone arrives before its head: the held one stays
    assert {p.name for p in artifacts.iterdir()} == {backbone("bb1")[:16], backbone("bb2")[:16]}
    send_head(broker, "v4", "bb2")
    send_head(broker, "v5", "bb2")
    send_full(broker, "bb3")
    # current head v5 is over bb2; bb3 is the newest; bb1 (no kept head, not among the two newest) is gone
    assert {p.name for p in artifacts.iterdir()} == {backbone("bb2")[:16], backbone("bb3")[:16]}
    assert sorted(p.name for p in heads.iterdir()) == ["v4.npz", "v5.npz"]
    assert agent.state.model_version == "v5"
    saved = json.loads((config.state_dir / "state.json").read_text())
    assert saved["backbones"] == [backbone("bb2"), backbone("bb3")] and set(saved["versions"]) == {"v4", "v5"}
