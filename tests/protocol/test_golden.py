"""Golden vectors in tests/data/golden: the bytes of every message type are frozen."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.protocol.codec import decode, encode
from fedge.protocol.messages import MessageType

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"


def _maker() -> Any:
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_golden = _maker()
# one vector per message type, plus the messages that reuse a type on topics of their own (selection rounds)
KINDS = sorted([*(str(t) for t in MessageType), *make_golden.golden_variants()])


def test_there_is_one_vector_per_message_type() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.bin")) == KINDS
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_encoding_the_json_description_gives_the_golden_bytes(kind: str) -> None:
    desc = json.loads((GOLDEN / f"{kind}.json").read_text())
    assert encode(make_golden.from_description(desc)) == (GOLDEN / f"{kind}.bin").read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_the_golden_bytes_gives_the_json_description(kind: str) -> None:
    desc = json.loads((GOLDEN / f"{kind}.json").read_text())
    msg = decode((GOLDEN / f"{kind}.bin").read_bytes())
    assert make_golden.describe(msg) == desc
    for a in desc["arrays"]:  # and the arrays carry exactly the listed values
        got = getattr(msg, desc["arrays_field"])[a["name"]]
        assert got.tolist() == np.array(a["data"]).reshape(a["shape"]).tolist()


def test_the_generator_reproduces_the_checked_in_files(tmp_path: Path) -> None:
    make_golden.main(tmp_path)
    for path in GOLDEN.glob("*.*"):
        if path.suffix in (".bin", ".json"):
            assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
