"""One codec for every frame on the wire (see PROTOCOL.md, "Frame").

Frame = ``b"FDG" + bytes([PROTOCOL_VERSION])`` + uint32 LE header length + UTF-8 JSON header
(padded with spaces so that the data section starts at a multiple of 8) + data section.
Arrays are raw little-endian bytes in the data section, each at an 8-aligned offset that the
header gives with its dtype and shape. Never pickle. Every failure is one ``DecodeError``
whose ``reason`` is a :class:`RejectReason` value.
"""

from __future__ import annotations

import json
import math
import re
import struct
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from typing import Any, Final, TypeGuard

import numpy as np

from fedge.protocol.errors import DecodeError
from fedge.protocol.messages import (
    PROTOCOL_VERSION,
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
    RoundOverrides,
    RoundResult,
    RoundStatus,
    SecAggStage,
)

MAGIC: Final = b"FDG"
PREFIX_LEN: Final = 8
MAX_HEADER_BYTES: Final = 1 << 20
DEFAULT_MAX_FRAME_BYTES: Final = 64 << 20
MAX_ARRAYS: Final = 1024
"""Arrays one frame may carry (a head has two per layer, a model/full a handful of files)."""
MAX_ARRAY_BYTES: Final = (1 << 31) - 1
"""Largest array a shape may describe: product of its non-zero dimensions x itemsize (32-bit devices)."""
MAX_CONTROL_BYTES: Final = 4096
"""Largest ``control/round/start`` body (a full one is about 200 bytes)."""
SMALL_FRAME_BYTES: Final = 1 << 16
"""Limit for frames that carry no arrays worth the name: presence, ack, reject, decline."""
ANNOUNCE_FRAME_BYTES: Final = MAX_HEADER_BYTES + PREFIX_LEN + 64
"""Limit for ``round/announce`` (a header only; its ``selected`` list grows with the fleet; + a signature)."""
SIG_FIELD: Final = "sig_key"
"""Header field of a signed frame (protocol/signing.py): the signing key's id; the frame ends in the signature."""
SIGNATURE_BYTES: Final = 64
DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
}
_BY_TYPE: Final[dict[MessageType, type[Message]]] = {
    cls.type: cls
    for cls in (Presence, HubStatus, RoundAnnounce, ModelHead, ModelFull, ModelUpdate, Ack, Reject, RoundResult,
                Decline, SecAggStage)
}
_ARRAY_FIELD: Final = {"head", "files", "delta", "stage"}
_AT_LEAST: Final[dict[type[Any], tuple[tuple[str, int], ...]]] = {RoundAnnounce: (("buffer_attempt", 0),)}
"""Integer fields with a floor (beyond their type): a frame below it is malformed."""


def _dtype_name(arr: np.ndarray[Any, Any]) -> str:
    for name, dt in DTYPES.items():
        if arr.dtype.kind == dt.kind and arr.dtype.itemsize == dt.itemsize:
            return name
    raise TypeError(f"dtype {arr.dtype} cannot go on the wire; allowed: {', '.join(DTYPES)}")


def _pad8(n: int) -> int:
    return (-n) % 8


def _default_of(f: Field[Any]) -> Any:
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def encode(msg: Message) -> bytes:
    """Encode a message as one frame."""
    header: dict[str, Any] = {"type": str(msg.type)}
    arrays: Arrays = {}
    for f in fields(msg):
        value = getattr(msg, f.name)
        if f.name in _ARRAY_FIELD:
            arrays = value
            continue
        if f.metadata.get("extension") and value == _default_of(f):
            continue
        header[f.name] = list(value) if isinstance(value, tuple) else value
    specs: list[dict[str, Any]] = []
    chunks: list[Any] = []  # buffers: the arrays themselves are joined into the frame, copied once
    offset = 0
    for name, arr in arrays.items():
        a = np.asarray(arr)
        dname = _dtype_name(a)
        raw = np.ascontiguousarray(a, dtype=DTYPES[dname])
        specs.append({"name": name, "dtype": dname, "shape": list(a.shape), "offset": offset, "nbytes": raw.nbytes})
        chunks += [raw, b"\0" * _pad8(raw.nbytes)]
        offset += raw.nbytes + _pad8(raw.nbytes)
    header["arrays"] = specs
    text = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    text += b" " * _pad8(PREFIX_LEN + len(text))
    return b"".join([MAGIC, bytes([PROTOCOL_VERSION]), struct.pack("<I", len(text)), text, *chunks])


def _fail(reason: RejectReason, detail: str) -> DecodeError:
    return DecodeError(str(reason), detail)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a JSON object that names a key twice is refused (parsers disagree on which wins)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_strict(text: bytes | str) -> Any:
    """``json.loads`` refusing duplicate object keys; raises ``ValueError`` (or ``RecursionError``)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _split(payload: bytes, max_bytes: int) -> tuple[dict[str, Any], memoryview]:
    if len(payload) > max_bytes:
        raise _fail(RejectReason.TOO_LARGE, f"frame of {len(payload)} bytes exceeds the limit of {max_bytes}")
    if len(payload) < PREFIX_LEN or payload[:3] != MAGIC:
        raise _fail(RejectReason.MALFORMED, "not a fedge frame (bad magic or too short)")
    if payload[3] != PROTOCOL_VERSION:
        raise _fail(RejectReason.BAD_VERSION, f"protocol version {payload[3]}, this side speaks {PROTOCOL_VERSION}")
    (hlen,) = struct.unpack_from("<I", payload, 4)
    if hlen > MAX_HEADER_BYTES or PREFIX_LEN + hlen > len(payload):
        raise _fail(RejectReason.MALFORMED, f"header length {hlen} does not fit the frame")
    try:
        header = loads_strict(bytes(payload[PREFIX_LEN : PREFIX_LEN + hlen]).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int > 4300 digits
        raise _fail(RejectReason.MALFORMED, f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _fail(RejectReason.MALFORMED, "header is not a JSON object")
    end = len(payload)
    if SIG_FIELD in header:  # a signed frame: the signature trailer is not part of the data section
        end -= SIGNATURE_BYTES
        if end < PREFIX_LEN + hlen:
            raise _fail(RejectReason.MALFORMED, "signed frame too short for its signature")
    return header, memoryview(payload)[PREFIX_LEN + hlen : end]


def frame_header(payload: bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> tuple[dict[str, Any], memoryview]:
    """A frame's parsed header and its data section (without a signature trailer); DecodeError if malformed."""
    return _split(payload, max_bytes)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


_Layout = list[tuple[str, np.dtype[Any], int, int, tuple[int, ...]]]  # name, dtype, count, offset, shape
_LAST_LAYOUT: list[tuple[list[Any], int, _Layout]] = []  # the last frame's array specs, checked: (specs, end, layout)


def _arrays(specs: Any, data: memoryview, *, copy: bool) -> Arrays:
    """The arrays of a frame: copies, or (``copy=False``) read-only views into ``data``.

    A hub decodes thousands of updates with the same array specs: specs equal to the last ones checked (a C-speed
    comparison) in a frame long enough for them pass without checking each field again."""
    last = _LAST_LAYOUT[0] if _LAST_LAYOUT else None
    if last is not None and specs == last[0] and last[1] <= len(data) and _ints_only(specs):
        block = bytearray(data[:last[1]]) if copy else data  # one copy for all the arrays (writable)
        return {name: np.frombuffer(block, dtype=dt, count=count, offset=offset).reshape(shape)
                for name, dt, count, offset, shape in last[2]}
    out = _check_arrays(specs, data, copy=copy)
    if isinstance(specs, list) and out:
        layout: _Layout = [(str(sp["name"]), DTYPES[sp["dtype"]], math.prod(sp["shape"]), int(sp["offset"]),
                            tuple(sp["shape"])) for sp in specs]
        end = max(int(sp["offset"]) + int(sp["nbytes"]) for sp in specs)
        _LAST_LAYOUT[:] = [(copy_specs(specs), end, layout)]
    return out


def _ints_only(specs: list[dict[str, Any]]) -> bool:
    """The numbers of equal specs are ints too (``==`` takes 1.0 and True for 1)."""
    return all(type(sp["offset"]) is int and type(sp["nbytes"]) is int and all(type(d) is int for d in sp["shape"])
               for sp in specs)


def copy_specs(specs: list[Any]) -> list[Any]:
    """A copy of checked array specs that later changes to the frame's header cannot reach."""
    return [{k: (list(v) if isinstance(v, list) else v) for k, v in sp.items()} for sp in specs]


def _check_arrays(specs: Any, data: memoryview, *, copy: bool) -> Arrays:
    if not isinstance(specs, list):
        raise _fail(RejectReason.MALFORMED, "'arrays' is not a list")
    if len(specs) > MAX_ARRAYS:
        raise _fail(RejectReason.MALFORMED, f"{len(specs)} arrays; at most {MAX_ARRAYS} per frame")
    out: Arrays = {}
    end = 0
    for spec in specs:
        if not isinstance(spec, dict):
            raise _fail(RejectReason.MALFORMED, "array spec is not an object")
        name, dname, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        offset, nbytes = spec.get("offset"), spec.get("nbytes")
        if not isinstance(name, str) or not name or name in out:
            raise _fail(RejectReason.MALFORMED, f"array name {name!r} missing or repeated")
        if not isinstance(dname, str) or dname not in DTYPES:  # a list or an object is unhashable
            raise _fail(RejectReason.WRONG_DTYPE, f"array {name!r}: dtype {dname!r} not allowed")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and d >= 0 for d in shape):
            raise _fail(RejectReason.MALFORMED, f"array {name!r}: bad shape {shape!r}")
        dt = DTYPES[dname]
        count = math.prod(shape)
        if (count if count else math.prod(d for d in shape if d)) * dt.itemsize > MAX_ARRAY_BYTES:  # zero-size too
            raise _fail(RejectReason.MALFORMED, f"array {name!r}: shape {shape!r} is too large")
        if not _is_int(nbytes) or nbytes != count * dt.itemsize:
            raise _fail(RejectReason.MALFORMED, f"array {name!r}: nbytes {nbytes!r} does not match shape")
        if not _is_int(offset) or offset < end or offset % 8 or offset + nbytes > len(data):
            raise _fail(RejectReason.MALFORMED, f"array {name!r}: offset {offset!r} out of order or range")
        view = np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(shape)
        out[name] = view.copy() if copy else view
        end = offset + nbytes
    return out


def _finite_number(value: Any) -> bool:
    """A JSON number that is a finite float64 (not a bool, not NaN/Inf, not an int too big for a float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


Checker = Callable[[str, Any], Any]
"""Validates one header field's JSON value against its annotation and converts it to the Python type."""


def _fail_field(name: str, hint: Any, value: Any) -> DecodeError:
    return _fail(RejectReason.MALFORMED, f"field {name!r}: {value!r} is not a valid {hint}")


def _checker(hint: Any) -> Checker:
    """The checker of one field annotation (built once per message class: resolving annotations on every frame cost
    more than decoding a small one)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        nullable = type(None) in args
        (inner,) = [a for a in args if a is not type(None)]
        inner_check = _checker(inner)

        def optional(name: str, value: Any) -> Any:
            return None if value is None and nullable else inner_check(name, value)

        return optional
    if hint in (RejectReason, RoundStatus, DeclineReason):
        def enum(name: str, value: Any) -> Any:
            try:
                return hint(value)
            except ValueError as exc:
                raise _fail(RejectReason.MALFORMED, f"field {name!r}: unknown value {value!r}") from exc

        return enum
    if hint is bool:
        def boolean(name: str, value: Any) -> Any:
            if isinstance(value, bool):
                return value
            raise _fail_field(name, hint, value)

        return boolean
    if hint is int:
        def integer(name: str, value: Any) -> Any:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise _fail_field(name, hint, value)

        return integer
    if hint is float:
        def number(name: str, value: Any) -> Any:
            if _finite_number(value):
                return float(value)
            raise _fail_field(name, hint, value)

        return number
    if hint is str:
        def string(name: str, value: Any) -> Any:
            if isinstance(value, str):
                return value
            raise _fail_field(name, hint, value)

        return string
    if origin is tuple:
        def strings(name: str, value: Any) -> Any:
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise _fail_field(name, hint, value)

        return strings
    if origin is dict and typing.get_args(hint)[1] is str:
        def texts(name: str, value: Any) -> Any:
            if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
                return dict(value)
            raise _fail_field(name, hint, value)

        return texts
    if origin is dict:
        def numbers(name: str, value: Any) -> Any:
            if isinstance(value, dict) and all(_finite_number(v) for v in value.values()):
                return {str(k): float(v) for k, v in value.items()}
            raise _fail_field(name, hint, value)

        return numbers
    raise TypeError(f"unsupported field type {hint!r}")  # pragma: no cover - a programming error in messages.py


def _check(name: str, hint: Any, value: Any) -> Any:
    """Validate one header field against its annotation and convert JSON to the Python type."""
    return _checker(hint)(name, value)


_Plan = list[tuple[str, bool, bool, Checker | None]]  # field, is the arrays field, required, checker
_PLANS: dict[type[Any], _Plan] = {}


def _plan(cls: type[Any]) -> _Plan:
    """How to decode a message class's fields (cached)."""
    plan = _PLANS.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        plan = _PLANS[cls] = [
            (f.name, f.name in _ARRAY_FIELD, f.default is MISSING and f.default_factory is MISSING,
             None if f.name in _ARRAY_FIELD else _checker(hints[f.name]))
            for f in fields(cls)
        ]
    return plan


def decode(payload: bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    """Decode one frame; raises DecodeError (with a RejectReason) for anything malformed.

    Arrays are copies, except a ``model_full``'s files: read-only views into ``payload`` (no second copy of a
    large model in memory; the message keeps ``payload`` alive)."""
    header, data = _split(payload, max_bytes)
    try:
        cls = _BY_TYPE[MessageType(str(header.get("type")))]
    except (ValueError, KeyError) as exc:
        raise _fail(RejectReason.WRONG_TYPE, f"unknown message type {header.get('type')!r}") from exc
    kwargs: dict[str, Any] = {}
    for name, is_arrays, required, check in _plan(cls):
        if is_arrays:
            kwargs[name] = _arrays(header.get("arrays", []), data, copy=cls is not ModelFull)
        elif name in header:
            kwargs[name] = check(name, header[name]) if check is not None else header[name]
        elif required:
            raise _fail(RejectReason.MALFORMED, f"{cls.type} without field {name!r}")
    if "nonce" not in header:
        raise _fail(RejectReason.MALFORMED, f"{cls.type} without field 'nonce'")
    for name, low in _AT_LEAST.get(cls, ()):
        if name in kwargs and kwargs[name] < low:
            raise _fail(RejectReason.MALFORMED, f"field {name!r}: {kwargs[name]!r} is below {low}")
    return cls(**kwargs)


def decode_as(payload: bytes, cls: type[Message], *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    """Decode and insist on one message type."""
    msg = decode(payload, max_bytes=max_bytes)
    if not isinstance(msg, cls):
        raise _fail(RejectReason.WRONG_TYPE, f"expected {cls.type}, got {msg.type}")
    return msg


_OVERRIDES: Final = {"min_devices": int, "deadline_s": float, "fraction": float, "local_epochs": int, "lr": float,
                     "request_id": str}
_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def decode_control(payload: bytes) -> RoundOverrides:
    """Decode ``control/round/start``: empty or ``{}`` means hub defaults; JSON may override fields."""
    if len(payload) > MAX_CONTROL_BYTES:
        raise _fail(RejectReason.TOO_LARGE, f"control payload of {len(payload)} bytes; at most {MAX_CONTROL_BYTES}")
    text = payload.strip()
    if not text:
        return RoundOverrides()
    try:
        obj = loads_strict(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int > 4300 digits
        raise _fail(RejectReason.MALFORMED, f"control payload is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise _fail(RejectReason.MALFORMED, "control payload is not a JSON object")
    unknown = sorted(set(obj) - set(_OVERRIDES))
    if unknown:
        raise _fail(RejectReason.MALFORMED, f"unknown field(s) {unknown}; allowed: {sorted(_OVERRIDES)}")
    checked = {k: _check(k, _OVERRIDES[k], v) for k, v in obj.items()}
    for key in ("min_devices", "local_epochs"):
        if key in checked and checked[key] < 1:
            raise _fail(RejectReason.MALFORMED, f"field {key!r} must be >= 1")
    if "fraction" in checked and not 0.0 < checked["fraction"] <= 1.0:
        raise _fail(RejectReason.MALFORMED, "field 'fraction' must be in (0, 1]")
    for key in ("deadline_s", "lr"):
        if key in checked and checked[key] <= 0:
            raise _fail(RejectReason.MALFORMED, f"field {key!r} must be > 0")
    if "request_id" in checked and not _REQUEST_ID.match(checked["request_id"]):
        raise _fail(RejectReason.MALFORMED, "field 'request_id' must be 1-64 characters of [A-Za-z0-9_-]")
    return RoundOverrides(**checked)


def encode_control_reply(request_id: str | None, accepted: bool, round_id: int | None, reason: str,
                         detail: str = "") -> bytes:
    """The hub's JSON answer on ``control/round/reply`` to one ``control/round/start``."""
    body = {"request_id": request_id, "accepted": accepted, "round": round_id, "reason": reason, "detail": detail}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def encode_control(overrides: RoundOverrides) -> bytes:
    """The JSON body for ``control/round/start`` (only the fields that are set)."""
    body = {k: getattr(overrides, k) for k in _OVERRIDES if getattr(overrides, k) is not None}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


__all__ = [
    "ANNOUNCE_FRAME_BYTES", "DTYPES", "MAGIC", "MAX_ARRAYS", "MAX_ARRAY_BYTES", "MAX_CONTROL_BYTES", "SIGNATURE_BYTES",
    "SIG_FIELD", "SMALL_FRAME_BYTES", "decode", "decode_as", "decode_control", "encode", "encode_control",
    "encode_control_reply", "frame_header", "loads_strict",
]
