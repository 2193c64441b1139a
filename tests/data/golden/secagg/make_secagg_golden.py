"""Golden vectors of the SecAgg+ stage messages and of the derivations a second implementation must match.

``<kind>.bin`` is the exact stage encoding (the bytes inside a ``secagg`` frame's ``stage["fsa"]`` array) and
``<kind>.json`` describes it: ``{"kind": "AdvertiseKeys", "fields": {...}}`` with byte strings as hex and nested
items as objects. ``crypto.json`` holds input/output pairs of every derivation (HKDF key, ChaCha20 mask PRG, the
neighbour graph, the seed commitment, the AES-GCM associated data, Shamir shares from fixed coefficients), so that
a native app can check its SecAgg+ against fedge's byte for byte.

Regenerate (only when the SecAgg wire version changes!): ``python tests/data/golden/secagg/make_secagg_golden.py``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from fedge.core.secagg import (
    _split_with,
    kdf,
    neighbour_graph,
    prg,
    seed_commitment,
    share_ad,
)
from fedge.protocol.secagg_wire import (
    _KINDS,
    _NESTED,
    AdvertiseKeys,
    KeysBroadcast,
    MaskedInput,
    PeerKeys,
    RevealedShare,
    Sealed,
    ShareKeys,
    SharesRelay,
    StageMessage,
    UnmaskRequest,
    UnmaskResponse,
    encode,
)

HERE = Path(__file__).resolve().parent
RID = "demo:7:5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e"


def _b(fill: int, n: int = 32) -> bytes:
    return bytes([fill]) * n


def stage_messages() -> list[StageMessage]:
    """One message of each kind (file ``<Kind>``), then the variants (files ``<Kind>_<variant>``)."""
    return [
        AdvertiseKeys(RID, "dev-01", _b(1), _b(2), _b(3)),
        KeysBroadcast(RID, "hub", "dev-01", (PeerKeys("dev-02", _b(4), _b(5)), PeerKeys("dev-03", _b(6), _b(7)))),
        ShareKeys(RID, "dev-01", (Sealed("dev-02", _b(8, 12 + 68 + 16)), Sealed("dev-03", _b(9, 12 + 68 + 16)))),
        SharesRelay(RID, "hub", "dev-01", (Sealed("dev-02", _b(10, 96)),)),
        MaskedInput(RID, "dev-01", 32, bytes(range(16))),
        UnmaskRequest(RID, "hub", "dev-01", ("dev-02",), ("dev-03",)),
        UnmaskResponse(RID, "dev-01", (RevealedShare("dev-02", 1, _b(11, 33)),),
                       (RevealedShare("dev-03", 2, _b(12, 33)),)),
    ]


def variants() -> dict[str, StageMessage]:
    """Messages whose optional trailing fields are set: a masked input that left out a neighbour whose share bundle
    did not open (PROTOCOL.md §9, "Dropouts")."""
    return {"MaskedInput_rejected": MaskedInput(RID, "dev-01", 32, bytes(range(16)), ("dev-03",))}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return value


def describe(msg: StageMessage) -> dict[str, Any]:
    """The message as JSON; optional trailing fields only when set (as the encoding writes them)."""
    plain = _plain(msg)
    names = [f.name for f in fields(msg)]
    for name in names[len(names) - int(getattr(msg, "OPTIONAL", 0)):]:
        if not getattr(msg, name):
            del plain[name]
    return {"kind": type(msg).__name__, "kind_byte": msg.KIND, "fields": plain}


def from_description(desc: dict[str, Any]) -> StageMessage:
    cls = next(c for c in _KINDS.values() if c.__name__ == desc["kind"])

    def build(c: type[Any], raw: dict[str, Any]) -> Any:
        out = []
        for f, code in zip(fields(c), c.SCHEMA, strict=True):
            if f.name not in raw:  # an optional trailing field left out
                break
            v = raw[f.name]
            if code == "b":
                out.append(bytes.fromhex(v))
            elif code == "S":
                out.append(tuple(v))
            elif code in _NESTED:
                out.append(tuple(build(_NESTED[code], item) for item in v))
            else:
                out.append(v)
        return c(*out)

    msg: StageMessage = build(cls, desc["fields"])
    return msg


def crypto_vectors() -> dict[str, Any]:
    cohort = tuple(f"dev-{i:02d}" for i in range(8))
    seed = _b(0x5E)
    coeffs = [int.from_bytes(_b(0x21), "big"), int.from_bytes(_b(0x42), "big")]
    return {
        "kdf": {"shared": _b(0x33).hex(), "round_id": RID, "label": "mask", "a": "dev-02", "b": "dev-01",
                "out": kdf(_b(0x33), RID, "mask", "dev-02", "dev-01").hex()},
        "prg": {"seed": _b(0x44).hex(), "length": 8, "ring_bits": 32,
                "out": [int(v) for v in prg(_b(0x44), 8, 32)]},
        "prg_62": {"seed": _b(0x44).hex(), "length": 4, "ring_bits": 62,
                   "out": [int(v) for v in prg(_b(0x44), 4, 62)]},
        "graph": {"cohort": list(cohort), "degree": 4, "seed": seed.hex(),
                  "out": {d: list(n) for d, n in neighbour_graph(cohort, 4, seed).items()}},
        "seed_commitment": {"round_id": RID, "device": "dev-01", "seed": _b(0x55).hex(),
                            "out": seed_commitment(RID, "dev-01", _b(0x55)).hex()},
        "share_ad": {"round_id": RID, "sender": "dev-01", "receiver": "dev-02",
                     "out": share_ad(RID, "dev-01", "dev-02").hex()},
        "shamir": {"prime": str(2**256 + 297), "secret": _b(0x66).hex(), "coefficients": [str(c) for c in coeffs],
                   "shares": [[i, v.hex()] for i, v in _split_with(int.from_bytes(_b(0x66), "big"), coeffs, 4)]},
    }


def main(out: Path = HERE) -> None:
    for name, msg in [*((type(m).__name__, m) for m in stage_messages()), *variants().items()]:
        (out / f"{name}.bin").write_bytes(encode(msg))
        (out / f"{name}.json").write_text(json.dumps(describe(msg), indent=2, sort_keys=True) + "\n")
    (out / "crypto.json").write_text(json.dumps(crypto_vectors(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(stage_messages())} stage vectors and crypto.json to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
