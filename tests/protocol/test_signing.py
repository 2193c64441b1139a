"""Ed25519 signatures on hub frames (protocol/signing.py, PROTOCOL.md "Signatures")."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.protocol.codec import SIGNATURE_BYTES, decode, encode
from fedge.protocol.messages import ModelHead, RoundAnnounce
from fedge.protocol.signing import (
    HubSigner,
    KeyRotation,
    SignatureError,
    key_id,
    verify_frame,
    verify_rotation,
)
from fedge.protocol.topics import Topics

T = Topics("demo")


def _head(version: str = "v3") -> ModelHead:
    return ModelHead("demo", version, "v2", "ab" * 32, 3,
                     {"h0_kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "h0_bias": np.ones(3, np.float32)})


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _trust(k: Ed25519PrivateKey) -> dict[str, object]:
    return {key_id(k): k.public_key()}


def test_signed_frame_verifies_and_still_decodes_to_the_same_message(key: Ed25519PrivateKey) -> None:
    msg = _head()
    signed = HubSigner(key, "demo").sign(encode(msg), T.model_head)
    assert verify_frame(signed, "demo", T.model_head, _trust(key)) == key_id(key)
    back = decode(signed)
    assert isinstance(back, ModelHead) and back.version == "v3" and back.nonce == msg.nonce
    for name, arr in msg.head.items():
        np.testing.assert_array_equal(back.head[name], arr)


def test_frames_above_the_default_decode_limit_are_signed_and_verified(key: Ed25519PrivateKey) -> None:
    big = ModelHead("demo", "v3", "v2", "ab" * 32, 3, {"h0_kernel": np.zeros((17, 1 << 20), np.float32)})  # 68 MiB
    frame = encode(big)
    assert len(frame) > 64 << 20
    signed = HubSigner(key, "demo").sign(frame, T.model_head)
    assert verify_frame(signed, "demo", T.model_head, _trust(key)) == key_id(key)


def test_tampered_bytes_are_refused(key: Ed25519PrivateKey) -> None:
    signed = bytearray(HubSigner(key, "demo").sign(encode(_head()), T.model_head))
    signed[-SIGNATURE_BYTES - 1] ^= 1  # one bit of the head's data section
    with pytest.raises(SignatureError) as err:
        verify_frame(bytes(signed), "demo", T.model_head, _trust(key))
    assert err.value.reason == "bad_signature"


def test_another_key_is_refused(key: Ed25519PrivateKey) -> None:
    rogue = Ed25519PrivateKey.generate()
    signed = HubSigner(rogue, "demo").sign(encode(_head()), T.model_head)
    with pytest.raises(SignatureError) as err:
        verify_frame(signed, "demo", T.model_head, _trust(key))
    assert err.value.reason == "unknown_key"


def test_a_rogue_key_claiming_the_pinned_key_id_is_refused(key: Ed25519PrivateKey) -> None:
    rogue = Ed25519PrivateKey.generate()
    signer = HubSigner(rogue, "demo")
    signer.key_id = key_id(key)  # claims to be the hub's key
    signed = signer.sign(encode(_head()), T.model_head)
    with pytest.raises(SignatureError) as err:
        verify_frame(signed, "demo", T.model_head, _trust(key))
    assert err.value.reason == "bad_signature"


def test_signature_cannot_move_to_another_topic_or_fleet(key: Ed25519PrivateKey) -> None:
    ann = RoundAnnounce("demo", 4, "v3", "ab" * 32, 1795545600.0, 1, ("d1",), 1, 0.1)
    signed = HubSigner(key, "demo").sign(encode(ann), T.announce)
    verify_frame(signed, "demo", T.announce, _trust(key))
    with pytest.raises(SignatureError):
        verify_frame(signed, "demo", T.select_announce, _trust(key))
    with pytest.raises(SignatureError):
        verify_frame(signed, "other", Topics("other").announce, _trust(key))


def test_unsigned_frame_is_refused_when_a_key_is_pinned(key: Ed25519PrivateKey) -> None:
    with pytest.raises(SignatureError) as err:
        verify_frame(encode(_head()), "demo", T.model_head, _trust(key))
    assert err.value.reason == "unsigned"


def test_signature_stripped_and_header_kept_is_refused(key: Ed25519PrivateKey) -> None:
    signed = HubSigner(key, "demo").sign(encode(_head()), T.model_head)
    with pytest.raises(SignatureError):
        verify_frame(signed[:-SIGNATURE_BYTES], "demo", T.model_head, _trust(key))


def test_key_rotation_is_accepted_only_when_signed_by_a_trusted_key(key: Ed25519PrivateKey) -> None:
    new = Ed25519PrivateKey.generate()
    payload = KeyRotation.make("demo", key, new.public_key(), 1)
    rot, pub = verify_rotation(payload, "demo", _trust(key))
    assert rot.seq == 1 and rot.new_key == key_id(new) and key_id(pub) == key_id(new)
    rogue = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError):
        verify_rotation(KeyRotation.make("demo", rogue, rogue.public_key(), 1), "demo", _trust(key))
    forged = bytearray(payload)
    forged[5] ^= 1
    with pytest.raises(SignatureError):
        verify_rotation(bytes(forged), "demo", _trust(key))
    with pytest.raises(SignatureError):
        verify_rotation(payload, "other", _trust(key))


def test_a_hub_publishes_only_the_rotations_up_to_the_key_it_signs_with(key: Ed25519PrivateKey) -> None:
    """A rotation written while the hub runs (to a key it does not hold yet) is not published: devices would
    retire the key it still signs with."""
    from fedge.protocol.signing import rotations_up_to

    k1, k2 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    files = [(1, KeyRotation.make("demo", key, k1.public_key(), 1)),
             (2, KeyRotation.make("demo", k1, k2.public_key(), 2))]
    assert rotations_up_to(files, key_id(key)) == []
    assert rotations_up_to(files, key_id(k1)) == files[:1]
    assert rotations_up_to(files, key_id(k2)) == files
