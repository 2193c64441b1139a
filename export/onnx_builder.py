"""ONNX graphs built with ``onnx.helper`` straight from a :class:`SplitModel`'s NumPy weights.

Keras convolutions are NHWC: the graph transposes the input to NCHW, uses OIHW kernels, and
transposes back to NHWC before any Flatten/Reshape so the flatten order matches Keras.
Elementwise layers (activations, the ``affine`` Sub/Mul/Add of Normalization, Rescaling and
BatchNormalization) keep the current layout; in NCHW their channels-last arrays are transposed.
Opset 17; IR version 8 (ORT training's ``Optimizer`` refuses IR > 10). Head initializers are
named like the manifest (``h0_kernel``, ...), backbone ones ``bb{i}_{layer}_{kernel|bias|shift|scale|offset}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedge.export.zoo import BackboneLayer, SplitModel

__all__ = ["IR_VERSION", "OPSET", "backbone_graph", "full_graph", "head_graph"]

OPSET = 17
IR_VERSION = 8


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def init(self, name: str, arr: np.ndarray[Any, Any]) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = out or self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out


def _activation(g: _Graph, x: str, act: str, out: str | None = None) -> str:
    if act == "linear":
        return g.op("Identity", [x], "id", out) if out else x
    op = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}[act]
    return g.op(op, [x], act, out)


def _pads(padding: str) -> dict[str, Any]:
    return {"auto_pad": "SAME_UPPER"} if padding == "same" else {"pads": [0, 0, 0, 0]}


def _backbone(g: _Graph, split: SplitModel, x: str, out: str) -> str:
    """Append the backbone ops; returns the features tensor name (``out``)."""
    names = iter(split.backbone_param_names())
    nchw = False  # True while the tensor is in NCHW layout
    layers = list(split.backbone)
    if not layers:
        return g.op("Identity", [x], "id", out)
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        spatial = layer.kind in ("conv2d", "maxpool", "avgpool", "globalavg", "globalmax")
        elementwise = layer.kind in ("activation", "affine")
        if spatial and not nchw:
            x, nchw = g.op("Transpose", [x], "nchw", perm=[0, 3, 1, 2]), True
        elif not spatial and not elementwise and nchw:
            x, nchw = g.op("Transpose", [x], "nhwc", perm=[0, 2, 3, 1]), False
        if layer.kind == "affine":
            x = _affine(g, layer, x, names, out if last else None, nchw)
            continue
        if layer.kind in ("globalavg", "globalmax"):  # NCHW in; [N, C, 1, 1] out, flattened unless keepdims
            op = "GlobalAveragePool" if layer.kind == "globalavg" else "GlobalMaxPool"
            if len(layer.target_shape) == 3:
                x = g.op(op, [x], op.lower())
            else:
                x, nchw = g.op("Flatten", [g.op(op, [x], op.lower())], "flatten", out if last else None, axis=1), False
            continue
        x = _layer(g, layer, x, names, out if last else None)
    if nchw:  # backbone ends on a spatial layer: features must be flat anyway, so this is unreachable
        x = g.op("Transpose", [x], "nhwc", out, perm=[0, 2, 3, 1])
    return x


def _nchw(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A channels-last array broadcasting against ``[H, W, C]`` -> one broadcasting against ``[C, H, W]``."""
    full = arr.reshape((1,) * (3 - arr.ndim) + arr.shape)
    return np.ascontiguousarray(full.transpose(2, 0, 1))


def _affine(g: _Graph, layer: BackboneLayer, x: str, names: Any, out: str | None, nchw: bool) -> str:
    """``(x - shift) * scale + offset``: Normalization, Rescaling, BatchNormalization."""
    shift, scale, offset = (g.init(next(names), _nchw(a) if nchw else a) for a in layer.weights)
    y = g.op("Sub", [x, shift], "sub")
    y = g.op("Mul", [y, scale], "mul")
    return g.op("Add", [y, offset], "affine", out)


def _layer(g: _Graph, layer: BackboneLayer, x: str, names: Any, out: str | None) -> str:
    if layer.kind == "conv2d":
        kernel, bias = layer.weights
        w = g.init(next(names), kernel.transpose(3, 2, 0, 1))  # HWIO -> OIHW
        b = g.init(next(names), bias)
        y = g.op("Conv", [x, w, b], "conv", None if layer.activation != "linear" else out,
                 kernel_shape=list(kernel.shape[:2]), strides=list(layer.strides), **_pads(layer.padding))
        return _activation(g, y, layer.activation, out) if layer.activation != "linear" else y
    if layer.kind in ("maxpool", "avgpool"):
        op = "MaxPool" if layer.kind == "maxpool" else "AveragePool"
        extra = {"count_include_pad": 0} if op == "AveragePool" else {}
        return g.op(op, [x], op.lower(), out, kernel_shape=list(layer.pool), strides=list(layer.strides),
                    **_pads(layer.padding), **extra)
    if layer.kind == "flatten":
        return g.op("Flatten", [x], "flatten", out, axis=1)
    if layer.kind == "reshape":
        shape = g.init(g.name("shape"), np.array([-1, *layer.target_shape], dtype=np.int64))
        return g.op("Reshape", [x, shape], "reshape", out)
    if layer.kind == "dense":
        kernel, bias = layer.weights
        w, b = g.init(next(names), kernel), g.init(next(names), bias)
        y = g.op("Gemm", [x, w, b], "dense", None if layer.activation != "linear" else out)
        return _activation(g, y, layer.activation, out) if layer.activation != "linear" else y
    if layer.kind == "activation":
        return _activation(g, x, layer.activation, out or g.name("act"))
    raise ValueError(f"unknown backbone layer kind {layer.kind!r}")


def _head(g: _Graph, split: SplitModel, f: str, out: str) -> str:
    n = len(split.head_activations)
    for i, act in enumerate(split.head_activations):
        w = g.init(f"h{i}_kernel", split.head[f"h{i}_kernel"])
        b = g.init(f"h{i}_bias", split.head[f"h{i}_bias"])
        last = i == n - 1
        y = g.op("Gemm", [f, w, b], f"h{i}", out if last else None)
        f = y if act == "linear" else _activation(g, y, act)
    return f


def _model(g: _Graph, inputs: list[Any], outputs: list[Any], name: str) -> Any:
    from onnx import checker, helper

    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fedge")
    model.ir_version = IR_VERSION
    checker.check_model(model)
    return model


def _x_input(split: SplitModel) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *split.input_shape])


def _vec(name: str, dim: int) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", dim])


def backbone_graph(split: SplitModel) -> Any:
    """``x [N, *in] -> features [N, F]``."""
    g = _Graph()
    _backbone(g, split, "x", "features")
    return _model(g, [_x_input(split)], [_vec("features", split.feature_dim)], f"{split.name}_backbone")


def full_graph(split: SplitModel) -> Any:
    """``x [N, *in] -> logits [N, C]`` (inference, and the base of ``ort/full``)."""
    g = _Graph()
    f = _backbone(g, split, "x", "bb_features")
    _head(g, split, f, "logits")
    return _model(g, [_x_input(split)], [_vec("logits", split.num_classes)], f"{split.name}_full")


def head_graph(split: SplitModel) -> Any:
    """``features [N, F] -> logits [N, C]`` (the base of ``ort/head``)."""
    g = _Graph()
    _head(g, split, "features", "logits")
    return _model(g, [_vec("features", split.feature_dim)], [_vec("logits", split.num_classes)], f"{split.name}_head")
