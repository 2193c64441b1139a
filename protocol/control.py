"""``control/round/cancel``: the operator's request to close the open round (plain JSON, like
``control/round/start``; see PROTOCOL.md §5)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from fedge.protocol.codec import MAX_CONTROL_BYTES, loads_strict
from fedge.protocol.errors import DecodeError
from fedge.protocol.messages import RejectReason

__all__ = ["MAX_CANCEL_REASON", "CancelRequest", "ReplyReason", "decode_cancel", "encode_cancel", "request_id_of"]

MAX_CANCEL_REASON: Final = 500
"""Characters of the operator's reason kept (it is stored, logged and published in the result's detail)."""
_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FIELDS: Final = ("reason", "round", "request_id")


@dataclass(frozen=True)
class CancelRequest:
    """Close the open round. ``round``: only if that one is open (None = whichever is open); ``reason``: free text
    for the result's detail; ``request_id``: echoed on ``control/round/reply``."""

    reason: str = ""
    round: int | None = None
    request_id: str | None = None


def _fail(detail: str, reason: RejectReason = RejectReason.MALFORMED) -> DecodeError:
    return DecodeError(str(reason), detail)


def decode_cancel(payload: bytes) -> CancelRequest:
    """Decode a cancel request; empty or ``{}`` cancels whichever round is open. Raises ``DecodeError``."""
    if len(payload) > MAX_CONTROL_BYTES:
        raise _fail(f"cancel payload of {len(payload)} bytes; at most {MAX_CONTROL_BYTES}", RejectReason.TOO_LARGE)
    text = payload.strip()
    if not text:
        return CancelRequest()
    try:
        obj = loads_strict(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _fail(f"cancel payload is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise _fail("cancel payload is not a JSON object")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise _fail(f"unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
    reason, rid, request_id = obj.get("reason", ""), obj.get("round"), obj.get("request_id")
    if not isinstance(reason, str) or len(reason) > MAX_CANCEL_REASON:
        raise _fail(f"field 'reason' must be a string of at most {MAX_CANCEL_REASON} characters")
    if rid is not None and (not isinstance(rid, int) or isinstance(rid, bool) or rid < 1):
        raise _fail("field 'round' must be an integer >= 1")
    if request_id is not None and (not isinstance(request_id, str) or not _REQUEST_ID.match(request_id)):
        raise _fail("field 'request_id' must be 1-64 characters of [A-Za-z0-9_-]")
    return CancelRequest(reason, rid, request_id)


def encode_cancel(req: CancelRequest) -> bytes:
    """The JSON body of ``control/round/cancel`` (only the fields that are set)."""
    body: dict[str, Any] = {"reason": req.reason} if req.reason else {}
    if req.round is not None:
        body["round"] = req.round
    if req.request_id is not None:
        body["request_id"] = req.request_id
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


class ReplyReason(StrEnum):
    """The ``reason`` of a ``control/round/reply`` (PROTOCOL.md §5): why a control request was or was not acted on.
    Decoding failures reply with the decoder's reason (``malformed``, ``too_large``)."""

    STARTED = "started"
    QUEUED = "queued"  # accepted: opens (as ``round``) when the deploy gate's evaluation round closes
    CANCELLED = "cancelled"
    ROUND_OPEN = "round_open"
    NO_DEVICES = "no_devices"
    NO_OPEN_ROUND = "no_open_round"
    OVER_LIMITS = "over_limits"
    REFUSED_BUDGET = "refused_budget"
    COHORT_TOO_SMALL = "cohort_too_small"
    SECAGG_IMPOSSIBLE = "secagg_impossible"
    NO_CANDIDATES = "no_candidates"
    UNKNOWN_CANDIDATE = "unknown_candidate"
    DP_NOT_SUPPORTED = "dp_not_supported"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"


def request_id_of(payload: bytes) -> str | None:
    """The ``request_id`` of a control payload that failed to decode, when one can be read (for the reply)."""
    if len(payload) > MAX_CONTROL_BYTES:  # refused unread: no parsing of whatever size the broker allows
        return None
    try:
        obj = loads_strict(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    rid = obj.get("request_id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and _REQUEST_ID.match(rid) else None
