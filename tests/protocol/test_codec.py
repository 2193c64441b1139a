"""The frame codec: round trips, total decoding (only DecodeError), every reject reason, control bodies."""

from __future__ import annotations

import json
import struct
from dataclasses import fields, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedge.protocol import codec
from fedge.protocol.codec import DTYPES, decode, decode_as, decode_control, encode, encode_control
from fedge.protocol.errors import DecodeError
from fedge.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    HubStatus,
    Message,
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
)

ARRAY_FIELDS = ("head", "files", "delta")
ids = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
text = st.text(max_size=20)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
ints = st.integers(-(2**53), 2**53)


def _opt(strategy: Any) -> Any:
    return st.none() | strategy


@st.composite
def arrays(draw: Any) -> dict[str, np.ndarray[Any, Any]]:
    names = draw(st.lists(ids, max_size=4, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
        out[name] = draw(hnp.arrays(DTYPES[dtype], shape))
    return out


def common() -> dict[str, Any]:
    return {"nonce": st.from_regex(r"[0-9a-f]{32}", fullmatch=True), "ts": finite}


messages = st.one_of(
    st.builds(Presence, ids, ids, st.booleans(), n_samples=_opt(ints), backends=st.lists(text).map(tuple),
              model_version=_opt(text), agent_version=text,
              backend_faults=st.dictionaries(text, text, max_size=3), **common()),
    st.builds(HubStatus, ids, st.booleans(), round=_opt(ints), model_version=_opt(text), **common()),
    st.builds(RoundAnnounce, ids, ints, text, text, finite, ints, st.lists(ids).map(tuple), ints, finite,
              **common()),
    st.builds(ModelHead, ids, text, _opt(text), text, _opt(ints), arrays(), **common()),
    st.builds(ModelFull, ids, text, text, arrays(), **common()),
    st.builds(ModelUpdate, ids, ints, ids, text, ints, arrays(), metrics=st.dictionaries(text, finite, max_size=3),
              **common()),
    st.builds(Ack, ids, ints, ids, text, **common()),
    st.builds(Reject, ids, _opt(ints), ids, st.sampled_from(RejectReason), text, ref_nonce=_opt(text), **common()),
    st.builds(RoundResult, ids, ints, st.sampled_from(RoundStatus), _opt(text), _opt(finite), _opt(finite),
              st.lists(ids).map(tuple), ints, ints, finite, **common()),
)


def assert_same(a: Message, b: Message) -> None:
    assert type(a) is type(b)
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name in ARRAY_FIELDS:
            assert list(x) == list(y)
            for k in x:
                assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                assert x[k].tobytes() == y[k].tobytes()  # bit-exact, NaN payloads included
        else:
            assert x == y and type(x) is type(y), f.name


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_every_message_round_trips_bit_exactly(msg: Message) -> None:
    frame = encode(msg)
    assert frame[:3] == b"FDG" and frame[3] == PROTOCOL_VERSION
    (hlen,) = struct.unpack_from("<I", frame, 4)
    assert (8 + hlen) % 8 == 0  # data section 8-aligned
    assert_same(decode(frame), msg)
    assert encode(decode(frame)) == frame


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_decode_error(data: bytes) -> None:
    for payload in (data, b"FDG\x01" + data):
        try:
            decode(payload)
        except DecodeError as exc:
            assert exc.reason in set(RejectReason)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.data())
def test_truncations_and_bit_flips_only_ever_raise_decode_error(msg: Message, data: st.DataObject) -> None:
    frame = encode(msg)
    cut = data.draw(st.integers(0, len(frame) - 1))
    try:
        decoded = decode(frame[:cut])
    except DecodeError as exc:
        assert exc.reason in set(RejectReason)
    else:  # only a cut into the final array's zero padding leaves a whole message
        assert cut >= len(frame) - 7 and frame[cut:] == b"\0" * (len(frame) - cut)
        assert_same(decoded, msg)
    flipped = bytearray(frame)
    pos = data.draw(st.integers(0, len(frame) - 1))
    flipped[pos] ^= 1 << data.draw(st.integers(0, 7))
    try:
        decode(bytes(flipped))
    except DecodeError as exc:
        assert exc.reason in set(RejectReason)


def head_msg(**arrays_: Any) -> ModelHead:
    head = arrays_ or {"w": np.ones((2, 3), np.float32)}
    return ModelHead("f", "v1", None, "ab", 1, head, nonce="0" * 32, ts=1.0)


def reframe(frame: bytes, mutate: Any, version: int = PROTOCOL_VERSION) -> bytes:
    """Decode the header of a valid frame, let ``mutate`` edit it, re-assemble the frame."""
    (hlen,) = struct.unpack_from("<I", frame, 4)
    header = json.loads(frame[8 : 8 + hlen])
    data = frame[8 + hlen :]
    mutate(header)
    text = json.dumps(header).encode()
    text += b" " * ((-(8 + len(text))) % 8)
    return b"FDG" + bytes([version]) + struct.pack("<I", len(text)) + text + data


def reason(payload: bytes, **kw: Any) -> str:
    with pytest.raises(DecodeError) as info:
        decode(payload, **kw)
    return info.value.reason


def set_(key: str, value: Any) -> Any:
    def mutate(h: dict[str, Any]) -> None:
        h[key] = value

    return mutate


def spec(key: str, value: Any, index: int = 0) -> Any:
    def mutate(h: dict[str, Any]) -> None:
        h["arrays"][index][key] = value

    return mutate


def test_each_reject_reason_of_the_decoder() -> None:
    good = encode(head_msg())
    two = encode(head_msg(a=np.ones(3, np.float32), b=np.ones(3, np.float32)))
    assert decode(reframe(good, lambda h: None)).type == "model_head"  # reframe itself is faithful
    assert reason(good, max_bytes=len(good) - 1) == RejectReason.TOO_LARGE
    assert reason(b"XYZ" + good[3:]) == RejectReason.MALFORMED
    assert reason(good[:5]) == RejectReason.MALFORMED
    assert reason(reframe(good, lambda h: None, version=PROTOCOL_VERSION + 1)) == RejectReason.BAD_VERSION
    assert reason(reframe(good, set_("type", "teleport"))) == RejectReason.WRONG_TYPE
    assert reason(reframe(good, spec("dtype", "float16"))) == RejectReason.WRONG_DTYPE
    assert reason(reframe(good, spec("shape", [2, -3]))) == RejectReason.MALFORMED
    assert reason(reframe(good, spec("shape", "2x3"))) == RejectReason.MALFORMED
    assert reason(reframe(good, spec("nbytes", 20))) == RejectReason.MALFORMED
    assert reason(reframe(good, spec("offset", 4))) == RejectReason.MALFORMED
    assert reason(reframe(good, spec("offset", 1 << 20))) == RejectReason.MALFORMED
    assert reason(reframe(two, spec("offset", 0, index=1))) == RejectReason.MALFORMED  # overlaps the first
    assert reason(reframe(two, spec("name", "a", index=1))) == RejectReason.MALFORMED  # repeated name
    assert reason(reframe(good, lambda h: h.pop("version"))) == RejectReason.MALFORMED  # required field
    assert reason(reframe(good, lambda h: h.pop("nonce"))) == RejectReason.MALFORMED
    assert reason(reframe(good, set_("round", "1"))) == RejectReason.MALFORMED  # bad field type
    assert reason(reframe(good, set_("round", True))) == RejectReason.MALFORMED
    assert reason(reframe(good, set_("arrays", {}))) == RejectReason.MALFORMED
    assert reason(b"FDG\x01" + struct.pack("<I", 8) + b"[1,2,3] ") == RejectReason.MALFORMED  # not an object
    assert reason(b"FDG\x01" + struct.pack("<I", 8) + b"\xff\xfe{}    ") == RejectReason.MALFORMED


def test_specs_like_the_last_checked_ones_are_still_checked_strictly() -> None:
    """The decoder skips re-checking array specs equal to the last frame's (the hub decodes thousands of updates with
    one layout); ``==`` takes 1.0 and True for 1, so such specs must still be refused, and a shorter frame too."""
    good = encode(head_msg(a=np.ones((2, 3), np.float32)))
    assert decode(good).type == "model_head"  # the layout is now the last one checked
    assert reason(reframe(good, spec("shape", [2.0, 3]))) == RejectReason.MALFORMED
    assert reason(reframe(good, spec("offset", False))) == RejectReason.MALFORMED
    assert reason(reframe(good, spec("nbytes", 24.0))) == RejectReason.MALFORMED
    assert reason(good[:-8]) == RejectReason.MALFORMED  # the same specs, the data cut short
    again = decode(good)
    assert isinstance(again, ModelHead) and again.head["a"].shape == (2, 3) and again.head["a"].flags.writeable


def test_nan_or_infinite_metrics_are_malformed() -> None:
    upd = ModelUpdate("f", 1, "d", "v1", 10, {}, metrics={"loss": 1.0}, nonce="0" * 32, ts=1.0)
    frame = encode(upd)
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert reason(reframe(frame, set_("metrics", {"loss": bad}))) == RejectReason.MALFORMED  # JSON NaN
    assert reason(reframe(frame, set_("metrics", {"loss": "1"}))) == RejectReason.MALFORMED
    with pytest.raises(ValueError):  # and nobody can encode one
        encode(replace(upd, metrics={"loss": float("nan")}))


def test_presence_backend_faults_are_optional_strings() -> None:
    plain = Presence("f", "d", True, backends=("litert", "numpy"), nonce="0" * 32, ts=1.0)
    assert b"backend_faults" not in encode(plain), "left out when empty: older hubs and the golden frames"
    faulty = replace(plain, backend_faults={"litert": "crashed with SIGSEGV in train_step"})
    got = decode(encode(faulty))
    assert isinstance(got, Presence) and got.backend_faults == {"litert": "crashed with SIGSEGV in train_step"}
    for bad in ({"litert": 1.0}, ["litert"], "litert", {"litert": None}):
        assert reason(reframe(encode(faulty), set_("backend_faults", bad))) == RejectReason.MALFORMED


def test_an_announce_buffer_attempt_is_optional_and_never_negative() -> None:
    plain = RoundAnnounce("f", 2, "v1", "ab" * 32, 1.0, 1, ("d",), 1, 0.1, nonce="0" * 32, ts=1.0, buffer_k=2,
                          max_staleness=1)
    assert b"buffer_attempt" not in encode(plain), "left out at 0: the frame an older hub sent"
    again = replace(plain, buffer_attempt=3)
    got = decode(encode(again))
    assert isinstance(got, RoundAnnounce) and got.buffer_attempt == 3
    for bad in (-1, 1.5, "1", True, None):
        assert reason(reframe(encode(again), set_("buffer_attempt", bad))) == RejectReason.MALFORMED


def test_unknown_header_fields_are_ignored_and_decode_as_checks_the_type() -> None:
    frame = reframe(encode(head_msg()), set_("future_field", {"x": 1}))
    assert isinstance(decode(frame), ModelHead)
    assert isinstance(decode_as(frame, ModelHead), ModelHead)
    with pytest.raises(DecodeError) as info:
        decode_as(frame, ModelUpdate)
    assert info.value.reason == RejectReason.WRONG_TYPE


def test_arrays_with_a_dtype_that_cannot_go_on_the_wire_are_refused_at_encode() -> None:
    with pytest.raises(TypeError, match="cannot go on the wire"):
        encode(head_msg(w=np.ones(3, np.float16)))


def test_zero_size_and_scalar_arrays_round_trip() -> None:
    msg = head_msg(empty=np.zeros((0, 5), np.float32), scalar=np.array(7, np.int64), also=np.zeros(0, np.uint8))
    out = decode(encode(msg))
    assert isinstance(out, ModelHead)
    assert out.head["empty"].shape == (0, 5) and out.head["scalar"].shape == () and int(out.head["scalar"]) == 7


# -- control/round/start --------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"", b"  \n", b"{}", b" {} "])
def test_empty_control_body_means_hub_defaults(body: bytes) -> None:
    assert decode_control(body) == RoundOverrides()


def test_control_overrides_round_trip() -> None:
    o = decode_control(b'{"min_devices": 3, "deadline_s": 30, "fraction": 0.5, "local_epochs": 2, "lr": 0.01}')
    assert o == RoundOverrides(min_devices=3, deadline_s=30.0, fraction=0.5, local_epochs=2, lr=0.01)
    assert isinstance(o.deadline_s, float)
    assert decode_control(encode_control(o)) == o
    assert encode_control(RoundOverrides(lr=0.1)) == b'{"lr":0.1}'


@pytest.mark.parametrize(
    "body",
    [
        b"[]", b"3", b"{not json", b"\xff", b'{"rounds": 3}', b'{"min_devices": 0}', b'{"min_devices": 2.5}',
        b'{"min_devices": true}', b'{"local_epochs": 0}', b'{"fraction": 0}', b'{"fraction": 1.5}',
        b'{"deadline_s": -1}', b'{"lr": 0}', b'{"lr": "fast"}', b'{"lr": NaN}',
    ],
)
def test_bad_control_bodies_are_malformed(body: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode_control(body)
    assert info.value.reason == RejectReason.MALFORMED


def test_codec_exports() -> None:
    assert codec.MAGIC == b"FDG" and set(DTYPES) == {"float32", "float64", "int32", "int64", "uint8"}


def test_numbers_too_big_for_a_float_or_for_python_are_malformed_not_crashes() -> None:
    """Regression: math.isfinite(10**400) raised OverflowError; json.loads of 5000 digits raised ValueError."""
    frame = encode(ModelUpdate("f", 1, "d", "v1", 10, {}, metrics={"loss": 1.0}, nonce="0" * 32, ts=1.0))
    assert reason(reframe(frame, set_("ts", 10**400))) == RejectReason.MALFORMED
    assert reason(reframe(frame, set_("metrics", {"loss": 10**400}))) == RejectReason.MALFORMED
    (hlen,) = struct.unpack_from("<I", frame, 4)
    huge = frame[8 : 8 + hlen].rstrip().replace(b'"round":1', b'"round":' + b"9" * 5000)
    huge += b" " * ((-(8 + len(huge))) % 8)
    assert reason(frame[:4] + struct.pack("<I", len(huge)) + huge + frame[8 + hlen :]) == RejectReason.MALFORMED
    for body in (b'{"lr": 1' + b"0" * 400 + b"}", b'{"min_devices": ' + b"9" * 5000 + b"}"):
        with pytest.raises(DecodeError):
            decode_control(body)
