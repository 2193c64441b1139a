"""An agent with ``hub_public_key`` acts only on hub frames signed by that key (or one it rotated to), with
rounds and model versions only moving forward; any agent refuses a round id far beyond the last one seen."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.edge_agent.agent import Agent
from fedge.edge_agent.config import AgentConfig, config_from_mapping
from fedge.edge_agent.trust import MAX_ROUND_JUMP
from fedge.protocol.codec import encode
from fedge.protocol.manifest import Manifest
from fedge.protocol.messages import Message
from fedge.protocol.signing import HubSigner, KeyRotation, rotation_topic
from fedge.protocol.transport import InMemoryTransport
from tests.agent_loop.test_agent_loop import DEV, FLEET, Hub, T, announce, model_full, model_head
from tests.helpers import wait_until


@pytest.fixture
def hub_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _config(tmp_path: Path, pub: Path | None) -> AgentConfig:
    import numpy as np

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "local.npz", x=rng.random((40, 28, 28, 1), dtype=np.float32), y=rng.integers(0, 10, 40))
    table: dict[str, Any] = {"device_id": DEV, "fleet": FLEET, "data": "local.npz", "state_dir": "state",
                             "broker": {"url": "mqtt://127.0.0.1:1"}}
    if pub is not None:
        table["hub_public_key"] = pub.name  # relative to agent.toml's folder
    return config_from_mapping(table, tmp_path)


@pytest.fixture
def signed_config(tmp_path: Path, hub_key: Ed25519PrivateKey) -> AgentConfig:
    pub = tmp_path / "hub-signing.pub"
    pub.write_bytes(hub_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return _config(tmp_path, pub)


@pytest.fixture
def hub() -> Hub:
    return Hub()


def _send(hub: Hub, topic: str, msg: Message, key: Ed25519PrivateKey | None, retain: bool = False) -> None:
    frame = encode(msg)
    hub.broker.publish(topic, frame if key is None else HubSigner(key, FLEET).sign(frame, topic), retain)


@pytest.fixture
def agent(signed_config: AgentConfig, hub: Hub) -> Iterator[Agent]:
    a = Agent(signed_config, transport=InMemoryTransport(hub.broker))
    yield a
    a.stop()


def _refused(config: AgentConfig) -> dict[str, int]:
    path = config.state_dir / "trust.json"
    return dict(json.loads(path.read_text())["refused"]) if path.is_file() else {}


def test_pinned_agent_refuses_unsigned_foreign_and_replayed_models(
    agent: Agent, hub: Hub, hub_key: Ed25519PrivateKey, signed_config: AgentConfig, artifacts_dir: Path,
    manifest: Manifest,
) -> None:
    rogue = Ed25519PrivateKey.generate()
    _send(hub, T.model_full, model_full(artifacts_dir, manifest), rogue, retain=True)  # a forged copy first
    _send(hub, T.model_head, model_head(artifacts_dir, manifest, "v1"), None, retain=True)  # unsigned
    agent.start()
    assert agent.state.model_version is None and not agent.state.backbones
    assert _refused(signed_config) == {"unknown_key": 1, "unsigned": 1}

    _send(hub, T.model_full, model_full(artifacts_dir, manifest), hub_key)
    _send(hub, T.model_head, model_head(artifacts_dir, manifest, "v2"), hub_key)
    assert agent.state.model_version == "v2"
    _send(hub, T.model_head, model_head(artifacts_dir, manifest, "v1"), hub_key)  # an older signed head replayed
    _send(hub, T.model_head, model_head(artifacts_dir, manifest, "v9"), rogue)
    _send(hub, T.model_head, model_head(artifacts_dir, manifest, "v9"), None)
    assert agent.state.model_version == "v2"
    assert _refused(signed_config) == {"unknown_key": 2, "unsigned": 2, "replayed": 1}

    # a signed announce trains; an unsigned one and an older signed one (replayed) do not
    _send(hub, T.announce, announce(manifest, 3, version="v2"), None)
    _send(hub, T.announce, announce(manifest, 4, version="v2"), hub_key)
    assert agent.wait_round_done(4, 60)
    _send(hub, T.announce, announce(manifest, 2, version="v2"), hub_key)
    _send(hub, T.announce, announce(manifest, 5, version="v2"), hub_key)
    assert agent.wait_round_done(5, 60)
    assert [u.round for u in hub.updates()] == [4, 5]
    assert _refused(signed_config)["replayed"] == 2 and _refused(signed_config)["unsigned"] == 3


def test_replay_floor_survives_a_restart(
    signed_config: AgentConfig, hub: Hub, hub_key: Ed25519PrivateKey, artifacts_dir: Path, manifest: Manifest
) -> None:
    _send(hub, T.model_full, model_full(artifacts_dir, manifest), hub_key, retain=True)
    _send(hub, T.model_head, model_head(artifacts_dir, manifest, "v5"), hub_key, retain=True)
    first = Agent(signed_config, transport=InMemoryTransport(hub.broker))
    first.start()
    assert first.state.model_version == "v5"
    first.stop()
    _send(hub, T.model_head, model_head(artifacts_dir, manifest, "v4"), hub_key, retain=True)  # replayed, retained
    second = Agent(signed_config, transport=InMemoryTransport(hub.broker))
    second.start()
    try:
        assert second.state.model_version == "v5"
        assert set(_refused(signed_config)) == {"replayed"}  # (the stopped agent's transport still hears it too)
    finally:
        second.stop()


def test_key_rotation_moves_trust_to_the_new_key(
    agent: Agent, hub: Hub, hub_key: Ed25519PrivateKey, signed_config: AgentConfig, artifacts_dir: Path,
    manifest: Manifest,
) -> None:
    new = Ed25519PrivateKey.generate()
    newer = Ed25519PrivateKey.generate()
    # the second rotation arrives before the first: applied in order once the chain connects
    hub.broker.publish(rotation_topic(FLEET, 2), KeyRotation.make(FLEET, new, newer.public_key(), 2), True)
    hub.broker.publish(rotation_topic(FLEET, 1), KeyRotation.make(FLEET, hub_key, new.public_key(), 1), True)
    agent.start()
    assert agent.trust.rotation_seq == 2
    _send(hub, T.model_full, model_full(artifacts_dir, manifest), hub_key)  # the retired key
    _send(hub, T.model_head, model_head(artifacts_dir, manifest, "v1"), hub_key)
    assert agent.state.model_version is None
    _send(hub, T.model_full, model_full(artifacts_dir, manifest), newer)
    _send(hub, T.model_head, model_head(artifacts_dir, manifest, "v1"), newer)
    assert agent.state.model_version == "v1"
    # a rotation signed by a key the agent does not trust is not applied; one by the current key is
    rogue = Ed25519PrivateKey.generate()
    hub.broker.publish(rotation_topic(FLEET, 3), KeyRotation.make(FLEET, rogue, rogue.public_key(), 3), True)
    assert agent.trust.rotation_seq == 2
    _send(hub, T.model_head, model_head(artifacts_dir, manifest, "v2"), rogue)
    assert agent.state.model_version == "v1"
    newest = Ed25519PrivateKey.generate()
    hub.broker.publish(rotation_topic(FLEET, 4), KeyRotation.make(FLEET, newer, newest.public_key(), 4), True)
    assert agent.trust.rotation_seq == 4
    _send(hub, T.model_head, model_head(artifacts_dir, manifest, "v2"), newest)
    assert agent.state.model_version == "v2"


def test_a_model_signed_by_a_key_whose_rotation_comes_later_is_installed_once_it_does(
    agent: Agent, hub: Hub, hub_key: Ed25519PrivateKey, artifacts_dir: Path, manifest: Manifest,
) -> None:
    """A retained model signed by the new key may reach a (re)starting agent before the rotation vouching for it:
    it is held, and installed as soon as the rotation applies (else the device would wait forever)."""
    new = Ed25519PrivateKey.generate()
    _send(hub, T.model_full, model_full(artifacts_dir, manifest), new, retain=True)
    _send(hub, T.model_head, model_head(artifacts_dir, manifest, "v3"), new, retain=True)
    agent.start()
    assert agent.state.model_version is None and _refused(agent.config).get("unknown_key") == 2
    hub.broker.publish(rotation_topic(FLEET, 1), KeyRotation.make(FLEET, hub_key, new.public_key(), 1), True)
    assert agent.trust.rotation_seq == 1
    assert agent.state.model_version == "v3" and agent.state.backbones, "the held frames were checked again"


def test_hub_publishes_rotations_and_signs_with_the_rotated_key(tmp_path: Path) -> None:
    """``rotate_signing_key`` in a fleet folder writes a rotation the old key signed; the new key signs after it."""
    from fedge.devices.fleet import init_fleet, rotate_signing_key
    from fedge.protocol.signing import key_id, load_private_key, load_public_key, rotation_files, verify_rotation

    d = init_fleet(FLEET, tmp_path / "fleet", broker_host="127.0.0.1", port=18883, broker_user="root")  # no broker
    old = load_public_key(d.signing_pub)
    first = rotate_signing_key(d.root)
    second = rotate_signing_key(d.root)
    assert [s for s, _ in rotation_files(d.root)] == [1, 2] and first.name == "hub-key-rotation-1.bin"
    keys = {key_id(old): old}
    for _seq, payload in rotation_files(d.root):
        rot, new = verify_rotation(payload, FLEET, keys)
        keys = {rot.new_key: new}
    assert list(keys) == [key_id(load_private_key(d.signing_key))] == [key_id(load_public_key(d.signing_pub))]
    assert second.exists()


def test_any_agent_refuses_a_round_id_far_beyond_the_last_seen(
    tmp_path: Path, hub: Hub, artifacts_dir: Path, manifest: Manifest
) -> None:
    config = _config(tmp_path, None)  # no key pinned: unsigned frames are fine, the round bound still holds
    a = Agent(config, transport=InMemoryTransport(hub.broker))
    hub.send(T.model_full, model_full(artifacts_dir, manifest), retain=True)
    hub.send(T.model_head, model_head(artifacts_dir, manifest), retain=True)
    a.start()
    try:
        hub.send(T.announce, announce(manifest, MAX_ROUND_JUMP + 1))
        hub.send(T.result, _result(10**40))  # a forged result would stop every later round's training
        hub.send(T.announce, announce(manifest, 1))
        assert a.wait_round_done(1, 60)
        assert wait_until(lambda: len(hub.updates()) == 1)
        assert [u.round for u in hub.updates()] == [1]
        assert _refused(config) == {"round_too_far": 2}
    finally:
        a.stop()


def _result(round_id: int) -> Message:
    from fedge.protocol.messages import RoundResult, RoundStatus

    return RoundResult(FLEET, round_id, RoundStatus.COMPLETED, None, None, None, (), 0, 0, 0.0)
