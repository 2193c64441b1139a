"""Golden vectors: one frame per message type, from fixed field values (fixed nonce and ts).

For each type ``<type>.bin`` is the exact frame and ``<type>.json`` describes the same message in
plain JSON, so that another implementation (Kotlin, Swift, ...) can check both its encoder (build the
message from the .json, compare bytes with the .bin) and its decoder (decode the .bin, compare with
the .json)::

    {"type": "update", "fields": {...every non-array field...},
     "arrays_field": "delta",
     "arrays": [{"name": "h0_kernel", "dtype": "float32", "shape": [2, 3], "data": [...row-major...]}]}

Regenerate (only when the protocol version changes!): ``python tests/data/golden/make_golden.py``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from fedge.protocol import codec
from fedge.protocol.messages import (
    Ack,
    Arrays,
    Decline,
    DeclineReason,
    HubStatus,
    Message,
    MessageType,
    ModelFull,
    ModelHead,
    ModelUpdate,
    Presence,
    Reject,
    RejectReason,
    RoundAnnounce,
    RoundResult,
    RoundStatus,
    SecAggStage,
)

HERE = Path(__file__).resolve().parent
TS = 1795545600.25
ARRAY_FIELDS = ("head", "files", "delta", "stage")
STAGE_BYTES = bytes.fromhex("465341010100")  # a stand-in body: the stage encodings have their own vectors (secagg/)


def _nonce(i: int) -> str:
    return f"{i:02x}" * 16


def golden_messages() -> list[Message]:
    head: Arrays = {
        "h0_kernel": np.array([[0.5, -1.0, 2.0], [0.25, 0.0, -0.125]], dtype=np.float32),
        "h0_bias": np.array([1.5, -2.5, 0.0], dtype=np.float32),
    }
    delta: Arrays = {
        "h0_kernel": np.array([[0.001, -0.002, 0.003], [1e-7, -0.5, 3.25]], dtype=np.float32),
        "h0_bias": np.array([0.1, 0.2, -0.3], dtype=np.float32),
    }
    return [
        Presence("demo", "dev-01", True, n_samples=120, backends=("litert", "numpy"), model_version="v3",
                 agent_version="0.1.0", nonce=_nonce(1), ts=TS),
        HubStatus("demo", True, round=4, model_version="v3", nonce=_nonce(2), ts=TS),
        RoundAnnounce("demo", 4, "v3", "ab" * 32, TS + 60.0, 2, ("dev-01", "dev-02"), 1, 0.05,
                      nonce=_nonce(3), ts=TS),
        ModelHead("demo", "v3", "v2", "ab" * 32, 3, head, nonce=_nonce(4), ts=TS),
        ModelFull("demo", "ab" * 32, '{"format": 1}',
                  {"manifest.json": np.frombuffer(b'{"format": 1}', dtype=np.uint8).copy(),
                   "head.npz": np.arange(11, dtype=np.uint8)}, nonce=_nonce(5), ts=TS),
        ModelUpdate("demo", 4, "dev-01", "v3", 120, delta, metrics={"loss": 0.75, "accuracy": 0.5},
                    nonce=_nonce(6), ts=TS),
        Ack("demo", 4, "dev-01", _nonce(6), nonce=_nonce(7), ts=TS),
        Reject("demo", 4, "dev-02", RejectReason.STALE_ROUND, "round 3 is closed", ref_nonce=_nonce(8),
               nonce=_nonce(9), ts=TS),
        RoundResult("demo", 4, RoundStatus.COMPLETED, "v4", 0.875, 0.5, ("dev-01",), 120, 1, 12.5,
                    nonce=_nonce(10), ts=TS),
        Decline("demo", 5, "dev-02", DeclineReason.BUDGET_EXHAUSTED, "epsilon 7.9 + this round > budget 8",
                nonce=_nonce(11), ts=TS),
        SecAggStage("demo", 7, "dev-01", {"fsa": np.frombuffer(STAGE_BYTES, dtype=np.uint8).copy()},
                    nonce=_nonce(15), ts=TS),
    ]


def golden_variants() -> dict[str, Message]:
    """Vectors of messages that reuse a type on topics of their own (file name -> message): the selection round's
    announce (``round/select``), a device's report (``select/<device>``) and its result (PROTOCOL.md §4)."""
    return {
        "selection_announce": RoundAnnounce("demo", 6, "v4", "ab" * 32, TS + 120.0, 2, ("dev-01", "dev-02"), 2, 0.1,
                                            nonce=_nonce(12), ts=TS, candidates=("cnn-a", "cnn-b"),
                                            candidate_backbones=("cd" * 32, "ef" * 32)),
        "selection_report": ModelUpdate("demo", 6, "dev-01", "v4", 24, {},
                                        metrics={"val_n": 24.0, "val_acc_cnn-a": 0.75, "val_loss_cnn-a": 0.625,
                                                 "val_acc_cnn-b": 0.25, "val_loss_cnn-b": 2.5},
                                        nonce=_nonce(13), ts=TS),
        "selection_result": RoundResult("demo", 6, RoundStatus.COMPLETED, "v5", None, None, ("dev-01", "dev-02"), 48, 0,
                                        30.5, nonce=_nonce(14), ts=TS, detail="selected cnn-a, deployed as v5",
                                        federated={"val_n": 48.0, "val_acc_cnn-a": 0.75, "val_acc_cnn-b": 0.25},
                                        ranking=("cnn-a", "cnn-b")),
        # a secure-aggregation round's announce (PROTOCOL.md, "Secure aggregation")
        "secagg_announce": RoundAnnounce("demo", 7, "v5", "ab" * 32, TS + 60.0, 2, ("dev-01", "dev-02", "dev-03"), 1,
                                         0.05, nonce=_nonce(16), ts=TS, secagg_seed="5e" * 32, secagg_degree=2,
                                         secagg_threshold=2, secagg_ring_bits=32, secagg_clip=1.0,
                                         secagg_scale=65536.0),
        # ... with bounded inputs: an announced L2 clip and the norm bit (PROTOCOL.md §9, "Bounded inputs")
        "secagg_announce_bounded": RoundAnnounce("demo", 8, "v5", "ab" * 32, TS + 60.0, 2,
                                                 ("dev-01", "dev-02", "dev-03"), 1, 0.05, nonce=_nonce(18), ts=TS,
                                                 secagg_seed="5f" * 32, secagg_degree=2, secagg_threshold=2,
                                                 secagg_ring_bits=32, secagg_clip=1.0, secagg_scale=65536.0,
                                                 secagg_l2_clip=1.5, secagg_norm_bit=True),
        # a buffered round re-announced on its second attempt (PROTOCOL.md, "Buffered rounds", "Attempts")
        "buffered_announce": RoundAnnounce("demo", 9, "v6", "ab" * 32, TS + 600.0, 1, ("dev-01", "dev-02", "dev-03"),
                                           1, 0.05, nonce=_nonce(19), ts=TS, buffer_k=2, max_staleness=3,
                                           buffer_attempt=2),
    }


def describe(msg: Message) -> dict[str, Any]:
    """The plain-JSON description of a message (what the .json files hold)."""
    out: dict[str, Any] = {"type": str(msg.type), "fields": {}, "arrays_field": None, "arrays": []}
    for f in fields(msg):
        value = getattr(msg, f.name)
        if f.name in ARRAY_FIELDS:
            out["arrays_field"] = f.name
            out["arrays"] = [
                {"name": k, "dtype": codec._dtype_name(np.asarray(a)), "shape": list(np.shape(a)),
                 "data": np.asarray(a).ravel().tolist()}
                for k, a in value.items()
            ]
        elif f.metadata.get("extension") and value == codec._default_of(f):
            continue  # left out of the frame too (see protocol.messages.EXT)
        else:
            out["fields"][f.name] = list(value) if isinstance(value, tuple) else value
    return out


def from_description(desc: dict[str, Any]) -> Message:
    """Build the message a description stands for (the inverse of :func:`describe`)."""
    cls = codec._BY_TYPE[MessageType(desc["type"])]
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name == desc["arrays_field"]:
            kwargs[f.name] = {
                a["name"]: np.array(a["data"], dtype=codec.DTYPES[a["dtype"]]).reshape(a["shape"])
                for a in desc["arrays"]
            }
        elif f.name in desc["fields"]:
            v = desc["fields"][f.name]
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    if "reason" in kwargs:
        kwargs["reason"] = (DeclineReason if cls is Decline else RejectReason)(kwargs["reason"])
    if "status" in kwargs:
        kwargs["status"] = RoundStatus(kwargs["status"])
    return cls(**kwargs)


def main(out: Path = HERE) -> None:
    named = {str(m.type): m for m in golden_messages()} | golden_variants()
    for name, msg in named.items():
        (out / f"{name}.bin").write_bytes(codec.encode(msg))
        (out / f"{name}.json").write_text(json.dumps(describe(msg), indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(named)} golden vectors to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
