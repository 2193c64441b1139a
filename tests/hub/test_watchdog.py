"""The hub notices and counts frames on its own broadcast topics that it did not publish (issue 11 item 7)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.hub.config import HubConfig
from fedge.protocol.codec import decode, encode
from fedge.protocol.messages import ModelHead, RoundAnnounce
from fedge.protocol.signing import HubSigner, KeyRotation
from fedge.protocol.transport import InMemoryBroker, InMemoryTransport
from tests.hub.fleet import FLEET, SHAPES, TOPICS, Fleet, hub_config, zero_delta


def _write_key(path: Path, key: Ed25519PrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _impersonations(fleet: Fleet) -> int:
    return fleet.hub.store.reject_counts().get("impersonation", 0)


def _forged_head(fleet: Fleet, version: str = "v99") -> bytes:
    genuine = decode(fleet.broker.retained[TOPICS.model_head])
    assert isinstance(genuine, ModelHead)
    return encode(replace(genuine, version=version))


def _run_a_round(fleet: Fleet) -> None:
    for name in ("a", "b"):
        fleet.device(name).hello()
    rnd = fleet.start_round()
    for name in ("a", "b"):
        fleet.device(name).update(rnd, zero_delta(SHAPES, 0.01))
    fleet.advance(1)
    assert fleet.results and fleet.results[-1].round == rnd.round


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return _write_key(tmp_path / "hub-signing.key", Ed25519PrivateKey.generate())


@pytest.mark.parametrize("signed", [False, True])
def test_the_hub_ignores_its_own_frames_and_clears(tmp_path: Path, artifacts: Path, key_file: Path,
                                                   signed: bool) -> None:
    cfg = hub_config(tmp_path / "state", artifacts, **({"signing_key": str(key_file)} if signed else {}))
    broker = InMemoryBroker()
    first = Fleet(cfg, broker)
    first.hub.start()
    _run_a_round(first)  # announce, result, new head, announce cleared
    assert _impersonations(first) == 0
    first.hub.stop()
    again = Fleet(cfg, broker)  # the broker still holds the first run's retained frames
    again.hub.start()
    _run_a_round(again)
    assert _impersonations(again) == 0
    again.hub.stop()


@pytest.mark.parametrize("signed", [False, True])
def test_rogue_frames_on_hub_topics_are_counted_and_the_hub_carries_on(tmp_path: Path, artifacts: Path,
                                                                       key_file: Path, signed: bool) -> None:
    cfg = hub_config(tmp_path / "state", artifacts, **({"signing_key": str(key_file)} if signed else {}))
    fleet = Fleet(cfg)
    fleet.hub.start()
    rogue = InMemoryTransport(fleet.broker)
    forged = _forged_head(fleet)
    rogue.publish(TOPICS.model_head, forged, retain=True)
    assert _impersonations(fleet) == 1
    rogue.publish(TOPICS.model_head, forged, retain=True)  # the same bytes again: reported once
    assert _impersonations(fleet) == 1
    rogue_signer = HubSigner(Ed25519PrivateKey.generate(), FLEET)  # a key the hub does not hold
    rogue.publish(TOPICS.model_head, rogue_signer.sign(_forged_head(fleet, "v100"), TOPICS.model_head), retain=True)
    assert _impersonations(fleet) == 2
    _run_a_round(fleet)  # the hub republishes model/head: its own frame, not counted
    assert _impersonations(fleet) == 2
    ann = fleet.results[-1]
    forged_announce = RoundAnnounce(fleet=FLEET, round=ann.round + 1, model_version="v1", backbone_sha256="0" * 64,
                                    deadline=2e9, min_devices=1, selected=("a",), local_epochs=500, lr=10.0)
    rogue.publish(TOPICS.announce, encode(forged_announce), retain=True)
    candidate = _forged_head(fleet, "v7")
    rogue.publish(TOPICS.model_head, b"", retain=True)  # wiping the hub's retained head
    # a topic the hub has not published on: only a signing hub can tell (unsigned, nothing to compare with)
    rogue.publish(TOPICS.candidate("evil"), candidate, retain=True)
    assert _impersonations(fleet) == (5 if signed else 4)
    details = fleet.hub.store._all("SELECT device, detail FROM rejects WHERE reason = 'impersonation'")
    assert {d for d, _ in details} == {TOPICS.model_head, TOPICS.announce} | ({TOPICS.candidate("evil")} if signed
                                                                            else set())
    if signed:
        assert any("unknown_key" in detail for _, detail in details)
    _run_a_round(fleet)  # the hub survives and still runs rounds
    fleet.hub.stop()


def test_a_frame_of_a_retired_hub_key_is_stale_until_the_hub_has_published(tmp_path: Path, artifacts: Path) -> None:
    old_key, new_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys = tmp_path / "keys"
    keys.mkdir()
    key_file = _write_key(keys / "hub-signing.key", old_key)
    cfg: HubConfig = hub_config(tmp_path / "state", artifacts, signing_key=str(key_file))
    broker = InMemoryBroker()
    first = Fleet(cfg, broker)
    first.hub.start()
    old_head = broker.retained[TOPICS.model_head]  # signed by the old key
    first.hub.stop()
    (keys / "hub-key-rotation-1.bin").write_bytes(KeyRotation.make(FLEET, old_key, new_key.public_key(), 1))
    _write_key(key_file, new_key)
    rotated = Fleet(cfg, broker)
    rotated.hub.start()
    assert _impersonations(rotated) == 0  # its own retained head from before the rotation
    InMemoryTransport(broker).publish(TOPICS.model_head, old_head, retain=True)  # replayed after the rotation
    assert _impersonations(rotated) == 1
    rotated.hub.stop()
