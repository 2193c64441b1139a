"""Signed hub messages end to end (issue 11, item 2): a hub process with ``signing_key``, agent processes with
``hub_public_key``, over mosquitto. A rogue client with write access to the fleet's topics publishes a forged
model_head (unsigned, and signed by its own key), a forged announce, and a replay of an older genuine signed
head: every agent refuses each one with a reason in its log, keeps its model, and the next genuine round
completes; the hub counts the frames it did not sign as ``impersonation`` rejects in ``fedge hub status``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.hub.mosquitto import Mosquitto
from fedge.protocol.codec import decode, encode
from fedge.protocol.manifest import load_manifest
from fedge.protocol.messages import ModelHead, RoundAnnounce, RoundStatus
from fedge.protocol.signing import HubSigner, KeyRotation, key_id, load_private_key
from tests.e2e.fleet import FLEET, Fleet
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e


def _write_keys(root: Path) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    priv, pub = root / "hub-signing.key", root / "hub-signing.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def test_forged_and_replayed_hub_messages_are_refused_by_every_agent(
        tmp_path: Path, make_fleet: Callable[..., Fleet], mosquitto: Mosquitto) -> None:
    fleet = make_fleet(mosquitto.url, n_agents=2)
    priv, pub = _write_keys(tmp_path)
    fleet.write_hub_toml(signing_key=str(priv), rounds={"local_epochs": 1, "deadline_s": 120.0})  # type: ignore[arg-type]
    for dev in fleet.devices:
        fleet.set_agent_config(dev, hub_public_key=str(pub))
    fleet.start_hub()
    heads: list[bytes] = []  # the genuine signed model/head frames, raw
    lock = threading.Lock()

    def keep(_topic: str, payload: bytes) -> None:
        if payload:
            with lock:
                heads.append(payload)

    rogue = fleet.transport("rogue")
    rogue.subscribe(fleet.topics.model_head, keep)
    assert wait_until(lambda: bool(heads), 30)
    v0_frame = heads[0]
    v0 = decode(v0_frame)
    assert isinstance(v0, ModelHead) and v0.version == "v0"

    fleet.start_agents(ready=True)
    fleet.start_round()
    (first,) = fleet.wait_results([1], timeout_s=120)
    assert first.status == RoundStatus.COMPLETED and first.model_version == "v1", first
    fleet.wait_for(lambda s: all(s.models.get(d) == "v1" for d in fleet.devices), 60, "agents on v1")

    manifest = load_manifest(fleet.data.artifacts)
    evil = {name: np.full(arr.shape, 7.0, np.float32) for name, arr in v0.head.items()}
    forged = ModelHead(FLEET, "v99", "v1", manifest.backbone_sha256, 1, evil)
    attacker_key = Ed25519PrivateKey.generate()
    t = fleet.topics
    announce = RoundAnnounce(FLEET, 2, "v1", manifest.backbone_sha256, time.time() + 60, 1,
                             tuple(fleet.devices), 50, 1e9)
    rogue.publish(t.model_head, encode(forged), qos=1, retain=True)  # unsigned
    rogue.publish(t.model_head, HubSigner(attacker_key, FLEET).sign(encode(forged), t.model_head), qos=1, retain=True)
    rogue.publish(t.announce, encode(announce), qos=1, retain=True)  # unsigned
    rogue.publish(t.model_head, v0_frame, qos=1, retain=True)  # the hub's own v0, replayed after v1

    def refused(dev: str) -> set[str]:
        text = (fleet.logs / f"{dev}.log").read_text(errors="replace")
        return {r for r in ("unsigned", "unknown_key", "replayed") if f"refused a message on {t.model_head}: {r}"
                in text} | ({"announce"} if f"refused a message on {t.announce}: unsigned" in text else set())

    want = {"unsigned", "unknown_key", "replayed", "announce"}
    assert wait_until(lambda: all(refused(d) == want for d in fleet.devices), 60), \
        {d: refused(d) for d in fleet.devices}
    with fleet.cond:
        assert all(fleet.seen.models.get(d) == "v1" for d in fleet.devices), fleet.seen.models

    def impersonations() -> int:  # the hub noticed the frames it did not sign (the v0 replay is its own signature)
        return int(json.loads(fleet.hub_cli("hub", "status").stdout)["rejects"].get("impersonation", 0))

    assert wait_until(lambda: impersonations() == 3, 60), impersonations()

    fleet.start_round()  # the hub's own round 2: every agent still on v1, none tricked into a fake round 2
    (second,) = fleet.wait_results([2], timeout_s=120)
    assert second.status == RoundStatus.COMPLETED and sorted(second.devices) == fleet.devices, second
    assert second.model_version == "v2" and second.rejected == 0
    fleet.wait_for(lambda s: all(s.models.get(d) == "v2" for d in fleet.devices), 60, "agents on v2")

    # key rotation: the old key vouches for a new one; the hub restarts on the new key and publishes the rotation
    new_key = Ed25519PrivateKey.generate()
    (tmp_path / "hub-key-rotation-1.bin").write_bytes(
        KeyRotation.make(FLEET, load_private_key(priv), new_key.public_key(), 1))
    priv.write_bytes(new_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    fleet.hub.stop()
    fleet.start_hub()
    assert wait_until(lambda: all(f"hub signing key rotated to {key_id(new_key)}"
                                  in (fleet.logs / f"{d}.log").read_text(errors="replace") for d in fleet.devices), 60)
    fleet.start_round()
    (third,) = fleet.wait_results([3], timeout_s=120)
    assert third.status == RoundStatus.COMPLETED and sorted(third.devices) == fleet.devices, third
    assert impersonations() == 3  # its own frames retained under the retired key were not counted on restart
