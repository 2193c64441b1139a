"""Ed25519 signatures on the hub's frames (PROTOCOL.md, "Signatures").

A signed frame is an ordinary frame whose header names the signing key (``"sig_key"``: the key id, 32 hex
characters of the sha256 of the raw 32-byte public key) followed by a 64-byte **trailer**: the Ed25519
signature of ``sha256(DOMAIN || u32 len(fleet) || fleet || u32 len(topic) || topic || frame)``, where
``frame`` is every byte before the trailer (magic, version byte, header with ``sig_key``, data section). A
signature therefore covers the message's bytes, its fleet, the exact topic it was published on and the
protocol version: it cannot be moved to another fleet, topic or version. Receivers that do not verify
ignore the unknown header field and the trailing bytes; the codec keeps arrays out of the trailer.

``cryptography`` is imported lazily: only a hub with ``signing_key`` or an agent with ``hub_public_key``
needs it.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fedge.protocol.codec import MAGIC, PREFIX_LEN, SIG_FIELD, SIGNATURE_BYTES, frame_header
from fedge.protocol.errors import FedgeError, SignatureError
from fedge.protocol.topics import Topics

DOMAIN: Final = b"fedge-signature-v1\0"
ROTATION_DOMAIN: Final = b"fedge-key-rotation-v1\0"
_KEY_ID: Final = re.compile(r"^[0-9a-f]{32}$")

__all__ = [
    "DOMAIN", "ROTATION_DOMAIN", "ROTATION_FILE", "HubSigner", "KeyRotation", "SignatureError", "key_id",
    "load_private_key", "load_public_key", "public_key_from_raw", "raw_public_key", "rotation_files", "rotation_filter",
    "rotation_topic", "signed_digest", "verify_frame", "verify_rotation",
]


def rotation_topic(fleet: str, seq: int) -> str:
    """Where the hub keeps key rotation ``seq`` (retained): ``fedge/<fleet>/hub/key/<seq>``."""
    return f"{Topics(fleet).base}/hub/key/{int(seq)}"


def rotation_filter(fleet: str) -> str:
    return f"{Topics(fleet).base}/hub/key/+"


ROTATION_FILE: Final = re.compile(r"^hub-key-rotation-([1-9][0-9]{0,8})\.bin$")
"""Rotation files beside the hub's signing key (written by ``devices.fleet.rotate_signing_key``)."""


def rotation_files(folder: Path) -> list[tuple[int, bytes]]:
    """Every key rotation file in ``folder``: (seq, payload), in sequence order."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := ROTATION_FILE.match(p.name))]
    return [(seq, p.read_bytes()) for seq, p in sorted(found)]


def rotations_up_to(files: list[tuple[int, bytes]], key: str) -> list[tuple[int, bytes]]:
    """The rotations of ``files`` (``rotation_files``) up to the one that introduced ``key``, the key in use:
    a rotation to a key the signer does not hold yet (written while it runs) must not be published, or devices
    would retire the key it still signs with. None if ``key`` was never rotated to (the first key)."""
    for i, (_seq, payload) in enumerate(files):
        try:
            body = json.loads(payload[:-SIGNATURE_BYTES].decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(body, dict) and body.get("new_key") == key:
            return files[: i + 1]
    return []


def _lp(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def signed_digest(fleet: str, topic: str, frame: bytes | memoryview) -> bytes:
    """The 32 bytes a hub signs for ``frame`` (everything before the trailer) published on ``topic``."""
    h = hashlib.sha256(DOMAIN)
    h.update(_lp(fleet.encode()))
    h.update(_lp(topic.encode()))
    h.update(frame)
    return h.digest()


def raw_public_key(key: Any) -> bytes:
    """The 32 raw bytes of an Ed25519 public (or private: its public half) key."""
    from cryptography.hazmat.primitives import serialization

    pub = key.public_key() if hasattr(key, "private_bytes") else key
    raw: bytes = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw


def key_id(key: Any) -> str:
    """A key's id: the first 32 hex characters of the sha256 of its raw public key."""
    return hashlib.sha256(raw_public_key(key)).hexdigest()[:32]


def public_key_from_raw(raw: bytes) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if len(raw) != 32:
        raise SignatureError("malformed", f"an Ed25519 public key has 32 bytes, not {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_private_key(path: str | Path) -> Any:
    """The hub's Ed25519 private key from a PEM (PKCS#8) file; FedgeError naming the file otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise FedgeError(f"{path}: not a readable unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise FedgeError(f"{path}: not an Ed25519 key")
    return key


def load_public_key(path: str | Path) -> Any:
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) file; FedgeError naming the file otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise FedgeError(f"{path}: not a readable PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise FedgeError(f"{path}: not an Ed25519 key")
    return key


class HubSigner:
    """Signs frames with the hub's private key: ``sign(frame, topic)`` returns the signed frame."""

    def __init__(self, private_key: Any, fleet: str) -> None:
        self._key = private_key
        self.fleet = fleet
        self.key_id = key_id(private_key)

    def sign(self, frame: bytes, topic: str) -> bytes:
        """``frame`` (unsigned, as ``codec.encode`` wrote it) with ``sig_key`` in its header and the trailer."""
        header, data = frame_header(frame, max_bytes=max(len(frame), 1))  # the caller bounded the size
        header[SIG_FIELD] = self.key_id
        text = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
        text += b" " * ((-(PREFIX_LEN + len(text))) % 8)
        body = b"".join([MAGIC, frame[3:4], struct.pack("<I", len(text)), text, data])
        signature: bytes = self._key.sign(signed_digest(self.fleet, topic, body))
        return body + signature


def verify_frame(payload: bytes, fleet: str, topic: str, keys: dict[str, Any]) -> str:
    """Check a signed frame against the trusted ``keys`` (key id -> public key); returns the key id that
    signed it. Raises :class:`SignatureError` (unsigned, unknown key, bad signature)."""
    from cryptography.exceptions import InvalidSignature

    try:
        header, _ = frame_header(payload, max_bytes=max(len(payload), 1))  # the topic's own limit applied first
    except FedgeError as exc:
        raise SignatureError("malformed", str(exc)) from exc
    kid = header.get(SIG_FIELD)
    if kid is None:
        raise SignatureError("unsigned", "the frame carries no signature")
    if not isinstance(kid, str) or not _KEY_ID.match(kid):
        raise SignatureError("malformed", f"{SIG_FIELD} {kid!r} is not a key id")
    if kid not in keys:
        raise SignatureError("unknown_key", f"signed by key {kid}, not the pinned hub key")
    if len(payload) < PREFIX_LEN + SIGNATURE_BYTES:
        raise SignatureError("malformed", "frame too short for a signature")
    body = memoryview(payload)[: len(payload) - SIGNATURE_BYTES]
    try:
        keys[kid].verify(bytes(payload[-SIGNATURE_BYTES:]), signed_digest(fleet, topic, body))
    except InvalidSignature:
        raise SignatureError("bad_signature", f"the signature by key {kid} does not match "
                             "these bytes, fleet and topic") from None
    return kid


@dataclass(frozen=True)
class KeyRotation:
    """A hub key rotation (topic ``hub/key``, retained): the new public key, signed by the old key.

    Body: UTF-8 JSON ``{"fleet", "old_key", "new_key", "new_public", "seq"}`` (sorted keys, compact;
    ``new_public`` = the new raw public key in hex, ``seq`` = the rotation's number, 1 for the first),
    then the 64-byte Ed25519 signature by the old key of ``sha256(ROTATION_DOMAIN || body)``."""

    fleet: str
    old_key: str
    new_key: str
    new_public: bytes
    seq: int

    def body(self) -> bytes:
        obj = {"fleet": self.fleet, "old_key": self.old_key, "new_key": self.new_key,
               "new_public": self.new_public.hex(), "seq": self.seq}
        return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def make(cls, fleet: str, old_private: Any, new_public: Any, seq: int) -> bytes:
        """The signed rotation payload: ``old_private`` vouches for ``new_public``."""
        rot = cls(fleet, key_id(old_private), key_id(new_public), raw_public_key(new_public), seq)
        body = rot.body()
        signature: bytes = old_private.sign(hashlib.sha256(ROTATION_DOMAIN + body).digest())
        return body + signature


def verify_rotation(payload: bytes, fleet: str, keys: dict[str, Any]) -> tuple[KeyRotation, Any]:
    """Check a rotation payload against the trusted ``keys``; returns it and the new public key object."""
    from cryptography.exceptions import InvalidSignature

    from fedge.protocol.codec import loads_strict

    if len(payload) <= SIGNATURE_BYTES:
        raise SignatureError("malformed", "key rotation too short")
    body, sig = payload[:-SIGNATURE_BYTES], payload[-SIGNATURE_BYTES:]
    try:
        obj = loads_strict(body.decode("utf-8"))
        rot = KeyRotation(str(obj["fleet"]), str(obj["old_key"]), str(obj["new_key"]),
                          bytes.fromhex(str(obj["new_public"])), int(obj["seq"]))
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SignatureError("malformed", f"key rotation body: {exc}") from exc
    if rot.body() != body:
        raise SignatureError("malformed", "key rotation body is not in canonical form")
    if rot.fleet != fleet:
        raise SignatureError("malformed", f"key rotation for fleet {rot.fleet!r}")
    if rot.old_key not in keys:
        raise SignatureError("unknown_key", f"key rotation signed by key {rot.old_key}, not a trusted one")
    try:
        keys[rot.old_key].verify(sig, hashlib.sha256(ROTATION_DOMAIN + body).digest())
    except InvalidSignature:
        raise SignatureError("bad_signature", "key rotation signature does not match") from None
    new = public_key_from_raw(rot.new_public)
    if key_id(new) != rot.new_key:
        raise SignatureError("malformed", "key rotation: new_key is not the id of new_public")
    return rot, new
