"""Golden vector of a signed frame (PROTOCOL.md, "Signatures"): ``../model_head.bin`` signed by a fixed test key.

``model_head.bin`` here is the signed frame published on ``fedge/demo/model/head``; ``model_head.json`` gives the
private key's 32-byte seed (a test key: never use it), the public key, the key id, the topic, the SHA-256 digest
that is signed and the signature, all in hex. Ed25519 is deterministic, so another implementation reproduces the
bytes exactly. Regenerate (only when the protocol changes): ``python tests/data/golden/signed/make_signed.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.protocol.codec import SIGNATURE_BYTES
from fedge.protocol.signing import HubSigner, key_id, raw_public_key, signed_digest
from fedge.protocol.topics import Topics

HERE = Path(__file__).resolve().parent
SEED = bytes(range(32))
FLEET = "demo"
TOPIC = Topics(FLEET).model_head


def signed_vector() -> tuple[bytes, dict[str, Any]]:
    key = Ed25519PrivateKey.from_private_bytes(SEED)
    frame = HubSigner(key, FLEET).sign((HERE.parent / "model_head.bin").read_bytes(), TOPIC)
    body = frame[:-SIGNATURE_BYTES]
    desc = {"unsigned": "../model_head.bin", "fleet": FLEET, "topic": TOPIC, "seed": SEED.hex(),
            "public_key": raw_public_key(key).hex(), "key_id": key_id(key),
            "digest": signed_digest(FLEET, TOPIC, body).hex(), "signature": frame[-SIGNATURE_BYTES:].hex(),
            "header_length": int.from_bytes(frame[4:8], "little"), "size": len(frame)}
    return frame, desc


def write(folder: Path) -> None:
    frame, desc = signed_vector()
    (folder / "model_head.bin").write_bytes(frame)
    (folder / "model_head.json").write_text(json.dumps(desc, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
