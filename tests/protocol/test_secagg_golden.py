"""Golden vectors of SecAgg+ (tests/data/golden/secagg): stage encodings and every derivation are frozen, so a
native implementation can check itself against them and a change of fedge's bytes cannot go unnoticed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from fedge.core.secagg import (
    SHAMIR_PRIME,
    combine_secret,
    kdf,
    neighbour_graph,
    prg,
    seed_commitment,
    share_ad,
)
from fedge.protocol.secagg_wire import _KINDS, decode, encode

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "secagg"
KINDS = sorted(c.__name__ for c in _KINDS.values())


def _maker() -> Any:
    spec = importlib.util.spec_from_file_location("make_secagg_golden", GOLDEN / "make_secagg_golden.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


maker = _maker()


VECTORS = sorted(p.stem for p in GOLDEN.glob("*.bin"))


def test_one_vector_per_stage_kind() -> None:
    assert sorted(v for v in VECTORS if "_" not in v) == KINDS
    assert all(v.split("_")[0] in KINDS for v in VECTORS)  # variants: <Kind>_<what is set>


@pytest.mark.parametrize("kind", VECTORS)
def test_stage_vectors_encode_and_decode(kind: str) -> None:
    desc = json.loads((GOLDEN / f"{kind}.json").read_text())
    raw = (GOLDEN / f"{kind}.bin").read_bytes()
    assert raw[:3] == b"FSA" and raw[3] == 1 and raw[4] == desc["kind_byte"]
    assert encode(maker.from_description(desc)) == raw
    assert maker.describe(decode(raw)) == desc


def test_crypto_vectors() -> None:
    v = json.loads((GOLDEN / "crypto.json").read_text())
    k = v["kdf"]
    assert kdf(bytes.fromhex(k["shared"]), k["round_id"], k["label"], k["a"], k["b"]).hex() == k["out"]
    # the pair is unordered: both ends derive the same key
    assert kdf(bytes.fromhex(k["shared"]), k["round_id"], k["label"], k["b"], k["a"]).hex() == k["out"]
    for name in ("prg", "prg_62"):
        p = v[name]
        assert [int(x) for x in prg(bytes.fromhex(p["seed"]), p["length"], p["ring_bits"])] == p["out"]
    g = v["graph"]
    got = neighbour_graph(tuple(g["cohort"]), g["degree"], bytes.fromhex(g["seed"]))
    assert {d: list(n) for d, n in got.items()} == g["out"]
    c = v["seed_commitment"]
    assert seed_commitment(c["round_id"], c["device"], bytes.fromhex(c["seed"])).hex() == c["out"]
    a = v["share_ad"]
    assert share_ad(a["round_id"], a["sender"], a["receiver"]).hex() == a["out"]
    s = v["shamir"]
    assert int(s["prime"]) == SHAMIR_PRIME
    secret, coeffs = int(s["secret"], 16), [int(x) for x in s["coefficients"]]
    for i, share in s["shares"]:  # each share is f(i) = secret + c1*i + c2*i^2 mod p, 33 bytes big-endian
        assert int(share, 16) == (secret + coeffs[0] * i + coeffs[1] * i * i) % SHAMIR_PRIME
    shares = [(i, bytes.fromhex(h)) for i, h in s["shares"]]
    assert combine_secret(shares[1:]).hex() == s["secret"]


def test_the_generator_reproduces_the_checked_in_files(tmp_path: Path) -> None:
    maker.main(tmp_path)
    for path in GOLDEN.glob("*.*"):
        if path.suffix in (".bin", ".json"):
            assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
