"""An ONNX feature extractor as the backbone (``fedge export --backbone backbone.onnx --num-classes C``).

Takes what ``torch.onnx.export`` writes (NCHW images) or any ONNX model with one float input ``[N, ...]`` and
one output ``[N, F]``; the batch dimension must be dynamic. The graph is kept as it is, with its input renamed
``x`` and its output ``features`` (what the trainers expect); a fresh head (seeded Glorot, zero biases) goes on
top. ``backbone_sha256`` hashes the graph's initializers in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedge.export.onnx_graphs import MAX_IR_VERSION
from fedge.export.split import Split, fresh_head
from fedge.protocol.errors import ConfigError

__all__ = ["load_onnx_backbone", "split_onnx"]

_FIELD = "backbone"


def _static_dims(value_info: Any, what: str) -> tuple[list[int], bool]:
    """``(dims after the batch axis, batch is dynamic)``; refuses unknown non-batch dimensions."""
    dims = value_info.type.tensor_type.shape.dim
    if len(dims) < 2:
        raise ConfigError(_FIELD, f"the ONNX {what} {value_info.name!r} has rank {len(dims)}: need [N, ...]")
    rest = []
    for i, d in enumerate(dims[1:], start=1):
        if not d.HasField("dim_value"):
            raise ConfigError(_FIELD, f"the ONNX {what} {value_info.name!r} has an unknown dimension {i} "
                              f"({d.dim_param or '?'}): only the batch dimension may be dynamic")
        rest.append(int(d.dim_value))
    batch_dynamic = not dims[0].HasField("dim_value")
    return rest, batch_dynamic


def load_onnx_backbone(path: str | Path) -> tuple[Any, tuple[int, ...], int]:
    """Read and check the ONNX file: ``(ModelProto with its I/O renamed x/features, input shape, F)``."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ConfigError(_FIELD, f"{str(p)!r}: no such file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, OSError, ...
        raise ConfigError(_FIELD, f"{str(p)!r} is not an ONNX model: {exc}") from exc
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
        raise ConfigError(_FIELD, f"{str(p)!r} keeps weights in external data files: re-export it as one file")
    if model.ir_version > MAX_IR_VERSION:
        raise ConfigError(_FIELD, f"{str(p)!r} has ONNX IR version {model.ir_version}; ONNX Runtime 1.19 reads "
                          f"<= {MAX_IR_VERSION}: export with opset_version=17 (torch.onnx.export(..., dynamo=False))")
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ConfigError(_FIELD, f"{str(p)!r} has {len(inputs)} input(s) and {len(model.graph.output)} output(s): "
                          "a backbone has one image/vector input and one feature output")
    (inp,), (out,) = inputs, model.graph.output
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ConfigError(_FIELD, f"the ONNX input {inp.name!r} is not float32")
    in_dims, in_dynamic = _static_dims(inp, "input")
    out_dims, _ = _static_dims(out, "output")
    if not in_dynamic:
        raise ConfigError(_FIELD, f"the ONNX input {inp.name!r} has a fixed batch size: export with a dynamic batch "
                          f"(torch.onnx.export(..., dynamic_axes={{{inp.name!r}: {{0: 'N'}}, "
                          f"{out.name!r}: {{0: 'N'}}}}))")
    if len(out_dims) != 1:
        raise ConfigError(_FIELD, f"head/backbone shape mismatch: the head takes a feature vector [N, F], the "
                          f"backbone outputs [N, {', '.join(map(str, out_dims))}]: end the backbone with "
                          "Flatten (torch.flatten(x, 1)) or a global pooling")
    _rename(model, inp.name, "x", out.name, "features")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ConfigError(_FIELD, f"{str(p)!r} is not a valid ONNX model: {str(exc)[:300]}") from exc
    return model, tuple(in_dims), out_dims[0]


def _rename(model: Any, old_in: str, new_in: str, old_out: str, new_out: str) -> None:
    mapping = {old_in: new_in, old_out: new_out}
    g = model.graph
    for vi in (*g.input, *g.output, *g.value_info):
        vi.name = mapping.get(vi.name, vi.name)
    for node in g.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]


def split_onnx(path: str | Path, num_classes: int, hidden: int = 0, seed: int = 0) -> Split:
    """The ONNX backbone at ``path`` with a fresh head of ``num_classes`` (``hidden`` > 0: one ReLU layer)."""
    from onnx import numpy_helper

    if num_classes < 2:
        raise ConfigError("num_classes", f"need at least 2 classes, got {num_classes}")
    model, in_shape, feat_dim = load_onnx_backbone(path)
    head, acts = fresh_head(feat_dim, num_classes, hidden, np.random.default_rng(seed))
    weights = tuple(np.ascontiguousarray(numpy_helper.to_array(i).astype(np.float32).ravel())
                    for i in model.graph.initializer)
    return Split(
        name=Path(path).stem,
        input_shape=in_shape,
        layout="NCHW" if len(in_shape) == 3 else "",
        head=head,
        head_activations=acts,
        backbone_weights=weights,
        onnx_backbone=model,
    )
