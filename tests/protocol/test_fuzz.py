"""Property-based fuzzing of every decoder the hub and the agent run on wire data: they only ever raise their own
error (``DecodeError`` for frames and control bodies, ``ArtifactError`` for a model/full's manifest), or return a
value; the hub's update validation never raises at all. Plus the limits: arrays per frame, control body size,
zero-size arrays with huge dimensions, duplicate JSON keys.

Headers are generated structurally (valid shapes around hostile values), so the fuzzer reaches the field and
array checks that random bytes almost never get past.
"""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge.core.validate import Accept, Redelivery, Rejection, UpdateContext, validate_update
from fedge.edge_agent.artifacts import check_model_full
from fedge.protocol.codec import (
    MAX_ARRAYS,
    MAX_CONTROL_BYTES,
    decode,
    decode_as,
    decode_control,
    encode,
)
from fedge.protocol.control import decode_cancel
from fedge.protocol.errors import ArtifactError, DecodeError
from fedge.protocol.manifest import Manifest
from fedge.protocol.messages import (
    Ack,
    Decline,
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
    SecAggStage,
)
from fedge.protocol.selection import decode_select_control

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TYPES = [str(t) for t in MessageType]
CLASSES: list[type[Message]] = [Presence, HubStatus, RoundAnnounce, ModelHead, ModelFull, ModelUpdate, Ack, Reject,
                                RoundResult, Decline, SecAggStage]
FIELDS = ["fleet", "device", "online", "n_samples", "backends", "model_version", "agent_version", "dp", "round",
          "version", "parent", "backbone_sha256", "deadline", "min_devices", "selected", "local_epochs", "lr",
          "manifest", "metrics", "ref_nonce", "reason", "detail", "status", "accuracy", "loss", "devices",
          "rejected", "seconds", "nonce", "ts", "dp_mode", "dp_clip", "proximal_lambda", "federated", "declined"]

# JSON values, hostile ones included: huge ints, nesting, wrong types, near-valid enum strings
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12), st.sampled_from(["malformed", "completed", "central", "0" * 32, "v1", "demo"]),
)
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
    st.text(max_size=6), kids, max_size=3), max_leaves=8)
dims = st.one_of(st.integers(0, 4), st.just(0), st.integers(2**31, 2**70), st.integers(-3, -1), st.booleans(),
                 st.floats(0, 4), st.text(max_size=2))


@st.composite
def array_spec(draw: Any) -> dict[str, Any]:
    shape = draw(st.one_of(st.lists(dims, max_size=9), json_values))
    spec: dict[str, Any] = {
        "name": draw(st.one_of(st.text(min_size=1, max_size=8), json_values)),
        "dtype": draw(st.one_of(st.sampled_from(["float32", "float64", "int32", "int64", "uint8", "float16"]),
                                json_values)),
        "shape": shape,
        "offset": draw(st.one_of(st.integers(0, 6).map(lambda i: 8 * i), st.integers(-9, 2**64), json_values)),
        "nbytes": draw(st.one_of(st.integers(0, 48), st.floats(0, 48), st.booleans(), json_values)),
    }
    sane = isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    if sane and draw(st.booleans()):  # often consistent, so the later checks are reached
        size = 1
        for d in shape:
            size *= d
        spec["nbytes"] = size * 4 if spec["dtype"] in ("float32", "int32") else size
    for key in draw(st.lists(st.sampled_from(sorted(spec)), max_size=2, unique=True)):
        del spec[key]
    return spec


@st.composite
def headers(draw: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"type": draw(st.one_of(st.sampled_from(TYPES), json_values))}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=12, unique=True)):
        header[name] = draw(json_values)
    if draw(st.booleans()):
        header["arrays"] = draw(st.one_of(st.lists(array_spec(), max_size=4), json_values))
    return header


@st.composite
def valid_message_header(draw: Any) -> tuple[dict[str, Any], bytes]:
    """The header and data section of a real frame, then one field or array spec replaced by a hostile value."""
    head = {"h0_kernel": np.ones((2, 3), np.float32), "h0_bias": np.zeros(3, np.float32)}
    msg = draw(st.sampled_from([
        ModelUpdate("f", 1, "d", "v1", 10, head, {"loss": 0.5}),
        ModelHead("f", "v1", None, "ab" * 32, 1, head),
        Presence("f", "d", True, 10, ("numpy",), "v1", "1"),
        RoundAnnounce("f", 2, "v1", "ab" * 32, 1.0, 1, ("d",), 1, 0.1),
        Ack("f", 1, "d", "0" * 32),
        ModelFull("f", "ab" * 32, "{}", {"model.tflite": np.arange(9, dtype=np.uint8)}),
        SecAggStage("f", 1, "d", {"fsa": np.frombuffer(b"FSA\x01\x01", dtype=np.uint8)}),
    ]))
    frame = encode(msg)
    (hlen,) = struct.unpack_from("<I", frame, 4)
    header = json.loads(frame[8 : 8 + hlen])
    if draw(st.booleans()) and header["arrays"]:
        spec = draw(st.sampled_from(header["arrays"]))
        spec[draw(st.sampled_from(["name", "dtype", "shape", "offset", "nbytes"]))] = draw(
            st.one_of(json_values, st.lists(dims, max_size=9)))
    else:
        header[draw(st.sampled_from(sorted(header)))] = draw(json_values)
    return header, frame[8 + hlen :]


def frame_of(header: dict[str, Any], data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    text += b" " * ((-(8 + len(text))) % 8)
    return b"FDG\x01" + struct.pack("<I", len(text)) + text + data


def only_decode_errors(payload: bytes) -> Message | None:
    """Decode; a DecodeError with a known reason is fine, any other exception fails the test."""
    try:
        msg = decode(payload)
    except DecodeError as exc:
        assert exc.reason in set(RejectReason)
        return None
    for cls in CLASSES:
        try:
            decode_as(payload, cls)
        except DecodeError as exc:
            assert exc.reason == RejectReason.WRONG_TYPE
    return msg


@FUZZ
@given(headers(), st.binary(max_size=64))
def test_structured_frames_only_ever_raise_decode_error(header: dict[str, Any], data: bytes) -> None:
    only_decode_errors(frame_of(header, data))


@FUZZ
@given(valid_message_header())
def test_one_hostile_field_in_a_real_frame_only_ever_raises_decode_error(case: tuple[dict[str, Any], bytes]) -> None:
    header, data = case
    only_decode_errors(frame_of(header, data))


@FUZZ
@given(valid_message_header(), st.sampled_from([None, "{}", "not json", "[" * 50_000, "1" * 5000]),
       st.binary(max_size=32))
def test_model_full_installation_checks_raise_artifact_error_only(
        case: tuple[dict[str, Any], bytes], manifest: str | None, extra: bytes) -> None:
    header, data = case
    header["type"] = "model_full"
    if manifest is not None:
        header["manifest"] = manifest
    msg = only_decode_errors(frame_of(header, data + extra))
    if isinstance(msg, ModelFull):
        with pytest.raises(ArtifactError):
            check_model_full(msg)


def context() -> UpdateContext:
    return UpdateContext(fleet="f", known_devices=frozenset({"d"}), round_id=1, model_version="v1",
                         selected=frozenset({"d"}), accepted={}, head_spec={"h0_kernel": ((2, 3), "float32"),
                                                                            "h0_bias": ((3,), "float32")},
                         max_update_bytes=1 << 20)


@FUZZ
@given(st.one_of(headers(), valid_message_header()))
def test_the_hubs_update_validation_never_raises(case: Any) -> None:
    header, data = case if isinstance(case, tuple) else (case, b"")
    verdict = validate_update("d", frame_of(header, data), context())
    assert isinstance(verdict, Accept | Redelivery | Rejection)


control_keys = st.sampled_from(["min_devices", "deadline_s", "fraction", "local_epochs", "lr", "request_id",
                                "reason", "round", "candidates", "x"])


@FUZZ
@given(st.one_of(st.dictionaries(control_keys, json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
                 json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64)))
def test_control_bodies_only_ever_raise_decode_error(body: bytes) -> None:
    for parse in (decode_control, decode_cancel, decode_select_control):
        try:
            parse(body)
        except DecodeError as exc:
            assert exc.reason in set(RejectReason)


@FUZZ
@given(json_values, st.dictionaries(st.sampled_from(["format", "model", "input", "feature_dim", "num_classes",
                                                     "train_batch", "head", "head_activations", "backbone_sha256",
                                                     "files", "created"]), json_values))
def test_the_manifest_reader_only_ever_raises_artifact_error(value: Any, fields_: dict[str, Any]) -> None:
    for text in (json.dumps(value), json.dumps(fields_), json.dumps({**fields_, "format": 1})):
        with contextlib.suppress(ArtifactError):
            Manifest.from_json(text)


# -- what the fuzzers found, pinned --------------------------------------------------------------------------
def head_header(arrays: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "model_head", "fleet": "f", "version": "v1", "parent": None, "backbone_sha256": "ab",
            "round": 1, "nonce": "0" * 32, "arrays": arrays}


def reason_of(payload: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decode(payload)
    return info.value.reason


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**70], [2**40, 0, 2**40], [0, 2**20, 2**20, 2**20]])
def test_zero_size_arrays_with_huge_dimensions_are_malformed(shape: list[int]) -> None:
    spec = {"name": "a", "dtype": "float32", "shape": shape, "offset": 0, "nbytes": 0}
    assert reason_of(frame_of(head_header([spec]))) == RejectReason.MALFORMED


def test_zero_size_arrays_of_sane_shape_still_decode() -> None:
    spec = {"name": "a", "dtype": "float32", "shape": [0, 1000], "offset": 0, "nbytes": 0}
    msg = decode(frame_of(head_header([spec])))
    assert isinstance(msg, ModelHead) and msg.head["a"].shape == (0, 1000)


def test_arrays_per_frame_are_capped() -> None:
    def specs(n: int) -> list[dict[str, Any]]:
        return [{"name": f"a{i}", "dtype": "uint8", "shape": [0], "offset": 0, "nbytes": 0} for i in range(n)]

    assert isinstance(decode(frame_of(head_header(specs(MAX_ARRAYS)))), ModelHead)
    assert reason_of(frame_of(head_header(specs(MAX_ARRAYS + 1)))) == RejectReason.MALFORMED


@pytest.mark.parametrize("bad", [24.0, True, "24"])
def test_nbytes_must_be_an_integer(bad: Any) -> None:
    spec = {"name": "a", "dtype": "float32", "shape": [6], "offset": 0, "nbytes": bad}
    if bad is True:
        spec["shape"], spec["dtype"] = [1], "uint8"
    assert reason_of(frame_of(head_header([spec]), b"\0" * 24)) == RejectReason.MALFORMED


def test_duplicate_keys_in_a_frame_header_are_malformed() -> None:
    for text in (b'{"type":"ack","type":"ack","fleet":"f","round":1,"device":"d","ref_nonce":"x","nonce":"'
                 + b"0" * 32 + b'","arrays":[]}',
                 b'{"type":"ack","fleet":"f","round":1,"device":"d","ref_nonce":"x","nonce":"' + b"0" * 32
                 + b'","arrays":[],"round":2}'):
        text += b" " * ((-(8 + len(text))) % 8)
        assert reason_of(b"FDG\x01" + struct.pack("<I", len(text)) + text) == RejectReason.MALFORMED
    spec = '{"name":"a","name":"b","dtype":"uint8","shape":[0],"offset":0,"nbytes":0}'
    header = json.dumps(head_header([])).replace('"arrays": []', f'"arrays": [{spec}]').encode()
    header += b" " * ((-(8 + len(header))) % 8)
    assert reason_of(b"FDG\x01" + struct.pack("<I", len(header)) + header) == RejectReason.MALFORMED


def test_duplicate_keys_in_a_control_body_are_malformed() -> None:
    for body in (b'{"lr": 0.1, "lr": 1e300}', b'{"min_devices": 1, "deadline_s": 5, "min_devices": 9}'):
        with pytest.raises(DecodeError) as info:
            decode_control(body)
        assert info.value.reason == RejectReason.MALFORMED


def test_control_bodies_are_size_capped() -> None:
    padded = b'{"lr": 0.1}' + b" " * (MAX_CONTROL_BYTES - 11)
    assert decode_control(padded).lr == 0.1
    with pytest.raises(DecodeError) as info:
        decode_control(padded + b" ")
    assert info.value.reason == RejectReason.TOO_LARGE


@pytest.mark.parametrize("text", ["[" * 100_000, '{"format": 1' + "0" * 5000 + "}", '{"format": 1, "format": 1}'])
def test_hostile_manifests_raise_artifact_error(text: str) -> None:
    with pytest.raises(ArtifactError):
        Manifest.from_json(text)


def test_model_full_files_are_views_into_the_frame_not_copies() -> None:
    blob = np.arange(4096, dtype=np.uint8)
    frame = encode(ModelFull("f", "ab" * 32, "{}", {"model.tflite": blob}))
    msg = decode(frame)
    assert isinstance(msg, ModelFull)
    arr = msg.files["model.tflite"]
    assert not arr.flags.owndata and not arr.flags.writeable and np.array_equal(arr, blob)


def _stage_vectors() -> list[bytes]:
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "data" / "golden" / "secagg"
    return [p.read_bytes() for p in sorted(folder.glob("*.bin"))]


@FUZZ
@given(st.sampled_from(_stage_vectors()), st.integers(0, 400), st.binary(min_size=1, max_size=8),
       st.integers(0, 40))
def test_secagg_stage_bytes_only_ever_raise_secagg_error(genuine: bytes, at: int, patch: bytes, cut: int) -> None:
    """A genuine stage encoding with bytes overwritten, or truncated, or extended: decoded, or `malformed`."""
    from fedge.protocol.errors import SecAggError, SecAggFailure
    from fedge.protocol.secagg_wire import decode as decode_stage

    at = at % len(genuine)
    for payload in (genuine[:at] + patch + genuine[at + len(patch):], genuine[: max(len(genuine) - cut, 0)],
                    genuine + patch):
        try:
            decode_stage(payload)
        except SecAggError as exc:
            assert exc.reason is SecAggFailure.MALFORMED
