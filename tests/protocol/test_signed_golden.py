"""The signed-frame golden vector (tests/data/golden/signed/, PROTOCOL.md "Signatures") stays reproducible."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedge.protocol.codec import decode
from fedge.protocol.messages import ModelHead
from fedge.protocol.signing import verify_frame

SIGNED = Path(__file__).resolve().parents[1] / "data" / "golden" / "signed"


def test_the_signed_vector_is_reproduced_verifies_and_decodes_as_the_unsigned_one(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_signed", SIGNED / "make_signed.py")
    assert spec is not None and spec.loader is not None
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    maker.write(tmp_path)
    for name in ("model_head.bin", "model_head.json"):
        assert (tmp_path / name).read_bytes() == (SIGNED / name).read_bytes(), name
    desc = json.loads((SIGNED / "model_head.json").read_text())
    frame = (SIGNED / "model_head.bin").read_bytes()
    pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(desc["public_key"]))
    assert verify_frame(frame, desc["fleet"], desc["topic"], {desc["key_id"]: pub}) == desc["key_id"]
    signed, plain = decode(frame), decode((SIGNED / desc["unsigned"]).read_bytes())
    assert isinstance(signed, ModelHead) and isinstance(plain, ModelHead)
    assert (signed.version, signed.nonce, list(signed.head)) == (plain.version, plain.nonce, list(plain.head))
