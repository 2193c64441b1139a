"""Refuse ONNX models that use external data, without the ``onnx`` package (the agent does not have it).

ONNX Runtime resolves a tensor's external data by a path in the model, relative to the model's folder; the
pinned onnxruntime-training 1.19.2 predates the upstream fix for paths that escape that folder, so a model could
read any file the agent can. fedge exports keep every tensor inside the model file, so the agent refuses any
``.onnx`` artifact in which a tensor has ``data_location = EXTERNAL`` or ``external_data`` entries.

The check walks the protobuf wire format along the ONNX schema (onnx.proto3, field numbers below) to every
TensorProto: graph initializers, sparse initializers, node attributes (``t``, ``tensors``, ``sparse_tensor(s)``
and the sub-graphs of ``g``/``graphs``), functions and training info. A file that does not parse is refused too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from fedge.protocol.errors import ArtifactError

__all__ = ["check_onnx_files", "onnx_external_data"]

MAX_DEPTH: Final = 64
_TENSOR, _SPARSE, _GRAPH, _NODE, _ATTR, _FUNCTION, _TRAINING, _MODEL = range(8)
# message kind -> {field number: kind of the embedded message}, only the fields that can lead to a tensor
_SCHEMA: Final[dict[int, dict[int, int]]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNCTION: {7: _NODE, 11: _ATTR},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {},
}
_TENSOR_EXTERNAL_DATA: Final = 13
_TENSOR_DATA_LOCATION: Final = 14
_EXTERNAL: Final = 1


class _Malformed(ValueError):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _walk(buf: memoryview, pos: int, end: int, kind: int, depth: int) -> str | None:
    """The first tensor with external data in the message ``buf[pos:end]`` of ``kind``, described; else None."""
    if depth > MAX_DEPTH:
        raise _Malformed("nested too deeply")
    fields = _SCHEMA[kind]
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            if kind == _TENSOR and number == _TENSOR_DATA_LOCATION and value == _EXTERNAL:
                return "a tensor with data_location EXTERNAL"
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed("field runs past its message")
            if kind == _TENSOR and number == _TENSOR_EXTERNAL_DATA:
                return "a tensor with external_data"
            if number in fields:
                found = _walk(buf, pos, pos + length, fields[number], depth + 1)
                if found:
                    return found
            pos += length
        else:
            raise _Malformed(f"wire type {wire}")
        if pos > end:
            raise _Malformed("field runs past its message")
    return None


def onnx_external_data(data: bytes | memoryview) -> str | None:
    """What in this serialized ModelProto uses external data (None: nothing does); ArtifactError if it does not
    parse as protobuf."""
    buf = memoryview(data).cast("B")
    try:
        return _walk(buf, 0, len(buf), _MODEL, 0)
    except _Malformed as exc:
        raise ArtifactError(f"not a valid ONNX model: {exc}") from None


def check_onnx_files(files: Mapping[str, bytes | memoryview]) -> None:
    """ArtifactError naming the first ``.onnx`` file that uses external data (or does not parse)."""
    for name, data in sorted(files.items()):
        if name.endswith(".onnx"):
            try:
                found = onnx_external_data(data)
            except ArtifactError as exc:
                raise ArtifactError(f"{name}: {exc}") from None
            if found:
                raise ArtifactError(f"{name}: refused, the model uses external data ({found}); fedge models keep "
                                    "every tensor inside the file")
