"""Rejects go only to the sender (issue 12, item 4): an update whose body names another device than its topic is
answered on the topic's device and counted against it, never against the device it names."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.core.validate import Rejection, UpdateContext, validate_update
from fedge.protocol.codec import encode
from fedge.protocol.messages import ModelUpdate, Reject, RejectReason, RoundAnnounce
from tests.hub.fleet import FLEET, SHAPES, hub_config, run_hub, zero_delta

SPEC = {k: (s, "float32") for k, s in SHAPES.items()}
CTX = UpdateContext(FLEET, frozenset({"a", "b"}), 3, "v0", frozenset({"a", "b"}), {}, SPEC, 1 << 20)


def _update(rnd: int, **over: Any) -> bytes:
    kwargs: dict[str, Any] = {"fleet": FLEET, "round": rnd, "device": "b", "model_version": "v0", "n_samples": 10,
                              "delta": zero_delta(SHAPES)}
    kwargs.update(over)
    return encode(ModelUpdate(**kwargs))


# bodies that name device "b" and are wrong in some other way too
NAMING_B: list[tuple[str, Callable[[int], bytes]]] = [  # each given the open round
    ("other fleet", lambda r: _update(r, fleet="elsewhere")),
    ("same fleet", lambda r: _update(r)),
    ("other fleet, bad delta", lambda r: _update(r, fleet="elsewhere", delta={"h0_bias": np.zeros(2, np.float32)})),
    ("other fleet, other round", lambda r: _update(r + 98, fleet="elsewhere", n_samples=0)),
]


@pytest.mark.parametrize(("label", "payload"), NAMING_B, ids=[n for n, _ in NAMING_B])
def test_validation_addresses_every_rejection_to_the_topic_device(label: str, payload: Callable[[int], bytes]) -> None:
    verdict = validate_update("a", payload(3), CTX)
    assert isinstance(verdict, Rejection), label
    assert verdict.device == "a"
    nobody = validate_update(None, payload(3), CTX)  # a topic without a valid device: the reject goes nowhere
    assert isinstance(nobody, Rejection) and nobody.device is None


@pytest.mark.parametrize(("label", "payload"), NAMING_B, ids=[n for n, _ in NAMING_B])
def test_a_body_naming_another_device_is_rejected_to_the_sender_only(
        tmp_path: Path, artifacts: Path, label: str, payload: Callable[[int], bytes]) -> None:
    for fleet in run_hub(hub_config(tmp_path / "state", artifacts, devices=["a", "b"])):
        rnd = fleet.start_round()
        assert isinstance(rnd, RoundAnnounce) and rnd.round == 1
        fleet.device("a").send(payload(rnd.round))
        assert [type(m) for m in fleet.device("b").inbox] == [], label
        [rej] = fleet.device("a").inbox
        assert isinstance(rej, Reject) and rej.device == "a" and rej.reason is not RejectReason.DUPLICATE
        with sqlite3.connect(fleet.cfg.state_dir / "hub.sqlite") as db:
            assert db.execute("SELECT device FROM rejects").fetchall() == [("a",)]
        fleet.device("b").update(rnd, zero_delta(SHAPES))  # b is unaffected: its own update is accepted
        assert [type(m).__name__ for m in fleet.device("b").inbox] == ["Ack"]
