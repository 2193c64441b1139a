"""Source-model selection on the wire: the ``control/round/select`` body and the report's metric names.

A selection round reuses two message types on topics of their own (PROTOCOL.md, "Selection rounds"): its
announce is an ``announce`` with ``candidates``/``candidate_backbones`` on ``round/select``; a device's report is
an ``update`` without arrays on ``select/<device>`` whose ``metrics`` hold ``val_n`` and, per candidate,
``val_acc_<name>`` and ``val_loss_<name>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Final

from fedge.protocol.codec import MAX_CONTROL_BYTES, decode_control, encode_control, loads_strict
from fedge.protocol.errors import DecodeError
from fedge.protocol.messages import RejectReason, RoundOverrides
from fedge.protocol.topics import valid_id

MAX_CANDIDATES: Final = 16
"""At most this many candidates per selection round (each one is a full model every device downloads)."""


@dataclass(frozen=True)
class SelectRequest:
    """The JSON body of ``control/round/select``: the round overrides of ``control/round/start`` plus
    ``candidates`` (names registered with ``fedge hub models add``; empty = every registered candidate)."""

    candidates: tuple[str, ...] = ()
    overrides: RoundOverrides = field(default_factory=RoundOverrides)


def acc_key(name: str) -> str:
    """The report metric holding a candidate's validation accuracy after the short fine-tune."""
    return f"val_acc_{name}"


def loss_key(name: str) -> str:
    return f"val_loss_{name}"


def decode_select_control(payload: bytes) -> SelectRequest:
    """Decode ``control/round/select``: like ``control/round/start`` plus an optional ``candidates`` list of
    1-16 distinct candidate names. Raises DecodeError (``too_large``, ``malformed``) for anything else."""
    if len(payload) > MAX_CONTROL_BYTES:
        raise DecodeError(str(RejectReason.TOO_LARGE), f"control payload of {len(payload)} bytes; at most "
                          f"{MAX_CONTROL_BYTES}")
    text = payload.strip()
    obj: object = {}
    if text:
        try:
            obj = loads_strict(text.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise DecodeError(str(RejectReason.MALFORMED), f"control payload is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise DecodeError(str(RejectReason.MALFORMED), "control payload is not a JSON object")
    raw = obj.pop("candidates", [])
    if (not isinstance(raw, list) or len(raw) > MAX_CANDIDATES or len(set(map(str, raw))) != len(raw)
            or not all(isinstance(c, str) and valid_id(c) for c in raw)):
        raise DecodeError(str(RejectReason.MALFORMED), f"field 'candidates' must be a list of at most "
                          f"{MAX_CANDIDATES} distinct names of 1-64 characters of [A-Za-z0-9_-]")
    overrides = decode_control(json.dumps(obj).encode())
    return SelectRequest(tuple(raw), overrides)


def encode_select_control(request: SelectRequest) -> bytes:
    """The JSON body for ``control/round/select`` (only the fields that are set)."""
    body = json.loads(encode_control(request.overrides))
    if request.candidates:
        body["candidates"] = list(request.candidates)
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


__all__ = ["MAX_CANDIDATES", "SelectRequest", "acc_key", "decode_select_control", "encode_select_control",
           "loss_key"]
